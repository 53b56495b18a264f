"""Loss weight masks: no-data, thresholds, rings, warped source masks, config errors."""

from __future__ import annotations

import pytest
import torch

from metroem import fields, masks
from metroem.errors import MetroemError


def _images(n=1, h=20, w=20):
    return torch.rand(n, 1, h, w) + 0.5, torch.rand(n, 1, h, w) + 0.5


def test_all_valid_gives_ones():
    src, tgt = _images(2)
    out = masks.build_masks(None, src, tgt, fields.identity(2, 20, 20))
    assert torch.equal(out["sim_weight"], torch.ones(2, 1, 20, 20))
    assert torch.equal(out["smooth_weight"], torch.ones(2, 1, 20, 20))


def test_nodata_pixels_excluded_from_similarity_small_weight_for_smoothness():
    src, tgt = _images()
    tgt[..., 5, 7] = 0
    out = masks.build_masks(
        {"smoothness_nodata_weight": 0.25}, src, tgt, fields.identity(1, 20, 20)
    )
    assert out["sim_weight"][0, 0, 5, 7] == 0 and out["sim_weight"].sum() == 20 * 20 - 1
    assert out["smooth_weight"][0, 0, 5, 7] == 0.25


def test_value_thresholds_binarise():
    src, tgt = _images()
    tgt[..., 0, 0] = 0.1  # below valid_min
    tgt[..., 0, 1] = 9.0  # above valid_max
    cfg = {"valid_min": 0.2, "valid_max": 5.0}
    out = masks.build_masks(cfg, src, tgt, fields.identity(1, 20, 20))
    assert out["sim_weight"][0, 0, 0, :3].tolist() == [0.0, 0.0, 1.0]


def test_rings_weight_by_distance_to_bad_pixels():
    src, tgt = _images(h=21, w=21)
    tgt[..., 10, 10] = 0
    cfg = {"similarity_rings": [[4, 0.8], [2, 0.5]], "smoothness_rings": [[1, 3.0]]}
    out = masks.build_masks(cfg, src, tgt, fields.identity(1, 21, 21))
    row = out["sim_weight"][0, 0, 10].tolist()
    # columns 4..16: distance 6,5 -> 1; 4,3 -> 0.8; 2,1 -> 0.5; 0 -> 0
    assert row[4:17] == pytest.approx([1, 1, 0.8, 0.8, 0.5, 0.5, 0, 0.5, 0.5, 0.8, 0.8, 1, 1])
    assert out["sim_weight"][0, 0, 7, 12].item() == pytest.approx(0.8)  # square (Chebyshev) rings
    smooth = out["smooth_weight"][0, 0, 10, 8:13].tolist()
    assert smooth == pytest.approx([1.0, 3.0, 0.1, 3.0, 1.0])


def test_source_nodata_and_masks_follow_the_field():
    src, tgt = _images()
    src[..., :, :3] = 0  # source has no data in columns 0..2
    src_mask = torch.zeros(1, 1, 20, 20)
    src_mask[..., 10, 12] = 1  # a defect in the source at (y=10, x=12)
    shift = torch.zeros(1, 2, 20, 20)
    shift[:, 0] = 2.0  # pull from x + 2
    out = masks.build_masks(None, src, tgt, shift, src_mask=src_mask)
    sim = out["sim_weight"][0, 0]
    assert sim[:, :1].sum() == 0 and sim[:, 1:18].sum() == 20 * 17 - 1  # no data moves left
    assert sim[10, 10] == 0 and sim[10, 12] == 1  # the defect moves left by 2
    assert sim[:, 18:].sum() == 0  # pulled from outside the source


def test_target_mask_and_threshold():
    src, tgt = _images()
    tgt_mask = torch.zeros(1, 1, 20, 20)
    tgt_mask[..., 3, 3] = 0.4
    tgt_mask[..., 4, 4] = 0.9
    out = masks.build_masks(
        {"mask_threshold": 0.5}, src, tgt, fields.identity(1, 20, 20), None, tgt_mask
    )
    assert out["sim_weight"][0, 0, 3, 3] == 1 and out["sim_weight"][0, 0, 4, 4] == 0


def test_defects_free_the_smoothness_no_data_keeps_a_little():
    """Issue 14: across a fold the field may jump, so a defect mask takes the smoothness term
    off its pixels (``smoothness_defect_weight``, default 0); no data keeps its small weight."""
    src, tgt = _images()
    tgt[..., 2, 2] = 0
    tgt_mask = torch.zeros(1, 1, 20, 20)
    tgt_mask[..., 8, :] = 1  # a fold line across the target
    out = masks.build_masks(None, src, tgt, fields.identity(1, 20, 20), None, tgt_mask)
    assert torch.all(out["smooth_weight"][0, 0, 8] == 0)
    assert out["smooth_weight"][0, 0, 2, 2] == masks.DEFAULTS["smoothness_nodata_weight"] > 0
    assert torch.all(out["sim_weight"][0, 0, 8] == 0)
    kept = masks.build_masks({"smoothness_defect_weight": 0.5}, src, tgt,
                             fields.identity(1, 20, 20), None, tgt_mask)
    assert torch.all(kept["smooth_weight"][0, 0, 8] == 0.5)


def test_masks_carry_no_gradient():
    src, tgt = _images()
    field = torch.zeros(1, 2, 20, 20, requires_grad=True)
    out = masks.build_masks(None, src, tgt, field)
    assert not out["sim_weight"].requires_grad and not out["smooth_weight"].requires_grad


@pytest.mark.parametrize(
    "section, key",
    [
        ({"rings": []}, "rings"),
        ({"similarity_rings": [[0, 0.5]]}, "similarity_rings"),
        ({"smoothness_rings": [[2]]}, "smoothness_rings"),
        ({"smoothness_nodata_weight": -1}, "smoothness_nodata_weight"),
        ({"valid_min": "low"}, "valid_min"),
    ],
)
def test_bad_config_names_the_key(section, key):
    with pytest.raises(MetroemError, match=rf"masks\.{key}"):
        masks.resolve(section)
