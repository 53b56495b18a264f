"""metroem.detrend: the placement fit, the trend along z, and what removing it does to a stack."""

import math

import numpy as np
import pytest
import torch

from metroem import detrend, fields, stack
from metroem.errors import MetroemError


def _affine_field(m: np.ndarray, h: int, w: int) -> torch.Tensor:
    """The field ``p -> M p - p`` of a 3 x 3 matrix (centred coordinates)."""
    return detrend.correction_field(m, 0, 0, h, w, h, w)


def _matrix(tx=0.0, ty=0.0, a=0.0, b=0.0, c=0.0, d=0.0) -> np.ndarray:
    return np.array([[1 + a, b, tx], [c, 1 + d, ty], [0, 0, 1]], dtype=np.float64)


def test_affine_sums_recover_a_placement_and_chunks_add_up_to_the_whole():
    h, w = 40, 56
    m = _matrix(3.0, -2.0, 0.01, -0.02, 0.015, -0.005)
    f = _affine_field(m, h, w) + 0.01 * torch.randn(1, 2, h, w, generator=torch.Generator()
                                                    .manual_seed(0))
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[:5] = False  # no data there: not in the fit
    whole = detrend.AffineSums(h, w)
    whole.add(f, mask)
    assert np.allclose(whole.placement(), m, atol=1e-3)
    parts = detrend.AffineSums(h, w)
    for y0 in (0, 16, 32):
        for x0 in (0, 32):
            win = f[..., y0:y0 + 16, x0:x0 + 32]
            part = detrend.AffineSums.from_list(h, w, detrend.AffineSums(h, w).to_list())
            part.add(win, mask[y0:y0 + 16, x0:x0 + 32], y0, x0)
            parts.merge(part)
    assert parts.pixels == whole.pixels == int(mask.sum())
    assert np.allclose(parts.placement(), whole.placement(), atol=1e-9)
    assert detrend.AffineSums(h, w).placement() is None  # nothing added: no placement


def test_the_trend_of_a_linear_drift_is_the_drift_and_missing_sections_are_skipped():
    placements = [_matrix(2.0 * z, -1.0 * z, 0.001 * z) for z in range(9)]
    placements[4] = None  # a section without data: not in the fit, still gets a trend
    for sigma in (1.0, 3.0, 1e6):
        t = detrend.trend(placements, sigma)
        for z in range(9):
            assert np.allclose(t[z], _matrix(2.0 * z, -1.0 * z, 0.001 * z), atol=1e-9)
    assert np.allclose(detrend.trend([None, _matrix(1.0), None], 2.0)[2], _matrix(1.0))
    assert np.allclose(detrend.trend([None, None], 2.0)[0], np.eye(3))


def test_a_wild_placement_does_not_drag_the_trend_of_its_neighbours():
    """A lost pair the guard missed (a section 200 px off, sheared) gets no weight in the fit:
    the trend stays the stack's drift, for that section and its neighbours."""
    rng = np.random.default_rng(0)
    placements = [_matrix(1.5 * z + rng.uniform(-2, 2), -z + rng.uniform(-2, 2))
                  for z in range(20)]
    placements[9] = _matrix(200.0, -150.0, 0.2, -0.1)
    t = detrend.trend(placements, 4.0, extent=100.0)
    for z in range(20):
        assert abs(t[z][0, 2] - 1.5 * z) < 2.0 and abs(t[z][1, 2] + z) < 2.0
        assert np.abs(t[z][:2, :2] - np.eye(2)).max() < 1e-3
    plain = detrend.trend(placements[:9] + [None] + placements[10:], 4.0, extent=100.0)
    assert max(np.abs(a - b).max() for a, b in zip(t, plain, strict=True)) < 0.05


def test_corrections_remove_the_trend_and_keep_the_reference():
    h, w = 32, 32
    whole = [_affine_field(_matrix(1.5 * z, 0.5 * z, 0.002 * z), h, w) for z in range(8)]
    whole[0] = torch.zeros(1, 2, h, w)  # the reference: zero field
    aligned = [torch.ones(1, 1, h, w)] * 8
    flat = detrend.detrend_fields(whole, aligned, 4.0)
    assert flat[0].abs().max() < 1e-4  # the reference keeps its (zero) field
    for f in flat:  # a linear drift is all trend (inside: the border is repeated outside)
        assert f[..., 12:-12, 12:-12].abs().max() < 1e-3


