"""Golden fields: the shipped pyramids give the fields they gave when their weights were made.

This guards against silent numeric drift of the architectures versioned in ``metroem.nets``
(a module folder holds only a spec and weights, so a change to the library's code changes
what every shipped pyramid computes). Regenerate with ``python tests/golden/make_golden.py``
only when a pyramid is retrained or an architecture changes on purpose.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import make_golden  # noqa: E402

# Float kernels differ between CPUs (vector width, summation order): the same weights gave
# fields 7e-5 px apart on two x86 machines. A change of weights or architecture moves them by
# far more than this.
TOLERANCE_PX = 1e-3


@pytest.mark.parametrize("name", make_golden.PYRAMIDS)
def test_shipped_pyramid_matches_its_golden_fields(name):
    golden = np.load(make_golden.HERE / f"{name}.npz")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as the golden fields were written
        field = make_golden.pyramid_fields(make_golden.MODELS / name, golden["src"],
                                           golden["tgt"])
    finally:
        torch.set_num_threads(threads)
    assert field.shape == golden["field"].shape
    assert np.abs(golden["field"]).max() > 1.0  # the pairs are misaligned: the test can fail
    err = np.abs(field - golden["field"]).max()
    assert err <= TOLERANCE_PX, f"{name}: field differs from golden by {err:.2e} px"


def test_golden_pairs_are_regenerated_identically():
    """The stored pairs are what make_golden draws, so regenerating changes only the fields."""
    src, tgt = make_golden.golden_pairs()
    golden = np.load(make_golden.HERE / "demo.npz")
    # warped grey levels that land on .5 may round either way on another CPU: a few pixels
    # by one level, never more
    diff = np.abs(src.astype(int) - golden["src"].astype(int))
    assert diff.max() <= 1 and (diff > 0).sum() <= 10
    assert np.array_equal(tgt, golden["tgt"])
