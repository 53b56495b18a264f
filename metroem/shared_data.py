"""Where the shared sample data lives (the 30 ISBI 2012 ssTEM sections, the FIB-SEM blocks).

It is not part of the package: ``$METROEM_SHARED_DATA`` names the folder that holds it
(``isbi/``, ``fibsem/``), and a variable per data set (``$METROEM_ISBI_DIR`` here,
``$METROEM_BENCH_DATA`` and ``$METROEM_FIBSEM_DATA`` in :mod:`metroem.eval`) names one folder
directly. The checkout's tests and benchmarks default ``$METROEM_SHARED_DATA`` to
``../shared/data`` beside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from metroem.errors import MetroemError

SHARED_ENV = "METROEM_SHARED_DATA"


class SharedDataMissing(MetroemError):
    """The sample data is not where it was looked for."""


def shared_dir(name: str, env: str | None = None) -> Path:
    """The folder of the shared data set ``name``: ``$env`` if set, else
    ``$METROEM_SHARED_DATA/name``; raises :class:`SharedDataMissing` when neither is set."""
    if env and os.environ.get(env):
        return Path(os.environ[env])
    root = os.environ.get(SHARED_ENV)
    if not root:
        also = f" (or {env} to the {name} folder itself)" if env else ""
        raise SharedDataMissing(
            f"no location for the shared {name} data; set {SHARED_ENV} to the folder that "
            f"holds {name}/{also}"
        )
    return Path(root) / name


def isbi_dir(check: bool = True) -> Path:
    """The folder of the sample sections (``00.png`` ... ``29.png``)."""
    path = shared_dir("isbi", "METROEM_ISBI_DIR")
    if check and not (path / "00.png").exists():
        raise SharedDataMissing(
            f"sample sections not found in {path}; set {SHARED_ENV} to the folder that holds "
            "isbi/ (or METROEM_ISBI_DIR to a folder of the ISBI 2012 PNG sections)"
        )
    return path


def isbi_section(index: int) -> Path:
    """Path of sample section ``index`` (0-based)."""
    return isbi_dir() / f"{index:02d}.png"