def test_a_collapsed_serial_stack_is_reported_not_silently_inverted(caplog):
    # a serial alignment whose placement shrinks the sections steadily (area x 0.2 at the end)
    shrinking = [np.diag([1 - 0.055 * z, 1 - 0.055 * z, 1.0]) for z in range(10)]
    with caplog.at_level("WARNING", logger="metroem.detrend"):
        detrend.corrections(shrinking, 4.0, extent=50.0)
    assert "collapsed" in caplog.text and "--smoothing_nm" in caplog.text
    caplog.clear()
    drifting = [_matrix(1.5 * z, 0.5 * z, 0.002 * z) for z in range(10)]  # drift: no warning
    with caplog.at_level("WARNING", logger="metroem.detrend"):
        detrend.corrections(drifting, 4.0, extent=50.0)
    assert "collapsed" not in caplog.text


@pytest.mark.parametrize("bad", [0, -2, float("nan")])
def test_a_bad_sigma_is_one_line(bad):
    with pytest.raises(MetroemError, match="--detrend_sections must be a positive"):
        detrend.check_sigma(bad)
    assert detrend.check_sigma(None) is None


def _texture(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, size // 4, size // 4, generator=g)
    img = torch.nn.functional.interpolate(noise, size=(size, size), mode="bicubic",
                                          align_corners=False)
    return (img.clamp(0, 1) * 200 + 30).round()


def _shifted(img: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    h, w = img.shape[-2:]
    d = torch.tensor([dx, dy], dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, h, w)
    return fields.warp_image(img, d.contiguous())


def _translation_pair_fn() -> stack.PairFn:
    from metroem import translation

    def run(src, tgt, init):
        moved = fields.warp_image(src.float(), init)
        shift = translation.phase_translation(moved, tgt.float())  # field of moved onto tgt
        h, w = src.shape[-2:]
        return fields.compose(init, shift.view(1, 2, 1, 1).expand(1, 2, h, w).contiguous())

    return run


def test_detrending_a_serial_stack_takes_out_the_drift_of_obliquely_moving_content():
    """Sections placed independently (offsets up to 1.5 px), content sliding 2 px per section
    (oblique tissue): the serial stack follows the content and drifts away from the truth; the
    detrended stack comes back to it, and align_stack(detrend_sections=) is the same thing."""
    n, size = 12, 96
    base = _texture(size + 80, seed=3)
    g = torch.Generator().manual_seed(5)
    offsets = (torch.rand(n, 2, generator=g) * 3 - 1.5)
    offsets[0] = 0
    secs, truth = [], []
    for z in range(n):
        content = _shifted(base, 2.0 * z, -1.0 * z)  # the tissue moves: not a distortion
        sec = _shifted(content, *offsets[z].tolist())[..., 40:40 + size, 40:40 + size]
        secs.append(sec.round())
        truth.append(-offsets[z])  # the right field undoes the placement alone
    pair = _translation_pair_fn()
    aligned, serial = stack.align_stack(secs, pair, guard=stack.MisalignmentGuard(0))

    def worst(whole):
        inner = (slice(16, -16), slice(16, -16))
        return max(float((f[0, :, inner[0], inner[1]] - t.view(2, 1, 1)).norm(dim=0).median())
                   for f, t in zip(whole, truth, strict=True))

    flat = detrend.detrend_fields(serial, aligned, 1e6)
    assert worst(serial) > 15  # the content's 2.2 px per section, added up
    assert worst(flat) < 2.0
    _, again = stack.align_stack(secs, pair, guard=stack.MisalignmentGuard(0),
                                 detrend_sections=1e6)
    for a, b in zip(flat, again, strict=True):
        assert (a - b).abs().max() < 1e-4
    assert math.isclose(float(again[0].abs().max()), 0.0, abs_tol=1e-4)  # reference fixed
