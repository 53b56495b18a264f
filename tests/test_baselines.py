"""Each baseline's field convention, checked on a real section shifted by a known amount."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import isbi_section

from metroem import fields
from metroem.errors import MetroemError
from metroem.eval import baselines, metrics

SIZE = 256


def _section(z: int = 3) -> torch.Tensor:
    from PIL import Image

    a = np.asarray(Image.open(isbi_section(z)), dtype=np.float32)
    return torch.from_numpy(np.maximum(a, 1.0))


def _shift_field(dx: float, dy: float, size: int = SIZE) -> torch.Tensor:
    f = torch.zeros(1, 2, size, size)
    f[:, 0], f[:, 1] = dx, dy
    return f


def _shifted_pair(dx: int, dy: int):
    """(src, tgt, gt): src is a crop of the section moved so that src(p + (dx, dy)) = tgt(p)."""
    full = _section()
    y0, x0 = 128, 128
    tgt = full[y0 : y0 + SIZE, x0 : x0 + SIZE]
    # src(p) = full(y0 + p_y - dy, x0 + p_x - dx): real data everywhere, no empty border.
    src = full[y0 - dy : y0 - dy + SIZE, x0 - dx : x0 - dx + SIZE]
    return src, tgt, _shift_field(dx, dy)


def _fast(name: str) -> bool:
    return name not in baselines.OPTIONAL and name != "identity"


@pytest.mark.parametrize("name", [m for m in baselines.METHODS if _fast(m)])
def test_convention_on_integer_shift(name):
    src, tgt, gt = _shifted_pair(3, -5)
    # sanity: the ground truth really aligns the pair
    assert torch.equal(fields.warp_image(src[None, None], gt)[0, 0, 16:-16, 16:-16],
                       tgt[16:-16, 16:-16])
    field = baselines.align(name, src, tgt)
    assert field.shape == (1, 2, SIZE, SIZE) and field.dtype == torch.float32
    inner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inner[32:-32, 32:-32] = True
    assert metrics.epe_stats(field, gt, inner)["median"] < 0.1, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["elastix", "ants"])
def test_optional_method_convention_or_clear_error(name):
    """Installed: the method's field follows our convention on a pure shift. Not installed (the
    core install): asking for it is a one-line error naming the pip command. Never skipped."""
    src, tgt, gt = _shifted_pair(3, -5)
    if importlib.util.find_spec(baselines.OPTIONAL[name]) is None:
        with pytest.raises(MetroemError, match="pip install"):
            baselines.align(name, src, tgt)
        return
    field = baselines.align(name, src, tgt)
    inner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inner[32:-32, 32:-32] = True
    assert metrics.epe_stats(field, gt, inner)["median"] < 0.2


def test_identity_is_zero():
    src, tgt, _ = _shifted_pair(3, -5)
    assert not baselines.align("identity", src, tgt).any()


def test_phase_init_rescues_large_shift_and_composes():
    """A 40 px shift: the +pc variant lands on it, with the pre-shift composed in."""
    src, tgt, gt = _shifted_pair(40, 25)
    inner = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inner[48:-48, 48:-48] = True
    with_pc = baselines.align("farneback+pc", src, tgt)
    assert metrics.epe_stats(with_pc, gt, inner)["median"] < 0.1
    plain = baselines.align("farneback", src, tgt)
    assert metrics.epe_stats(plain, gt, inner)["median"] > 1.0


def test_accepts_batched_tensors_and_callables():
    src, tgt, _ = _shifted_pair(3, -5)
    ones = lambda s, t: np.ones((2,) + s.shape, np.float32)  # noqa: E731
    f = baselines.align(ones, src[None, None], tgt[None])
    assert f.shape == (1, 2, SIZE, SIZE) and float(f.mean()) == 1.0


def test_bad_input_is_one_line_error():
    with pytest.raises(MetroemError, match="unknown alignment method"):
        baselines.align("sift", torch.ones(8, 8), torch.ones(8, 8))
    with pytest.raises(MetroemError, match="differ in size"):
        baselines.align("identity", torch.ones(8, 8), torch.ones(8, 9))


def test_available_methods_lists_the_core_ones():
    names = baselines.available_methods()
    for core in ("identity", "phasecorr", "tvl1", "ilk", "dis", "farneback", "dis+pc"):
        assert core in names
    assert all(baselines.method_params(n) for n in names)
