"""Synthetic deformations (metroem/synth.py): magnitudes, reproducibility, ground truth."""

from __future__ import annotations

import math

import numpy as np
import torch
from helpers import isbi_section
from PIL import Image

from metroem import fields, synth


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_translation_only_is_constant_and_within_bounds():
    spec = synth.DeformationSpec(translation=5.0)
    f = synth.random_field(16, 20, 30, spec, generator=gen(0))
    assert f.shape == (16, 2, 20, 30)
    per_item = f.flatten(2)
    assert torch.allclose(per_item.max(-1).values, per_item.min(-1).values, atol=1e-4)
    assert f.abs().max() <= 5.0 + 1e-4
    assert f.abs().max() > 2.0  # 16 draws use the range, not a tiny corner of it


def test_affine_field_known_matrix_at_corner():
    h, w = 21, 31
    a = torch.tensor([[[1.02, 0.01], [-0.03, 0.98]]])
    t = torch.tensor([[1.5, -2.0]])
    f = synth.affine_field(a, t, h, w)
    corner = torch.tensor([-(w - 1) / 2, -(h - 1) / 2])  # pixel (0, 0) relative to the centre
    expect = (a[0] - torch.eye(2)) @ corner + t[0]
    assert torch.allclose(f[0, :, 0, 0], expect, atol=1e-5)
    # At the centre only the translation remains.
    assert torch.allclose(f[0, :, h // 2, w // 2], t[0], atol=1e-5)
    # Pull semantics: the image is sampled at A (p - c) + c + t.
    far = torch.tensor([w - 1 - (w - 1) / 2, h - 1 - (h - 1) / 2])
    assert torch.allclose(f[0, :, -1, -1], (a[0] - torch.eye(2)) @ far + t[0], atol=1e-5)


def test_random_rotation_magnitude():
    h = w = 101
    spec = synth.DeformationSpec(rotation_deg=2.0)
    f = synth.random_field(8, h, w, spec, generator=gen(1))
    # Displacement at radius r from the centre is 2 r sin(angle / 2) <= r * angle.
    r = (w - 1) / 2
    corner_mag = f[:, :, h // 2, -1].norm(dim=1)
    assert (corner_mag <= r * math.radians(2.0) + 1e-3).all()
    assert corner_mag.max() > 0.2 * r * math.radians(2.0)
    assert f[:, :, h // 2, w // 2].abs().max() < 1e-4  # rotation about the centre


def test_elastic_std_and_smoothness():
    spec = synth.DeformationSpec(elastic=3.0, elastic_scale=32.0)
    f = synth.random_field(4, 128, 96, spec, generator=gen(2))
    std = f.flatten(1).std(dim=1)
    assert torch.allclose(std, torch.full_like(std, 3.0), rtol=0.05)
    # Smooth: neighbours differ by about std / elastic_scale (white noise would give ~std).
    step_x = (f[..., 1:] - f[..., :-1]).abs().max()
    step_y = (f[..., 1:, :] - f[..., :-1, :]).abs().max()
    assert max(step_x, step_y) < 8 * 3.0 / 32.0


def test_moderate_deformations_are_fold_free():
    spec = synth.DeformationSpec(
        translation=20, rotation_deg=2, scale=0.02, shear=0.02, elastic=2, elastic_scale=64
    )
    f = synth.random_field(6, 160, 200, spec, generator=gen(3))
    jac = fields.jacobian_determinant(f)
    assert jac.min() > 0.5 and jac.max() < 1.5


def test_seeded_generator_is_reproducible():
    spec = synth.DeformationSpec(translation=3, rotation_deg=1, scale=0.01, elastic=2)
    a = synth.random_field(3, 40, 50, spec, generator=gen(7))
    b = synth.random_field(3, 40, 50, spec, generator=gen(7))
    c = synth.random_field(3, 40, 50, spec, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_zero_spec_is_identity():
    f = synth.random_field(2, 10, 12, synth.DeformationSpec(), generator=gen(0))
    assert torch.allclose(f, torch.zeros_like(f), atol=1e-5)


def test_deformed_pair_ground_truth_aligns_source():
    img = torch.from_numpy(np.array(Image.open(isbi_section(5)))[:256, :320].copy())
    img = img.float().view(1, 1, 256, 320)
    spec = synth.DeformationSpec(
        translation=6, rotation_deg=1.5, scale=0.02, shear=0.01, elastic=2, elastic_scale=64
    )
    d = synth.random_field(1, 256, 320, spec, generator=gen(4))
    src, gt = synth.deformed_pair(img, d)
    assert src.shape == img.shape and gt.shape == d.shape
    m = 24
    aligned = fields.warp_image(src, gt)[..., m:-m, m:-m]
    target = img[..., m:-m, m:-m]
    mse_aligned = ((aligned - target) ** 2).mean()
    mse_raw = ((src[..., m:-m, m:-m] - target) ** 2).mean()
    assert mse_aligned < 0.15 * mse_raw
    # The ground truth undoes the deformation as a field too.
    assert fields.compose(d, gt)[..., m:-m, m:-m].abs().max() < 0.05
