"""Evaluation metrics on cases whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import isbi_section

from metroem import fields, synth
from metroem.eval import metrics


def _section(z: int = 0, size: int = 128) -> torch.Tensor:
    from PIL import Image

    a = np.asarray(Image.open(isbi_section(z)), dtype=np.float32)[:size, :size]
    return torch.from_numpy(np.maximum(a, 1.0))


def _const(h: int, w: int, dx: float, dy: float) -> torch.Tensor:
    f = torch.zeros(1, 2, h, w)
    f[:, 0], f[:, 1] = dx, dy
    return f


def test_epe_stats_constant_error_and_mask():
    gt = synth.random_field(1, 32, 40, synth.DeformationSpec(translation=5, elastic=2))
    field = gt + _const(32, 40, 3.0, 4.0)
    s = metrics.epe_stats(field, gt)
    for key in ("median", "p95", "max", "mean"):
        assert s[key] == pytest.approx(5.0, abs=1e-4)
    assert s["pixels"] == 32 * 40
    # A big error outside the mask must not count; inside it must.
    field[:, :, :8] += 100.0
    mask = torch.ones(32, 40, dtype=torch.bool)
    mask[:8] = False
    assert metrics.epe_stats(field, gt, mask)["max"] == pytest.approx(5.0, abs=1e-4)
    assert metrics.epe_stats(field, gt)["max"] > 100.0
    assert metrics.epe_stats(field, gt, mask)["pixels"] == 24 * 40


def test_epe_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        metrics.epe_stats(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 9))


def test_integer_shift_method_is_exact_and_fold_free():
    """Phase correlation on a pure integer shift: exact EPE, zero folds, zero roughness."""
    from metroem.eval import baselines

    tgt = _section(size=128)
    gt = _const(128, 128, 3.0, -5.0)
    src = fields.warp_image(tgt[None, None], -gt)[0, 0]  # src(p) = tgt(p - (3, -5)), exact
    field = baselines.align("phasecorr", src, tgt)
    inner = metrics.valid_after_warp(src, gt, margin=2)
    assert metrics.epe_stats(field, gt, inner)["max"] < 1e-3
    folds = metrics.fold_stats(field)
    assert folds["count"] == 0 and folds["fraction"] == 0.0
    assert metrics.roughness(field) < 1e-6
    warped = fields.warp_image(src[None, None], field)
    assert metrics.residual(warped, tgt, inner)["ncc"] > 0.9999


def _smooth_image(size: int = 96) -> torch.Tensor:
    """A smooth textured image (bilinear warps of it are accurate), values >= 1."""
    gen = torch.Generator().manual_seed(3)
    coarse = torch.rand(1, 1, size // 8, size // 8, generator=gen)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic")
    return 20 + 200 * (img - img.min()) / (img.max() - img.min())


def test_equivariance_target_direction():
    """warp(S', compose(h, f0)) reproduces T; the other composition order does not."""
    size = 96
    s_img = _smooth_image(size)
    gen = torch.Generator().manual_seed(5)
    # f0 aligns S to T by construction: T = warp(S, f0).
    f0 = synth.random_field(1, size, size, synth.DeformationSpec(rotation_deg=6, translation=3),
                            generator=torch.Generator().manual_seed(4))
    t_img = fields.warp_image(s_img, f0)
    spec = synth.DeformationSpec(translation=4, rotation_deg=8, elastic=1.5, elastic_scale=32)
    d = synth.random_field(1, size, size, spec, generator=gen)
    s_def, h = synth.deformed_pair(s_img, d)

    expected = metrics.equivariance_target(f0, h)
    wrong = fields.compose(f0, h)
    inner = torch.zeros(size, size, dtype=torch.bool)
    inner[20:-20, 20:-20] = True

    def image_err(field):
        return float((fields.warp_image(s_def, field) - t_img)[0, 0][inner].abs().mean())

    assert image_err(expected) < 1.0  # grey levels out of ~200: bilinear resampling only
    assert image_err(wrong) > 4 * image_err(expected)
    assert metrics.equivariance_epe(expected, f0, h, inner)["max"] == pytest.approx(0, abs=1e-5)
    assert metrics.epe_stats(wrong, expected, inner)["median"] > 0.25


def test_equivariance_of_exact_method_is_zero():
    """An integer-shift method on integer-shifted pairs: its equivariance EPE is exactly 0."""
    from metroem.eval import baselines

    def integer_shift(src, tgt):
        dx, dy = baselines.phase_translation(src, tgt)
        return _const(*src.shape, round(dx), round(dy))[0].numpy()

    sec, nbr = _section(1, 128), _section(0, 128)
    d = _const(128, 128, -6.0, 4.0)
    s_def, h = synth.deformed_pair(sec[None, None], d)
    f0 = baselines.align(integer_shift, sec, nbr)
    f1 = baselines.align(integer_shift, s_def, nbr)
    assert metrics.equivariance_epe(f1, f0, h)["max"] < 1e-4
    # The identity method ignores the deformation and scores the deformation size.
    zero = torch.zeros(1, 2, 128, 128)
    assert metrics.equivariance_epe(zero, zero, h)["median"] == pytest.approx(
        math.hypot(6, 4), abs=1e-3
    )


def test_chunked_pearson_known_correlations():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 96, generator=gen) + 10
    r_same = metrics.chunked_pearson(a, 3 * a + 7, chunk=32)
    assert r_same.shape == (2, 3)
    assert torch.allclose(r_same, torch.ones(2, 3), atol=1e-5)
    r_flip = metrics.chunked_pearson(a, 30 - a, chunk=32)
    assert torch.allclose(r_flip, -torch.ones(2, 3), atol=1e-5)
    # b = cos(t) z_a + sin(t) z_n has correlation ~cos(t) with a, per block of 1024 pixels.
    noise = torch.randn(64, 96, generator=gen)
    b = math.cos(1.0) * (a - 10) + math.sin(1.0) * noise + 10
    assert torch.allclose(metrics.chunked_pearson(a, b, 32), torch.full((2, 3), math.cos(1.0)),
                          atol=0.08)


