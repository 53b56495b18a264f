"""Online refinement (metroem.refine): improves end-point error on the demo volume, never
folds, respects masks."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_pyramid

from metroem import demo_volume, fields, inference, losses, nets, refine, volumes
from metroem.aligner import PyramidAligner, load_aligner
from metroem.errors import MetroemError
from metroem.refine import refine_field


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """A demo pair (observed section 1 onto 0) at MIP0 with its ground-truth field."""
    out = tmp_path_factory.mktemp("demo") / "vol"
    vol = demo_volume.build_demo_volume(out, num_sections=2, size=128, num_mips=1, drift=6.0,
                                        elastic=2.0, rotation_deg=0.5, seed=3)
    src = volumes.read(vol.image_path, 0, 0, 0, 1, 128)
    tgt = volumes.read(vol.image_path, 0, 0, 0, 0, 128)
    gt = demo_volume.pair_ground_truth(vol.field_path, 0, 0, 0, 1, 128)
    return src, tgt, gt


def tissue(src, tgt, gt):
    return ((tgt != 0) & (fields.warp_image(src, gt) != 0)).float()


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyr") / "pyramid"
    return tiny_pyramid(root, nets.default_spec(levels=4, channels=[4, 8, 8]))


def test_refinement_improves_epe_without_folds(demo_pair, untrained):
    src, tgt, gt = demo_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained modules warn
        al = load_aligner(untrained)
    w = tissue(src, tgt, gt)
    net = al(src, tgt)
    tuned = load_aligner(untrained, refine=True)(src, tgt)
    before = losses.epe(net, gt, w)[0].item()
    after = losses.epe(tuned, gt, w)[0].item()
    assert losses.epe(torch.zeros_like(gt), gt, w)[0] > 3.0  # the pair really is misaligned
    assert after < before - 0.3
    assert fields.jacobian_determinant(tuned).min() > 0
    assert not tuned.requires_grad and tuned.shape == net.shape
    # starting from nothing (identity) it improves too
    zero = torch.zeros_like(gt)
    assert losses.epe(refine_field(src, tgt, zero), gt, w)[0] < losses.epe(zero, gt, w)[0]


def test_no_folds_even_with_aggressive_settings(demo_pair):
    src, tgt, _ = demo_pair
    out = refine_field(src, tgt, torch.zeros(1, 2, 128, 128), lr=3.0, smoothness_weight=0.0,
                       fold_weight=0.0, steps=40)
    assert fields.jacobian_determinant(out).min() > 0


def test_masked_target_pixels_do_not_matter(demo_pair):
    src, tgt, _ = demo_pair
    mask = torch.zeros_like(tgt)
    mask[..., 32:64, 48:96] = 1
    # permute target values inside every 4x4 block of the masked region: image statistics and
    # block averages (all levels) stay the same, only the masked pixels change
    block = tgt[..., 32:64, 48:96].reshape(1, 1, 8, 4, 12, 4)
    shuffled = block.flip(3).flip(5).reshape(1, 1, 32, 48)
    other = tgt.clone()
    other[..., 32:64, 48:96] = shuffled
    assert not torch.equal(other, tgt)
    # the objective (and its gradient) refinement follows ignores the masked target pixels
    cfg = refine._check({})
    field = (0.3 * torch.randn(1, 2, 128, 128)).requires_grad_()

    def value_and_grad(target, m):
        field.grad = None
        loss = refine._level_loss(cfg, src, target, field, None, m, {})
        loss.backward()
        return loss.item(), field.grad.clone()

    la, ga = value_and_grad(tgt, mask)
    lb, gb = value_and_grad(other, mask)
    lc, gc = value_and_grad(other, None)
    assert abs(la - lb) < 1e-5 and torch.allclose(ga, gb, atol=1e-7)
    assert abs(la - lc) > 1e-4  # without the mask those pixels count
    # and the whole run respects a source defect mask as well
    out = refine_field(src, tgt, torch.zeros(1, 2, 128, 128), src_mask=mask, steps=5)
    assert torch.isfinite(out).all()


def test_empty_input_and_bad_options(demo_pair):
    src, tgt, gt = demo_pair
    assert torch.equal(refine_field(torch.zeros_like(src), tgt, gt), gt)
    with pytest.raises(MetroemError, match="unknown refine option"):
        refine_field(src, tgt, gt, stepz=3)
    with pytest.raises(MetroemError, match="similarity"):
        refine_field(src, tgt, gt, similarity="ssim")
    for old, new in (("iterations", "steps"), ("smoothness_kind", "smoothness"),
                     ("nodata_smoothness", "smoothness_nodata_weight")):
        with pytest.raises(MetroemError, match=f"refine option {old} is now {new}$"):
            refine_field(src, tgt, gt, **{old: 1})
    with pytest.raises(MetroemError, match="its weight is smoothness_weight"):
        refine_field(src, tgt, gt, smoothness=3.0)  # the weight's old name


def test_align_cli_refine_flag(demo_pair, untrained, tmp_path):
    import numpy as np

    src, tgt, gt = demo_pair
    np.save(tmp_path / "s.npy", src[0, 0].numpy())
    np.save(tmp_path / "t.npy", tgt[0, 0].numpy())
    base = ["--pyramid_path", str(untrained), "--src", str(tmp_path / "s.npy"), "--tgt",
            str(tmp_path / "t.npy"), "--chunk", "128", "--pad", "0", "--no_progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert inference.main([*base, "--field_out", str(tmp_path / "plain.npy")]) == 0
        assert inference.main([*base, "--field_out", str(tmp_path / "ft.npy"), "--refine",
                               "--refine_steps", "30"]) == 0
    w = tissue(src, tgt, gt)
    plain = torch.from_numpy(np.load(tmp_path / "plain.npy"))[None]
    tuned = torch.from_numpy(np.load(tmp_path / "ft.npy"))[None]
    assert losses.epe(tuned, gt, w)[0] < losses.epe(plain, gt, w)[0]
    assert isinstance(PyramidAligner, type)
