"""Loss terms: invariances, masking, folds, supervision and the config-built loss_fn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import isbi_section
from PIL import Image

from metroem import config as config_mod
from metroem import fields, losses, nets, synth
from metroem.errors import MetroemError


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
        ({"embedding_weight": -0.1}, "embedding_weight"),
        ({"embedding_margin": 0}, "embedding_margin"),
        ({"embedding_margin": 2.5}, "embedding_margin"),
        ({"embedding_radius": 0}, "embedding_radius"),
        ({"embedding_radius": 1.5}, "embedding_radius"),
        ({"embedding_levels": [0, 1]}, "embedding_levels"),
        ({"embedding_levels": 2}, "embedding_levels"),
        ({"embedding_field": "gt"}, "embedding_field"),
    ],
)
def test_bad_config_names_the_key(section, key):
    with pytest.raises(MetroemError, match=rf"loss\.{key}"):
        losses.build_loss(section)


def test_supervised_weight_without_gt_is_a_clear_error():
    loss_fn = losses.build_loss({"supervised_weight": 1.0})
    with pytest.raises(MetroemError, match="supervised_weight"):
        loss_fn(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.zeros(1, 2, 8, 8))


# --- embedding (metric-learning) term ---------------------------------------------------------

_EMB_ONLY = {"embedding_weight": 1.0, "similarity": "none", "smoothness": "none",
             "fold_weight": 0.0}


def _tiled_features(n: int, h: int, w: int) -> torch.Tensor:
    """One-hot features whose channel is (y mod 3, x mod 3): any two pixels at most 2 apart in
    x and y differ (distance sqrt 2 between unit vectors), equal pixels agree."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return F.one_hot(3 * (y % 3) + x % 3, 9).permute(2, 0, 1).float().expand(n, 9, h, w).clone()


def _translation(n: int, h: int, w: int, tx: float, ty: float) -> torch.Tensor:
    return torch.tensor([tx, ty]).view(1, 2, 1, 1).expand(n, 2, h, w).contiguous()


def _interior(n: int, h: int, w: int, border: int = 4) -> torch.Tensor:
    weight = torch.zeros(n, 1, h, w)
    weight[..., border:-border, border:-border] = 1
    return weight


def _contrast_pair():
    """Source features and target = source pulled by an integer translation (true field)."""
    src = _tiled_features(2, 24, 30)
    true = _translation(2, 24, 30, 2.0, -1.0)
    return src, fields.warp(src, true), true


@pytest.mark.parametrize("radius", [1, 2])
def test_feature_contrast_zero_under_true_field_and_larger_under_wrong(radius):
    src, tgt, true = _contrast_pair()
    weight = _interior(2, 24, 30)
    at_truth = losses.feature_contrast(src, tgt, true, weight, margin=1.0, radius=radius)
    assert at_truth < 1e-6
    for wrong in ((0.0, 0.0), (3.0, -1.0), (2.5, -1.0), (2.0, 0.0)):
        f = _translation(2, 24, 30, *wrong)
        assert losses.feature_contrast(src, tgt, f, weight, 1.0, radius) > 0.2, wrong
    # features that cannot tell neighbours apart are pushed: the loss is positive even aligned
    flat = torch.ones_like(src)
    pushed = losses.feature_contrast(flat, flat, true, weight, 1.0, radius)
    assert pushed == pytest.approx(1.0, 1e-3)


def test_feature_contrast_ignores_masked_pixels():
    src, tgt, true = _contrast_pair()
    weight = _interior(2, 24, 30)
    weight[..., 8:14, 10:20] = 0
    clean = losses.feature_contrast(src, tgt, true, weight)
    g = torch.Generator().manual_seed(3)
    noisy_src = src.clone().requires_grad_(False)
    noisy_tgt = tgt.clone()
    noisy_tgt[..., 8:14, 10:20] = torch.randn(2, 9, 6, 10, generator=g)
    # the source pixels that land there: target p pulls source p + (2, -1)
    noisy_src[..., 7:13, 12:22] = torch.randn(2, 9, 6, 10, generator=g)
    noisy_tgt.requires_grad_(True)
    noisy = losses.feature_contrast(noisy_src, noisy_tgt, true, weight)
    assert noisy.item() == pytest.approx(clean.item(), abs=1e-7)
    noisy.backward()
    assert noisy_tgt.grad[..., 8:14, 10:20].abs().max() == 0
    # without the hole in the weights the noise does count
    assert losses.feature_contrast(noisy_src, noisy_tgt, true, _interior(2, 24, 30)) > clean + 0.05
    # nothing weighted: 0, finite
    assert losses.feature_contrast(src, tgt, true, torch.zeros_like(weight)) == 0


def test_embedding_loss_levels_downsample_field_and_weights():
    src = _tiled_features(1, 24, 32)
    true = _translation(1, 24, 32, 3.0, 0.0)  # stage pixels: level 1 sees 1.5, level 2 sees 0.75
    feats_s = [src[:, :1], fields.downsample_image(src, 1, masked=False)]
    feats_t = [f.clone() for f in feats_s]
    feats_s.append(fields.downsample_image(src, 2, masked=False))
    feats_t.append(feats_s[2].clone())
    # level 2 features of the target = level 2 source features moved by the level-2 field
    lv2 = fields.downsample_field(true, 2)
    feats_t[2] = fields.warp(feats_s[2], lv2)
    weight = _interior(1, 24, 32, border=8)
    only2 = losses.embedding_loss(feats_s, feats_t, true, weight, levels=[2])
    assert only2 == pytest.approx(
        losses.feature_contrast(feats_s[2], feats_t[2], lv2, _min_pool_4(weight)).item()
    )
    with pytest.raises(MetroemError, match=r"loss\.embedding_levels.*1\.\.2"):
        losses.embedding_loss(feats_s, feats_t, true, weight, levels=[3])