def test_chunked_pearson_ignores_no_data():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(64, 64, generator=gen) + 1
    b = a.clone()
    b[:32, :32] = 0  # block (0, 0) has no data in b
    b[32:, :20] = 0  # block (1, 0): 12/32 columns valid (< half)
    b[:32, 32:40] = 0  # block (0, 1): 24/32 valid, still a perfect match where valid
    b[:32, 40:] = 50 - a[:32, 40:]
    r = metrics.chunked_pearson(a, b, chunk=32, min_valid=0.5)
    assert torch.isnan(r[0, 0]) and torch.isnan(r[1, 0])
    assert r[0, 1] == pytest.approx(-1.0, abs=1e-5)
    assert r[1, 1] == pytest.approx(1.0, abs=1e-5)


def test_pearson_summary():
    r = torch.tensor([[1.0, 0.2], [math.nan, 0.5]])
    s = metrics.pearson_summary(r, low=0.3)
    assert s["blocks"] == 3
    assert s["mean"] == pytest.approx(1.7 / 3)
    assert s["median"] == pytest.approx(0.5)
    assert s["frac_low"] == pytest.approx(1 / 3)
    assert math.isnan(metrics.pearson_summary(torch.full((2, 2), math.nan))["mean"])


def test_fold_stats_counts_flipped_region():
    field = torch.zeros(1, 2, 20, 30)
    xs = torch.arange(30, dtype=torch.float32)
    field[:, 0, :, 10:20] = -2 * xs[10:20]  # p_x + u = -p_x: orientation flips (det = -1)
    folds = metrics.fold_stats(field)
    # det grid is (19, 29). Differences 10->11 .. 18->19 lie inside the flip (det -1) and the
    # jump 9->10 (u: 0 -> -20) folds too; the jump 19->20 (u: -38 -> 0) stretches (det > 0).
    assert folds["count"] == 19 * 10
    assert folds["fraction"] == pytest.approx(10 / 29)
    assert folds["min_det"] < 0
    mask = torch.zeros(20, 30)
    mask[:, :9] = 1  # the difference 9->10 belongs to column 9
    assert metrics.fold_stats(field, mask)["count"] == 0


def test_roughness_zero_for_affine_and_known_for_noise():
    affine = synth.random_field(1, 64, 64, synth.DeformationSpec(rotation_deg=10, scale=0.1))
    assert metrics.roughness(affine) < 1e-4
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 2, 256, 256, generator=gen) * 0.5
    # The 5-point Laplacian of i.i.d. noise has variance 20 s^2 per channel.
    assert metrics.roughness(noise) == pytest.approx(math.sqrt(2 * 20) * 0.5, rel=0.03)


