"""Pair augmentations keep ``warp_image(src, field) ~ tgt``.

Test pairs are built with a known smooth field, so before augmenting the match is near exact;
each augmentation must keep it near exact (a wrong field update would not).
"""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import isbi_section

from metroem import augment as A
from metroem import fields
from metroem.errors import MetroemError
from metroem.synth import DeformationSpec, random_field

TOL = 0.025  # relative mean |warp(src, field) - tgt| after augmenting (before: ~0.008)
WRONG = 0.04  # a wrong field is at least this far off


def smooth_image(n: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Random smooth positive image with features ~6 px and a no-data corner."""
    coarse = torch.rand(n, 1, h // 6 + 3, w // 6 + 3, generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    img = 0.2 + 0.8 * (img - img.amin()) / (img.amax() - img.amin())
    img[..., :8, :12] = 0
    return img


def make_pair(img: torch.Tensor, seed: int = 0, agg: bool = False) -> dict:
    """``tgt = img``, ``src = warp(img, d)``, ``field = invert(d)`` for a random smooth d."""
    n, _, h, w = img.shape
    g = torch.Generator().manual_seed(seed)
    spec = DeformationSpec(translation=3, rotation_deg=2, elastic=1.5, elastic_scale=24)
    d = random_field(n, h, w, spec, generator=g)
    batch = {"src": fields.warp_image(img, d), "tgt": img, "field": fields.invert(d)}
    if agg:  # an aggregate field that already aligns the pair fully
        batch["src_agg_field"] = batch["field"].clone()
    return batch


@pytest.fixture
def pair() -> dict:
    return make_pair(smooth_image(2, 48, 80, torch.Generator().manual_seed(0)), agg=True)


def mismatch(batch: dict, field: torch.Tensor | None = None, margin: int = 10) -> float:
    """Relative mean |warp(src, field) - tgt| over interior pixels valid in both, defects out."""
    f = batch["field"] if field is None else field
    warped, tgt = fields.warp_image(batch["src"], f), batch["tgt"]
    valid = (warped > 0) & (tgt > 0)
    if "src_defects" in batch:
        valid &= fields.warp_image(batch["src_defects"].float(), f) == 0
    if "tgt_defects" in batch:
        valid &= ~batch["tgt_defects"]
    inner = torch.zeros_like(valid)
    inner[..., margin:-margin, margin:-margin] = True
    valid &= inner
    assert valid.float().mean() > 0.1, "too few pixels left to compare"
    return ((warped - tgt).abs()[valid].mean() / tgt[valid].mean()).item()


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def strong_d(batch: dict, seed: int = 5) -> torch.Tensor:
    n, _, h, w = batch["src"].shape
    spec = DeformationSpec(translation=4, rotation_deg=3, elastic=2, elastic_scale=24)
    return random_field(n, h, w, spec, generator=gen(seed))


def test_test_pair_is_consistent_and_the_metric_can_fail(pair):
    assert mismatch(pair) < 0.015
    assert mismatch(pair, field=torch.zeros_like(pair["field"])) > 0.1


GEOMETRIC = {
    "transpose": A.transpose,
    "flip_x": lambda b: A.flip(b, "x"),
    "flip_y": lambda b: A.flip(b, "y"),
    "rot90_1": lambda b: A.rot90(b, 1),
    "rot90_2": lambda b: A.rot90(b, 2),
    "rot90_3": lambda b: A.rot90(b, 3),
    "swap": A.swap,
    "warp_source": lambda b: A.warp_source(b, strong_d(b)),
    "warp_target": lambda b: A.warp_target(b, strong_d(b)),
    "random_warp_source": lambda b: A.random_warp_source(
        b, DeformationSpec(translation=4, rotation_deg=2, elastic=2, elastic_scale=24), gen()
    ),
}


@pytest.mark.parametrize("name", list(GEOMETRIC))
def test_geometric_augmentations_keep_field_and_agg_field_consistent(pair, name):
    out = GEOMETRIC[name](pair)
    assert mismatch(out) < TOL
    assert mismatch(out, field=out["src_agg_field"]) < TOL
    # inputs are not modified
    assert torch.equal(pair["field"], pair["src_agg_field"])


def test_transpose_twice_is_identity(pair):
    out = A.transpose(A.transpose(pair))
    assert out["src"].shape == pair["src"].shape
    for key in pair:
        assert torch.equal(out[key], pair[key]), key


def test_transpose_swaps_axes_and_field_channels(pair):
    out = A.transpose(pair)
    assert out["src"].shape == (2, 1, 80, 48)
    assert torch.equal(out["field"][:, 0], pair["field"][:, 1].transpose(-1, -2))


@pytest.mark.parametrize("axis", ["x", "y"])
def test_flip_on_non_square_needs_the_sign_change(pair, axis):
    out = A.flip(pair, axis)
    assert mismatch(out) < TOL
    dim = -1 if axis == "x" else -2
    unsigned = pair["field"].flip(dim)  # grid flipped but component not negated
    assert mismatch(out, field=unsigned) > WRONG
    assert all(torch.equal(v, pair[k]) for k, v in A.flip(out, axis).items())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_matches_torch_rot90_and_four_turns_are_identity(pair, k):
    out = A.rot90(pair, k)
    assert torch.equal(out["src"], torch.rot90(pair["src"], k, dims=(-2, -1)))
    back = A.rot90(A.rot90(A.rot90(A.rot90(pair, k), k), k), k)
    assert all(torch.equal(v, pair[k2]) for k2, v in back.items())


def test_swap_twice_is_near_identity(pair):
    out = A.swap(A.swap(pair))
    assert torch.equal(out["src"], pair["src"]) and torch.equal(out["tgt"], pair["tgt"])
    inner = (..., slice(6, -6), slice(6, -6))
    assert (out["field"] - pair["field"])[inner].abs().max() < 0.05
    assert not torch.equal(A.swap(pair)["field"], -pair["field"])  # a real inverse, not -f


def test_swap_without_field_and_with_defects():
    img = smooth_image(1, 32, 32, gen(0))
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[..., 3, 3] = True
    out = A.swap({"src": img, "tgt": img * 0.5, "src_defects": mask})
    assert torch.equal(out["tgt"], img) and torch.equal(out["src"], img * 0.5)
    assert "field" not in out
    assert torch.equal(out["tgt_defects"], mask) and not out["src_defects"].any()


def test_source_warp_field_update_is_compose_invert_d_then_field(pair):
    d = strong_d(pair)
    out = A.warp_source(pair, d)
    good = mismatch(out)
    assert good < TOL
    assert torch.allclose(out["field"], fields.compose(fields.invert(d), pair["field"]))
    wrong_order = fields.compose(pair["field"], fields.invert(d))
    assert mismatch(out, field=wrong_order) > max(WRONG, 2 * good)
    assert mismatch(out, field=pair["field"]) > 0.1


def test_same_section_pair_has_ground_truth_field(pair):
    spec = DeformationSpec(translation=5, rotation_deg=2, elastic=2, elastic_scale=24)
    out = A.same_section_pair(pair, spec, gen())
    assert torch.equal(out["tgt"], pair["tgt"])
    assert mismatch(out) < TOL
    assert mismatch(out, field=torch.zeros_like(out["field"])) > 0.1
    assert not out["src_agg_field"].any()


def test_intensity_keeps_no_data_and_validity():
    img = smooth_image(3, 40, 40, gen(0))
    out = A.adjust_intensity(
        img, brightness=0.5, contrast=0.5, gamma=0.5, noise=0.3, generator=gen()
    )
    assert torch.equal(out == 0, img == 0)
    assert (out[img != 0] > 0).all()
    assert not torch.allclose(out, img)


def test_shading_is_a_plane_of_gain_and_drawn_only_when_asked():
    """Uneven illumination: each image is multiplied by its own gain plane (out / in is
    linear in x and y, at most 1 +- shading * sqrt(2), not the same for two items); no-data
    stays 0; without shading the random stream, hence the output, is as before."""
    img = smooth_image(4, 48, 64, gen(1)) + 0.5
    img[0, :, :5, :] = 0  # no data along one edge
    out = A.adjust_intensity(img, shading=0.5, generator=gen(2))
    assert torch.equal(out == 0, img == 0)
    ratio = out / img.where(img != 0, torch.ones_like(img))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 64), indexing="ij")
    design = torch.stack([torch.ones_like(xx), xx, yy], -1).reshape(-1, 3)
    slopes = []
    for i in range(4):
        valid = (img[i, 0] != 0).reshape(-1)
        y = ratio[i, 0].reshape(-1)[valid]
        coef = torch.linalg.lstsq(design[valid], y[:, None]).solution[:, 0]
        assert (design[valid] @ coef - y).abs().max() < 1e-4  # a plane, exactly
        assert abs(coef[0] - 1) < 1e-4 and coef[1:].norm() <= 0.5 + 1e-4
        slopes.append(coef[1:])
    assert (slopes[0] - slopes[1]).norm() > 1e-3
    plain = dict(brightness=0.1, contrast=0.2, gamma=0.2, noise=0.05)
    a = A.adjust_intensity(img, **plain, generator=gen(3))
    b = A.adjust_intensity(img, **plain, shading=0.0, generator=gen(3))
    assert torch.equal(a, b)
    with pytest.raises(MetroemError, match="shading"):
        A.build_augment({"intensity": {"shading": 1.5}})


def test_intensity_keeps_the_pair_aligned(pair):
    aug = A.build_augment(
        {
            k: {"p": 0.0}
            for k in ("warp", "swap", "transpose", "flip_x", "flip_y", "holes", "folds", "cracks")
        }
        | {"intensity": {"p": 1.0, "brightness": 0.2, "contrast": 0.3, "gamma": 0.3, "noise": 0}}
    )
    out = aug(pair, gen())
    assert torch.equal(out["field"], pair["field"])
    assert not torch.allclose(out["src"], pair["src"])
    warped = fields.warp_image(out["src"], out["field"])[..., 10:-10, 10:-10]
    tgt = out["tgt"][..., 10:-10, 10:-10]
    for i in range(len(tgt)):  # each image gets its own monotone intensity map
        both = (warped[i] > 0) & (tgt[i] > 0)
        a, b = warped[i][both].numpy(), tgt[i][both].numpy()
        assert np.corrcoef(a, b)[0, 1] > 0.95
        assert abs(np.corrcoef(a, b[::-1])[0, 1]) < 0.5  # unrelated pixels do not correlate


DEFECTS = {
    "holes": lambda b, s: A.add_defect(b, s, A.holes_mask(2, 48, 80, 3, 8.0, gen(), b["src"])),
    "crack": lambda b, s: A.add_crack(b, s, 2.0, gen()),
    "fold_flat": lambda b, s: A.add_fold(b, s, 4.0, 0.0, gen()),
}


@pytest.mark.parametrize("side", ["src", "tgt"])
@pytest.mark.parametrize("name", list(DEFECTS))
def test_defects_only_zero_pixels_and_return_the_mask(pair, name, side):
    out = DEFECTS[name](pair, side)
    other = "tgt" if side == "src" else "src"
    mask = out[f"{side}_defects"]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 48, 80)
    assert mask.any() and not mask.all()
    changed = out[side] != pair[side]
    assert torch.equal(changed, mask & (pair[side] != 0))
    assert (out[side][mask] == 0).all()
    assert torch.equal(out[other], pair[other]) and f"{other}_defects" not in out
    assert torch.equal(out["field"], pair["field"])
    assert mismatch(out) < TOL


@pytest.mark.parametrize("side", ["src", "tgt"])
def test_fold_with_displaced_tissue_updates_the_field(pair, side):
    out = A.add_fold(pair, side, 3.0, 6.0, gen(2))
    assert out[f"{side}_defects"].any()
    assert mismatch(out) < TOL
    assert mismatch(out, field=out["src_agg_field"]) < TOL
    assert mismatch(out, field=pair["field"]) > WRONG


def everything_on() -> dict:
    groups = ("warp", "swap", "transpose", "flip_x", "flip_y", "rot90", "holes", "folds", "cracks")
    return {g: {"p": 1.0} for g in groups} | {"intensity": {"p": 0.0}}


@pytest.mark.parametrize("seed", range(3))
def test_pipeline_with_everything_on_stays_consistent(pair, seed):
    out = A.build_augment(everything_on())(pair, gen(seed))
    assert {"src_defects", "tgt_defects"} <= out.keys()
    assert mismatch(out) < TOL


def test_pipeline_mixing_items_stays_consistent():
    batch = make_pair(smooth_image(4, 48, 48, gen(0)), agg=True)
    section = {g: {"p": 0.5} for g in ("warp", "swap", "flip_x", "holes", "folds")}
    aug = A.build_augment(section | {"intensity": {"p": 0.0}})
    synth = A.build_augment({"same_section": {"p": 0.5}, "intensity": {"p": 0.0}})
    for seed in range(3):
        out = aug(batch, gen(seed))
        assert out["src"].shape == batch["src"].shape
        assert mismatch(out) < TOL
        assert mismatch(out, field=out["src_agg_field"]) < TOL
        assert mismatch(synth(batch, gen(seed))) < TOL


def test_pipeline_on_a_self_supervised_batch():
    img = smooth_image(2, 32, 48, gen(0))
    out = A.build_augment({})({"src": img, "tgt": img.clone()}, gen())
    assert "field" not in out and out["src"].shape[0] == 2
    synth = A.build_augment({"same_section": {"p": 1.0}})({"src": img, "tgt": img}, gen())
    assert synth["field"].shape == (2, 2) + tuple(synth["src"].shape[-2:])


def test_pipeline_on_an_isbi_section():
    from PIL import Image

    raw = torch.from_numpy(np.array(Image.open(isbi_section(0)))).float()[None, None]
    img = fields.downsample_image(raw, 2)[..., :96, :]  # MIP 2, 96 x 128
    batch = make_pair(img, seed=3)
    before = mismatch(batch)
    out = A.build_augment(everything_on())(batch, gen(4))
    assert mismatch(out) < max(2.5 * before, TOL)
    assert mismatch(out, field=torch.zeros_like(out["field"])) > 3 * mismatch(out)


def test_seeded_generator_reproduces_and_seeds_differ(pair):
    aug = A.build_augment(everything_on() | {"intensity": {"p": 1.0}})
    a, b, c = aug(pair, gen(7)), aug(pair, gen(7)), aug(pair, gen(8))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["src"], c["src"])


def test_defaults_validate_and_partial_sections_merge():
    cfg = A.validate({"swap": {"p": 1}})
    assert cfg["swap"]["p"] == 1 and cfg["warp"] == A.DEFAULTS["warp"]
    assert A.validate(None) == A.DEFAULTS


@pytest.mark.parametrize(
    "section, key",
    [
        ({"mixup": {"p": 0.5}}, "augment.mixup"),
        ({"warp": {"rotation": 1}}, "augment.warp.rotation"),
        ({"swap": {"p": 1.5}}, "augment.swap.p"),
        ({"swap": {"p": -0.1}}, "augment.swap.p"),
        ({"warp": {"translation": -2}}, "augment.warp.translation"),
        ({"holes": {"radius": "big"}}, "augment.holes.radius"),
        ({"holes": {"count": 2.5}}, "augment.holes.count"),
        ({"folds": {"on": "left"}}, "augment.folds.on"),
        ({"intensity": {"contrast": 1.0}}, "augment.intensity.contrast"),
        ({"flip_x": {"p": True}}, "augment.flip_x.p"),
        ({"flip_x": 0.5}, "augment.flip_x"),
    ],
)
def test_config_errors_name_the_key(section, key):
    with pytest.raises(MetroemError, match=key.replace(".", r"\.")) as e:
        A.build_augment(section)
    assert "\n" not in str(e.value)


def test_unknown_spatial_batch_key_is_refused(pair):
    with pytest.raises(ValueError, match="src_mask"):
        A.flip(pair | {"src_mask": torch.ones(2, 1, 48, 80)}, "x")
