"""metroem.regularize: local-linear field smoothing with a physical length."""

from __future__ import annotations

import math

import pytest
import torch

from metroem import fields, regularize, synth
from metroem.errors import MetroemError
from metroem.eval import metrics


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster (and fair to a shared CPU); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _affine(h: int, w: int) -> torch.Tensor:
    m = torch.tensor([[[1.03, 0.02], [-0.05, 0.98]]])
    return synth.affine_field(m, torch.tensor([[10.0, -7.0]]), h, w)


@pytest.mark.parametrize("sigma", [2.0, 16.0, 64.0, 300.0])
def test_affine_field_is_kept_exactly_whatever_the_weights(sigma):
    gen = torch.Generator().manual_seed(0)
    h, w = 130, 171  # not multiples of the coarse grid
    aff = _affine(h, w)
    weight = (torch.rand(1, 1, h, w, generator=gen) > 0.5).float()
    weight[..., :, :60] = 0  # a no-data band
    out = regularize.smooth_field(aff, sigma, weight)
    assert (out - aff).abs().max() < 1e-3


def test_variation_shorter_than_sigma_is_averaged_away():
    gen = torch.Generator().manual_seed(1)
    aff = _affine(128, 128)
    noise = torch.randn(1, 2, 128, 128, generator=gen) * 2
    out = regularize.smooth_field(aff + noise, 16.0, robust_iterations=0)
    rms = (out - aff).pow(2).mean().sqrt()
    assert rms < 0.1 * noise.pow(2).mean().sqrt()


def test_smooth_distortion_longer_than_sigma_is_followed():
    gen = torch.Generator().manual_seed(2)
    slow = synth.elastic_field(1, 256, 256, std=2.0, scale=128, generator=gen)
    out = regularize.smooth_field(slow, 8.0)
    assert (out - slow).abs().median() < 0.05 * slow.abs().median()


def test_robust_weights_discount_a_far_match():
    """A patch pulled 20 px off (a wrong match) leaks much less into its surroundings."""
    field = torch.zeros(1, 2, 128, 128)
    field[:, 0, 56:72, 56:72] = 20.0
    ring = torch.zeros(128, 128, dtype=torch.bool)
    ring[40:88, 40:88] = True
    ring[56:72, 56:72] = False
    plain = regularize.smooth_field(field, 12.0, robust_iterations=0)
    robust = regularize.smooth_field(field, 12.0, robust_iterations=3)
    leak_plain = plain[0, 0][ring].abs().mean()
    leak_robust = robust[0, 0][ring].abs().mean()
    assert leak_robust < 0.5 * leak_plain


def test_a_padded_tile_gives_the_whole_image_result():
    gen = torch.Generator().manual_seed(3)
    sigma = 12.0  # coarse grid of 2 px: tile origins on multiples of 2
    field = synth.elastic_field(1, 420, 420, std=3.0, scale=24, generator=gen)
    field = field + torch.randn(1, 2, 420, 420, generator=gen)
    whole = regularize.smooth_field(field, sigma)
    pad = regularize.support_px(sigma)
    assert regularize.grid_factor(sigma) == 2 and pad % 2 == 0
    y0, x0, size = 180, 180, 60
    tile = field[..., y0 - pad : y0 + size + pad, x0 - pad : x0 + size + pad]
    part = regularize.smooth_field(tile, sigma)[..., pad : pad + size, pad : pad + size]
    assert (part - whole[..., y0 : y0 + size, x0 : x0 + size]).abs().max() < 1e-4
    c = 60  # a pad well short of the support changes the result
    cut = regularize.smooth_field(tile[..., c:-c, c:-c], sigma)
    cut = cut[..., pad - c : pad - c + size, pad - c : pad - c + size]
    assert (cut - whole[..., y0 : y0 + size, x0 : x0 + size]).abs().max() > 1e-3


def test_batch_items_are_independent_and_it_is_differentiable():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1, 2, 64, 64, generator=gen)
    b = torch.randn(1, 2, 64, 64, generator=gen)
    both = regularize.smooth_field(torch.cat([a, b]), 8.0)
    assert torch.allclose(both[1:], regularize.smooth_field(b, 8.0), atol=1e-5)
    x = a.clone().requires_grad_(True)
    regularize.smooth_field(x, 8.0).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_the_coarse_grid_is_a_power_of_two_so_usual_chunks_stay_on_it():
    assert [regularize.grid_factor(s) for s in (2, 8, 40, 64, 160)] == [1, 2, 8, 16, 32]
    assert 1024 % regularize.grid_factor(160.0) == 0  # 640 nm at 4 nm px, the default chunk