def test_residual_mse_and_ncc():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(32, 32, generator=gen) + 1
    r = metrics.residual(a, a)
    assert r["mse"] == 0.0 and r["ncc"] == pytest.approx(1.0)
    b = 2 * a + 3
    r = metrics.residual(a, b)
    assert r["ncc"] == pytest.approx(1.0, abs=1e-6)
    assert r["mse"] == pytest.approx(float(((a + 3) ** 2).mean()), rel=1e-5)
    c = a.clone()
    c[:16] = 0  # no data: excluded
    assert metrics.residual(c, a)["pixels"] == 16 * 32


def test_valid_after_warp_drops_pixels_pulled_from_outside():
    img = torch.ones(40, 50)
    ok = metrics.valid_after_warp(img, _const(40, 50, 10.0, 0.0))
    assert ok[:, :40].all() and not ok[:, 40:].any()
    ok = metrics.valid_after_warp(img, _const(40, 50, 0.0, 0.0), margin=3)
    assert int(ok.sum()) == (40 - 6) * (50 - 6)


def test_strain_zero_for_rigid_and_known_for_stretch():
    h, w = 40, 50
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    a = math.radians(10)
    # rotation by 10 degrees about the centre plus a translation: lengths are kept
    cx, cy = (w - 1) / 2, (h - 1) / 2
    rx = math.cos(a) * (xx - cx) - math.sin(a) * (yy - cy) + cx + 3.0
    ry = math.sin(a) * (xx - cx) + math.cos(a) * (yy - cy) + cy - 2.0
    rigid = torch.stack((rx - xx, ry - yy))
    assert metrics.strain_stats(rigid)["max"] < 1e-5  # float32 fields
    stretch = torch.stack((0.05 * xx, torch.zeros_like(yy)))  # x stretched by 5 %
    s = metrics.strain_stats(stretch)
    assert abs(s["median"] - 0.05) < 1e-6 and abs(s["max"] - 0.05) < 1e-6
    mask = torch.zeros(h, w, dtype=torch.bool)
    assert metrics.strain_stats(stretch, mask)["pixels"] == 0


# --- affine fit, morph (non-affine part) and gradient norm --------------------------------------


def _affine_field(h: int = 64, w: int = 80):
    from metroem import synth

    m = torch.tensor([[[1.02, 0.03], [-0.01, 0.97]]])
    return synth.affine_field(m, torch.tensor([[5.0, -3.0]]), h, w)


def test_affine_fit_recovers_an_affine_field_and_the_morph_of_it_is_zero():
    aff = _affine_field()
    assert (metrics.affine_fit(aff) - aff).abs().max() < 1e-4
    assert metrics.nonaffine_stats(aff)["max"] < 1e-4


def test_nonaffine_part_measures_a_known_bump():
    """A centred 2 px bump on a quarter of the pixels: by symmetry the fit takes its mean
    (0.5 px) and no slope, so 1.5 px are left inside it and 0.5 px outside."""
    aff = _affine_field(64, 64)
    bump = torch.zeros(1, 2, 64, 64)
    bump[:, 0, 16:48, 16:48] = 2.0
    stats = metrics.nonaffine_stats(aff + bump)
    assert abs(stats["max"] - 1.5) < 1e-4 and abs(stats["median"] - 0.5) < 1e-4
    assert abs(stats["mean"] - 0.75) < 1e-4
    # within the bump alone the field is affine: nothing is left
    assert metrics.nonaffine_stats(aff + bump, mask=bump[0, 0] > 0)["max"] < 1e-4


def test_nonaffine_ignores_pixels_outside_the_mask():
    aff = _affine_field(64, 64)
    wild = aff.clone()
    wild[:, :, :8] += 30.0
    mask = metrics.interior_mask((64, 64), 10)
    assert metrics.nonaffine_stats(wild, mask)["max"] < 1e-4
    assert metrics.interior_mask((10, 10), 5).sum() == 0


def test_gradient_norm_of_a_translation_is_zero_and_of_a_rotation_is_known():
    from metroem import synth

    shift = torch.zeros(1, 2, 32, 32)
    shift[:, 0], shift[:, 1] = 3.5, -2.0
    assert metrics.gradient_norm_stats(shift)["max"] < 1e-9
    a = math.radians(3)
    rot = torch.tensor([[[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]])
    f = synth.affine_field(rot, torch.zeros(1, 2), 32, 32)
    expected = math.sqrt(4 - 4 * math.cos(a))  # |R - I|_F
    assert abs(metrics.gradient_norm_stats(f)["median"] - expected) < 1e-5


def test_affine_fit_needs_three_pixels():
    with pytest.raises(ValueError, match="3 pixels"):
        metrics.affine_fit(torch.zeros(1, 2, 8, 8), mask=torch.zeros(8, 8))
