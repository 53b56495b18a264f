"""Where the real sample sections live (the 30 ISBI 2012 ssTEM sections).

They are not part of the repository: tests, benchmarks and the demo's real-data option read
them from ``../shared/data/isbi`` beside the checkout, or from ``$METROEM_ISBI_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

from metroem.errors import MetroemError

REPO = Path(__file__).resolve().parent.parent


class SharedDataMissing(MetroemError):
    """The sample data is not where it was looked for."""


def isbi_dir(check: bool = True) -> Path:
    """The folder of the sample sections (``00.png`` ... ``29.png``)."""
    path = Path(os.environ.get("METROEM_ISBI_DIR", REPO.parent / "shared" / "data" / "isbi"))
    if check and not (path / "00.png").exists():
        raise SharedDataMissing(
            f"sample sections not found in {path}; set METROEM_ISBI_DIR to a folder of the ISBI "
            "2012 PNG sections"
        )
    return path


def isbi_section(index: int) -> Path:
    """Path of sample section ``index`` (0-based)."""
    return isbi_dir() / f"{index:02d}.png"