def test_sigma_zero_is_the_identity_and_lengths_convert_to_pixels():
    f = torch.randn(1, 2, 16, 16)
    assert regularize.smooth_field(f, 0.0) is f
    assert regularize.sigma_px(640, 10) == 64.0
    assert regularize.sigma_px(640, 4, mip=2) == 40.0


def test_data_weight_marks_where_both_images_have_data():
    src = torch.ones(1, 1, 8, 8)
    src[..., :, :2] = 0
    tgt = torch.ones(1, 1, 8, 8)
    tgt[..., 0, :] = 0
    w = regularize.data_weight(src, tgt, torch.zeros(1, 2, 8, 8))
    assert w[0, 0, 0].sum() == 0 and w[0, 0, 3, :2].sum() == 0 and w[0, 0, 3, 2:].all()


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: regularize.sigma_px(-1, 4), "smoothing length"),
        (lambda: regularize.sigma_px(100, 0), "--resolution_nm"),
        (lambda: regularize.smooth_field(torch.zeros(1, 2, 8, 8), math.inf), "finite"),
        (lambda: regularize.smooth_field(torch.zeros(1, 2, 8, 8), 2.0, torch.ones(4, 4)),
         "does not match"),
    ],
)
def test_bad_arguments_name_the_problem(call, words):
    with pytest.raises(MetroemError, match=words):
        call()


# --- the match gate ---------------------------------------------------------------------------