def _min_pool_4(weight: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-weight, 4)


def _isbi_pair(n: int = 2, size: int = 64):
    """Consecutive ISBI sections as sources and a smooth deformation of each as its target;
    ``gt`` aligns source to target."""
    img = torch.cat([_isbi(2 * i, size) for i in range(n)])
    g = torch.Generator().manual_seed(0)
    gt = synth.elastic_field(n, size, size, 2.0, 8.0, generator=g)
    gt = gt + torch.tensor([2.5, -1.5]).view(1, 2, 1, 1)
    return img, fields.warp_image(img, gt), gt


def _tiny_model():
    torch.manual_seed(0)
    return nets.build_model(nets.default_spec(channels=[4, 8, 8], head_channels=4,
                                              local_radius=1))


def test_embedding_gradients_reach_the_encoder_and_training_separates_fields():
    src, tgt, gt = _isbi_pair()
    model = _tiny_model()
    loss_fn = losses.build_loss(_EMB_ONLY)
    pred = model(src, tgt)
    total, terms = loss_fn(src, tgt, pred, gt_field=gt, features=model.pair_features)
    assert set(terms) == {"embedding", "epe", "epe_median"} and torch.isfinite(total)
    total.backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.heads.named_parameters():  # the field is detached: heads untouched
        assert p.grad is None or p.grad.abs().sum() == 0, name
    # the term alone trains the encoder towards features that single out the true field
    opt = torch.optim.Adam(model.encoder.parameters(), 3e-3)
    first = float(terms["embedding"].detach())
    for _ in range(25):
        total, terms = loss_fn(src, tgt, gt, gt_field=gt, features=model.pair_features)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(terms["embedding"].detach()) < 0.7 * first
    with torch.no_grad():
        at_truth = loss_fn(src, tgt, gt, gt_field=gt, features=model.pair_features)[1]
        off = gt + torch.tensor([2.0, 2.0]).view(1, 2, 1, 1)
        at_wrong = loss_fn(src, tgt, off, gt_field=off, features=model.pair_features)[1]
    assert at_wrong["embedding"] > at_truth["embedding"] + 0.1


def test_embedding_field_choice():
    src, tgt, gt = _isbi_pair(1)
    model = _tiny_model()
    wrong = torch.zeros_like(gt, requires_grad=True)
    feats = model.pair_features

    def term(section, field, gt_field=None):
        return losses.build_loss({**_EMB_ONLY, **section})(
            src, tgt, field, gt_field=gt_field, features=feats
        )[1].get("embedding")

    with torch.no_grad():
        by_truth = term({}, gt, gt)
        assert term({}, wrong, gt) == pytest.approx(float(by_truth))  # auto: truth wins
        assert term({"embedding_field": "predicted"}, wrong, gt) > by_truth + 0.01
        assert term({"embedding_field": "truth"}, wrong) is None  # no truth: left out
        assert term({}, gt) == pytest.approx(float(by_truth), abs=1e-4)  # detached prediction
    total, terms = losses.build_loss(_EMB_ONLY)(src, tgt, wrong, features=feats)
    total.backward()
    assert wrong.grad is None  # the predicted field only says what corresponds


def test_embedding_off_by_default_and_needs_features():
    src, tgt, gt = _isbi_pair(1, 32)
    _, terms = losses.build_loss()(src, tgt, gt)  # no features needed when off
    assert "embedding" not in terms
    assert losses.resolve(None)["embedding_weight"] == 0
    with pytest.raises(ValueError, match="pair_features"):
        losses.build_loss({"embedding_weight": 0.5})(src, tgt, gt)


def test_embedding_keys_in_the_config_schema():
    cfg = config_mod.load_config("scratch", None, [
        "loss.embedding_weight=0.2", "loss.embedding_levels=[2, 1]", "loss.embedding_margin=1",
    ])
    assert cfg["loss"]["embedding_weight"] == 0.2 and cfg["loss"]["embedding_levels"] == [2, 1]
    assert cfg["loss"]["embedding_field"] == "auto"
    for bad, key in (("loss.embedding_radius=0", "embedding_radius"),
                     ("loss.embedding_weight=-1", "embedding_weight"),
                     ("loss.embedding_levels=3", "embedding_levels")):
        with pytest.raises(MetroemError, match=rf"loss\.{key}"):
            config_mod.load_config("scratch", None, [bad])
    losses.check_embedding_levels({"embedding_weight": 1.0, "embedding_levels": [3]}, 4)
    with pytest.raises(MetroemError, match=r"loss\.embedding_levels: \[4\].*1\.\.3"):
        losses.check_embedding_levels({"embedding_weight": 1.0, "embedding_levels": [4]}, 4)
    losses.check_embedding_levels({"embedding_levels": [4]}, 4)  # off: not checked


@pytest.mark.usefixtures("one_thread")
def test_tiny_training_run_logs_the_embedding_term(tiny_run):
    from conftest import MIPS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metroem.training import cli

    argv = tiny_run.argv("emb", "--train_stages", "0", "--no_redirect_stdout",
                         "--set", "loss.embedding_weight=0.5")
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code)
    assert code == 0
    acc = EventAccumulator(str(tiny_run.pyramid / "_runs" / "emb" / f"stage0_mip{MIPS[0]}"),
                           size_guidance={"scalars": 0})
    acc.Reload()
    train = acc.Scalars("train/embedding")
    assert [e.step for e in train] == [2, 4, 6]
    assert all(math.isfinite(e.value) and e.value > 0 for e in train)
    assert all(math.isfinite(e.value) for e in acc.Scalars("val/embedding"))
    assert all(torch.isfinite(v).all() for v in tiny_run.weights(0, "emb").values())
