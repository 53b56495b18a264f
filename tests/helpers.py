"""Helpers of the tests (and of benchmarks/bad_inputs.py): the shared data beside the checkout,
and tiny pyramids.

The shared data (the ISBI 2012 ssTEM sections, the FIB-SEM blocks) is not part of the repository.
CI and the development machines have it in ``../shared/data`` beside the checkout
(``$METROEM_SHARED_DATA`` names another folder). A test that needs it asks for it with
:func:`shared_data` (or the ``needs_shared`` marker, see conftest.py) and is skipped, with one
line saying why, when it is missing; everything else runs from a bare clone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metroem import modules, nets

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "METROEM_SHARED_DATA"
DEFAULT_SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_DATA = Path(os.environ.get(SHARED_ENV) or DEFAULT_SHARED_DATA)
# What each shared data set must hold to count as present.
_PROBE = {"isbi": "00.png", "fibsem": "sample1"}


def have_shared(name: str = "isbi") -> bool:
    """Whether the shared data set ``name`` (``isbi`` or ``fibsem``) is there."""
    return (SHARED_DATA / name / _PROBE[name]).exists()


def skip_reason(name: str = "isbi") -> str:
    where = f"../shared/data/{name}" if SHARED_DATA == DEFAULT_SHARED_DATA else SHARED_DATA / name
    return f"needs {where} (the shared data beside the checkout); CI has it"


def shared_data(name: str = "isbi") -> Path:
    """The folder of the shared data set ``name``; skips the calling test when it is missing."""
    if not have_shared(name):
        pytest.skip(skip_reason(name))
    return SHARED_DATA / name


def isbi_section(index: int) -> Path:
    """The PNG of ISBI section ``index`` (0-based); skips the calling test when it is missing."""
    return shared_data("isbi") / f"{index:02d}.png"


def pyramid_with_settings(pyramid: Path, dest: Path, settings: str) -> Path:
    """A copy of the pyramid folder ``pyramid`` at ``dest`` whose ``pyramid.json`` holds the
    JSON text ``settings``."""
    import shutil

    shutil.copytree(pyramid, dest)
    (dest / modules.SETTINGS_FILE).write_text(settings)
    return dest


def tiny_pyramid(
    root: str | os.PathLike,
    spec: dict,
    mips: tuple[int, ...] = (1, 0),
    suffix: str = "t",
    checkpoint: str | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> Path:
    """Module folders under ``root``: stage i at MIP ``mips[i]``, all with ``spec``.

    With ``checkpoint``, each stage also gets a freshly built model of ``spec`` whose parameters
    are moved by Gaussian noise of std ``noise`` (torch seeded with ``seed`` first), saved under
    that checkpoint name: random, non-trivial weights. Returns ``root``.
    """
    if checkpoint is not None:
        torch.manual_seed(seed)
    for stage, mip in enumerate(mips):
        info = modules.create_module(root, stage, mip, suffix, spec)
        if checkpoint is not None:
            model = nets.build_model(spec)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * noise)
            modules.save_weights(info.path, checkpoint, model.state_dict())
    return Path(root)