def _texture(seed: int, size: int = 192, blur: float = 2.0) -> torch.Tensor:
    """Grey-level texture with membrane-sized blobs of ``blur`` px (values 20..235, no zeros)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, size, size, generator=gen)
    x = regularize._gaussian_blur(x, blur)
    return 128 + 100 * x / x.abs().max()


def _bend(size: int = 192) -> torch.Tensor:
    """A short (24 px) bend of 2 px: shorter than the smoothing sigma below."""
    gen = torch.Generator().manual_seed(7)
    return synth.elastic_field(1, size, size, std=2.0, scale=24, generator=gen)


def test_match_similarity_is_one_on_the_same_image_and_low_on_other_tissue():
    a, b = _texture(0), _texture(1)
    zero = torch.zeros(1, 2, 192, 192)
    same = regularize.match_similarity(a, a, zero, 6.0)
    other = regularize.match_similarity(a, b, zero, 6.0)
    inner = (slice(None), slice(None), slice(20, -20), slice(20, -20))
    assert same[inner].min() > 0.999
    assert other[inner].abs().median() < 0.3
    empty = a.clone()
    empty[..., :, :96] = 0  # no data on the left: no match there
    r = regularize.match_similarity(empty, a, zero, 6.0)
    assert (r[..., :, :70] == 0).all() and r[..., 40:-40, 130:-30].min() > 0.999


def test_gate_keeps_a_same_section_field_and_smooths_one_between_other_tissue():
    """A source that is the target bent at a short scale: the exact field keeps its bend (the
    warped source matches the target); the same field between unrelated images is smoothed
    as without the gate; plain smoothing loses the bend."""
    tgt = _texture(2)
    bend = _bend()
    src, field = synth.deformed_pair(tgt, bend)  # warp(src, field) = tgt
    inner = (slice(None), slice(None), slice(32, -32), slice(32, -32))
    kept = regularize.regularized_field(field, src, tgt, 32.0, regularize.GATE, 6.0)
    plain = regularize.regularized_field(field, src, tgt, 32.0, None, 6.0)
    err_kept = (kept - field)[inner].norm(dim=1).median()
    err_plain = (plain - field)[inner].norm(dim=1).median()
    assert err_kept < 0.05 < err_plain
    other = _texture(3)
    gated = regularize.regularized_field(field, other, tgt, 32.0, regularize.GATE, 6.0)
    smooth = regularize.smooth_field(field, 32.0, regularize.data_weight(other, tgt, field))
    assert (gated - smooth)[inner].abs().max() < 1e-4


def test_the_gate_turns_from_kept_to_smoothed_over_a_window_not_an_edge():
    """Left half the same section, right half other tissue: the field is kept on the left and
    smoothed on the right, and the blend weight changes by at most about 2 / window width per
    pixel across the border (a sharp edge between kept and smoothed fields folds them)."""
    tgt = _texture(6)
    src = torch.where(torch.arange(192) < 96, tgt, _texture(7))
    zero = torch.zeros(1, 2, 192, 192)
    window = 6.0
    keep = regularize.match_keep(src, tgt, zero, regularize.GATE, window)
    rows = slice(30, -30)
    assert keep[..., rows, 10:60].min() > 0.99 and keep[..., rows, 130:-10].max() < 0.01
    width = 2 * regularize._box_radius(window) + 1
    step = (keep[..., rows, 1:] - keep[..., rows, :-1]).abs().max()
    assert 0 < step <= 2.2 / width
    with pytest.raises(MetroemError, match="needs a gate"):
        regularize.match_keep(src, tgt, zero, "off", window)


def test_a_kept_field_that_would_fold_is_smoothed_there_and_kept_elsewhere():
    """Every pixel matches (a loose gate): a fold-free field is kept exactly; a field with a
    local fold loses it (the smoothed field takes over near it) and is kept far from it."""
    tgt = _texture(8)
    loose, window = (-1.0, -0.999), 3.0  # every r above -0.999 is kept
    bend = _bend()
    ramp = (torch.arange(192.0).clamp(max=191 - torch.arange(192.0)) / 16).clamp(max=1)
    bend = bend * ramp[:, None] * ramp[None, :]  # 0 at the edge: it samples no pixel outside
    # the fold check must not touch this field: it stays well above the near-fold determinant
    assert fields.jacobian_determinant(bend).min() > 2 * regularize.NEAR_FOLD_DET
    reach = regularize.gate_support_px(window)
    kept = regularize.regularized_field(bend, tgt, tgt, 32.0, loose, window)
    assert torch.allclose(kept, bend, atol=1e-6)
    yy, xx = torch.meshgrid(torch.arange(192.0), torch.arange(192.0), indexing="ij")
    swirl = torch.exp(-((yy - 60) ** 2 + (xx - 60) ** 2) / (2 * 4.0**2))
    folded = bend + 12 * torch.stack([swirl, torch.zeros_like(swirl)])[None]  # x jumps 12 px
    assert metrics.fold_stats(folded)["count"] > 0 == metrics.fold_stats(bend)["count"]
    fixed = regularize.regularized_field(folded, tgt, tgt, 32.0, loose, window)
    assert metrics.fold_stats(fixed)["count"] == 0
    far = (slice(None), slice(None), slice(60 + 12 + reach, -reach), slice(reach, -reach))
    assert torch.allclose(fixed[far], folded[far], atol=1e-6)


@pytest.mark.parametrize("window, size, wobble_px, shut_below, shut_share",
                         [(4.0, 360, 6.0, 0.9, 0.05), (20.0, 720, 12.0, 0.92, 0.02)])
def test_a_padded_tile_gives_the_whole_image_gated_result(window, size, wobble_px, shut_below,
                                                          shut_share):
    """Also where the gate correlates on a coarser grid (window 20 px: every 2nd pixel)."""
    tgt = _texture(4, size, blur=max(2.0, window / 4))
    gen = torch.Generator().manual_seed(5)
    field = synth.elastic_field(1, size, size, std=2.0, scale=24, generator=gen)
    src, field = synth.deformed_pair(tgt, field)
    wobble = regularize._gaussian_blur(torch.randn(1, 2, size, size, generator=gen), 3.0)
    noisy = field + wobble_px * wobble  # the gate is partly open: shut in places, kept in others
    r = regularize.match_similarity(src, tgt, noisy, window)
    assert (r < shut_below).float().mean() > shut_share and (r > 0.95).float().mean() > 0.3
    assert (r < regularize.GATE[1]).float().mean() > 0.3  # and blended in places
    sigma = 12.0
    assert regularize.gate_step(window) == (1 if window < 10 else 2)
    whole = regularize.regularized_field(noisy, src, tgt, sigma, regularize.GATE, window)
    pad = regularize.support_px(sigma) + regularize.gate_support_px(window)
    multiple = regularize.grid_multiple(sigma, regularize.GATE, window)
    pad = -(-pad // multiple) * multiple  # the smoothing's and the gate's grids
    y0, x0, size = pad, pad, 48
    cut = (slice(None), slice(None), slice(y0 - pad, y0 + size + pad),
           slice(x0 - pad, x0 + size + pad))
    part = regularize.regularized_field(noisy[cut], src[cut], tgt[cut], sigma, regularize.GATE,
                                        window)[..., pad : pad + size, pad : pad + size]
    assert (part - whole[..., y0 : y0 + size, x0 : x0 + size]).abs().max() < 1e-3


@pytest.mark.parametrize("gate, words", [("0.9,0.8", "LOW < HIGH"), ("a,b", "two correlations"),
                                         ("0.5,1.5", "LOW < HIGH"), ((0.1,), "two correlations")])
def test_a_bad_gate_is_a_one_line_error(gate, words):
    with pytest.raises(MetroemError, match=words):
        regularize.check_gate(gate)


def test_gate_off_and_on_spellings():
    assert regularize.check_gate("off") is None and regularize.check_gate(None) is None
    assert regularize.check_gate("0.8,0.9") == (0.8, 0.9) == regularize.check_gate([0.8, 0.9])
    assert regularize.checked_gate_arg("OFF") == "off" and regularize.checked_gate_arg(None) is None


def test_noise_and_a_focus_difference_do_not_close_the_gate_on_the_same_section():
    """The same section imaged twice, once noisier and out of focus: the gate still keeps the
    matched field (its correlation is taken on blurred images); correlating the raw pixels,
    noise and blur alone read as other tissue and the short bend is smoothed away. (The
    texture's grain, 3 px, is that of membranes for this window: 12 px for 80 nm.)"""
    tgt = _texture(9, 256, blur=3.0)
    gen = torch.Generator().manual_seed(10)
    bend = synth.elastic_field(1, 256, 256, std=2.0, scale=24, generator=gen)
    src, field = synth.deformed_pair(tgt, bend)
    src = regularize._gaussian_blur(src, 1.0) + 20 * torch.randn(src.shape, generator=gen)
    window = 12.0
    r_raw = regularize.match_similarity(src, tgt, field, window, blur_px=0.0)
    r = regularize.match_similarity(src, tgt, field, window)
    inner = (slice(None), slice(None), slice(40, -40), slice(40, -40))
    assert r_raw[inner].median() < regularize.GATE[0] < regularize.GATE[1] < r[inner].median()
    kept = regularize.regularized_field(field, src, tgt, 32.0, regularize.GATE, window)
    plain = regularize.regularized_field(field, src, tgt, 32.0, None, window)
    assert (kept - field)[inner].norm(dim=1).median() < 0.05 < (plain - field)[inner].norm(
        dim=1).median()


def test_shading_does_not_close_the_gate_on_the_same_section():
    """The same section under a gain that rises by 80 % across the image (uneven
    illumination): within each window the correlation is taken after each image's plane is
    taken out, so it stays that of a copy and the short bend is kept; the same ramp on
    another section's image does not make it look alike."""
    size = 256
    tgt = _texture(11, size, blur=3.0)
    gen = torch.Generator().manual_seed(12)
    bend = synth.elastic_field(1, size, size, std=2.0, scale=24, generator=gen)
    src, field = synth.deformed_pair(tgt, bend)
    ramp = torch.linspace(0.6, 1.4, size)[None, None, None, :]
    window = 12.0
    inner = (slice(None), slice(None), slice(40, -40), slice(40, -40))
    r = regularize.match_similarity(src * ramp, tgt, field, window)
    assert r[inner].quantile(0.05) > regularize.GATE[1]
    kept = regularize.regularized_field(field, src * ramp, tgt, 32.0, regularize.GATE, window)
    assert (kept - field)[inner].norm(dim=1).median() < 0.05
    other = regularize.match_similarity(_texture(13, size, blur=3.0) * ramp, tgt, field, window)
    assert other[inner].abs().median() < 0.3
    # a plane in x and y is all that is taken out: a gain that changes within a window
    # faster than linearly (a stripe pattern) still lowers the correlation
    stripes = 1 + 0.5 * torch.sin(torch.arange(size) / 3.0)[None, None, None, :]
    assert regularize.match_similarity(src * stripes, tgt, field, window)[inner].median() < 0.95


def test_the_gate_reads_a_uint8_target_as_its_float_values():
    """The blurred copy of a uint8 image is not rounded back to uint8 (the whole-image aligner
    passes uint8 sections, the tiler float32 windows: both must give one field)."""
    tgt = _texture(14, 96).round()
    src = _texture(15, 96).round()
    zero = torch.zeros(1, 2, 96, 96)
    as_float = regularize.match_similarity(src, tgt, zero, 6.0)
    as_uint8 = regularize.match_similarity(src.to(torch.uint8), tgt.to(torch.uint8), zero, 6.0)
    assert torch.equal(as_float, as_uint8)
