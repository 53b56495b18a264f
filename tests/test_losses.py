"""Loss terms: invariances, masking, folds, supervision and the config-built loss_fn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from metroem import fields, losses, synth
from metroem.errors import MetroemError
from metroem.sample_data import isbi_section


def _isbi(i: int, size: int = 64) -> torch.Tensor:
    img = np.array(Image.open(isbi_section(i)))[:size, :size]
    return torch.from_numpy(img).float()[None, None]


def _affine(n: int, h: int, w: int, angle_deg, scale=(1.0, 1.0), shear=0.0, t=(0.0, 0.0)):
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    mat = rot @ torch.tensor([[1.0, shear], [0.0, 1.0]]) @ torch.diag(torch.tensor(scale))
    return synth.affine_field(mat.expand(n, 2, 2), torch.tensor(t).expand(n, 2), h, w)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("angle", [0.0, 3.0, 30.0, 90.0, -45.0])
def test_rigidity_zero_for_rotations_and_translations(n, angle):
    f = _affine(n, 17, 23, angle, t=(2.5, -7.0))
    assert losses.rigidity(f) < 1e-9
    assert losses.rigidity(f, torch.rand(n, 1, 17, 23)) < 1e-9


@pytest.mark.parametrize("n", [1, 3])
def test_rigidity_positive_for_stretch_and_shear(n):
    stretch = losses.rigidity(_affine(n, 16, 16, 10.0, scale=(1.1, 1.0)))
    shear = losses.rigidity(_affine(n, 16, 16, 0.0, shear=0.1))
    assert stretch > 1e-4 and shear > 1e-5
    assert losses.rigidity(_affine(n, 16, 16, 0.0, scale=(1.2, 1.0))) > stretch  # grows


def test_laplacian_zero_for_affine_positive_for_elastic():
    f = _affine(2, 20, 20, 12.0, scale=(1.1, 0.9), shear=0.2, t=(3.0, 1.0))
    assert losses.laplacian(f) < 1e-8
    g = torch.Generator().manual_seed(0)
    assert losses.laplacian(synth.elastic_field(2, 20, 20, 2.0, 5.0, generator=g)) > 1e-3


def test_total_variation_zero_for_constant_and_counts_steps():
    assert losses.total_variation(torch.full((2, 2, 8, 9), 3.0)) == 0
    step = torch.zeros(1, 2, 8, 8)
    step[:, 0, :, 4:] = 1.0  # one unit jump along x in channel 0, on every row
    expected = 8 / (8 * 7)  # 8 jumps over 8 * 7 x-differences; y differences are 0
    assert math.isclose(losses.total_variation(step).item(), expected, rel_tol=1e-6)


def test_fold_penalty_zero_for_identity_positive_for_fold():
    assert losses.fold_penalty(fields.identity(2, 10, 10)) == 0
    folded = _affine(1, 10, 10, 0.0, scale=(-0.5, 1.0))  # x mirrored: det J = -0.5
    assert losses.fold_penalty(folded, margin=0.1) == pytest.approx((0.1 + 0.5) ** 2)


def test_mse_zero_when_aligned_and_ignores_masked_pixels():
    img = _isbi(0)
    assert losses.mse(img, img.clone()) == 0
    other = img.clone()
    other[..., :10, :] = 0
    weight = torch.ones_like(img)
    weight[..., :10, :] = 0
    assert losses.mse(img, other, weight) == 0
    assert losses.mse(img, other) > 0


def test_ncc_invariant_to_affine_intensity_and_penalises_misalignment():
    a, b = _isbi(0), _isbi(1)
    base = losses.local_ncc(a, b, window=9)
    assert losses.local_ncc(a, 2.5 * b + 7.0, window=9) == pytest.approx(base.item(), abs=1e-4)
    assert losses.local_ncc(a, 0.5 * a + 1.0, window=7) < 1e-3
    assert base > 0.1  # consecutive sections differ


def test_epe_equals_constant_offset():
    gt = torch.randn(3, 2, 12, 12)
    field = gt + torch.tensor([3.0, -4.0]).view(1, 2, 1, 1)
    mean, median = losses.epe(field, gt)
    assert mean == pytest.approx(5.0, rel=1e-5) and median == pytest.approx(5.0, rel=1e-5)


def test_loss_fn_terms_and_weights():
    img = _isbi(0)
    loss_fn = losses.build_loss({"smoothness_weight": 2.0, "fold_weight": 0.0})
    zero = fields.identity(1, 64, 64)
    total, terms = loss_fn(img, img, zero)
    assert set(terms) == {"similarity", "smoothness"}
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    f = _affine(1, 64, 64, 0.0, scale=(1.05, 1.0))
    total, terms = loss_fn(img, img, f)
    expected = terms["similarity"] + 2.0 * terms["smoothness"]
    assert terms["similarity"] > 0 and total.item() == pytest.approx(expected.item())


def test_loss_fn_aligned_by_known_field_and_supervised_terms():
    img = _isbi(2)
    d = _affine(1, 64, 64, 0.0, t=(3.0, -2.0))
    src = fields.warp_image(img, d)  # src(p) = img(p + (3, -2)) -> aligning field is -d
    section = {"supervised_weight": 1.0, "smoothness": "laplacian", "normalize": False}
    loss_fn = losses.build_loss(section)
    total, terms = loss_fn(src, img, -d, gt_field=-d)
    assert terms["similarity"] < 1e-8 and terms["smoothness"] < 1e-8
    # Normalising each image over its own valid pixels shifts the statistics slightly.
    assert losses.build_loss({"normalize": True})(src, img, -d)[1]["similarity"] < 1e-3
    assert terms["supervised"] < 1e-5 and terms["epe_median"] < 1e-5
    _, wrong = loss_fn(src, img, fields.identity(1, 64, 64), gt_field=-d)
    assert wrong["similarity"] > 0.1 and wrong["epe"] == pytest.approx(math.hypot(3, 2), 1e-4)


def test_loss_fn_gradient_and_batch_sizes():
    loss_fn = losses.build_loss({"similarity": "ncc", "ncc_window": 5})
    for n in (1, 4):
        src, tgt = torch.rand(n, 1, 20, 24) + 0.1, torch.rand(n, 1, 20, 24) + 0.1
        field = torch.zeros(n, 2, 20, 24, requires_grad=True)
        total, _ = loss_fn(src, tgt, field)
        total.backward()
        assert torch.isfinite(field.grad).all() and field.grad.abs().sum() > 0


def test_loss_fn_all_no_data_is_finite():
    loss_fn = losses.build_loss()
    field = torch.zeros(2, 2, 8, 8, requires_grad=True)
    total, terms = loss_fn(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), field)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(field.grad).all()


def test_loss_fn_uses_given_weights():
    a, b = _isbi(0, 32), _isbi(5, 32)
    loss_fn = losses.build_loss({"smoothness": "none", "fold_weight": 0.0})
    zero = fields.identity(1, 32, 32)
    w = torch.zeros(1, 1, 32, 32)
    total, _ = loss_fn(a, b, zero, sim_weight=w, smooth_weight=w)
    assert total == 0
    assert loss_fn(a, b, zero)[0] > 0


@pytest.mark.parametrize(
    "section, key",
    [
        ({"similarty": "mse"}, "similarty"),
        ({"similarity": "l1"}, "similarity"),
        ({"ncc_window": 8}, "ncc_window"),
        ({"smoothness_weight": -1}, "smoothness_weight"),
        ({"smoothness": "elastic"}, "smoothness"),
        ({"fold_margin": 2}, "fold_margin"),
    ],
)
def test_bad_config_names_the_key(section, key):
    with pytest.raises(MetroemError, match=rf"loss\.{key}"):
        losses.build_loss(section)


def test_supervised_weight_without_gt_is_a_clear_error():
    loss_fn = losses.build_loss({"supervised_weight": 1.0})
    with pytest.raises(MetroemError, match="supervised_weight"):
        loss_fn(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8))
