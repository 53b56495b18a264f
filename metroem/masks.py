"""Loss weight masks: which pixels the similarity and the smoothness terms look at.

Everything lives on the target grid (where the field lives). A pixel is *bad* when the target
has no data there, when the source warped by the field has no data there, or when a given
defect mask (target mask, or source mask warped by the field) marks it. Then:

* ``sim_weight`` is 0 on bad pixels, a ring weight near them and 1 elsewhere;
* ``smooth_weight`` is ``smoothness_nodata_weight`` on bad pixels (the field is still kept
  smooth where there is nothing to align), a ring weight near them and 1 elsewhere; on
  pixels a defect mask marks it is ``smoothness_defect_weight`` (default 0: across a fold the
  field may jump).

Rings coarsen the bad region: ``[[2, 0.5], [4, 0.8]]`` gives weight 0.5 to pixels within 2 px
(square neighbourhood) of a bad pixel and 0.8 to those within 4 px; the smallest ring wins.
Masks carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metroem import config, fields

Tensor = torch.Tensor

DEFAULTS: dict = {
    "valid_min": None,  # image values below this also count as no data (0 always does)
    "valid_max": None,  # image values above this also count as no data
    "mask_threshold": 0.5,  # a defect mask marks a pixel when its value is above this
    "similarity_rings": [],  # [[radius_px, weight], ...] around bad pixels, similarity term
    "smoothness_rings": [],  # the same for the smoothness term
    "smoothness_nodata_weight": 0.1,  # smoothness weight on pixels without data
    "smoothness_defect_weight": 0.0,  # smoothness weight on defect-mask pixels (folds may jump)
}


def resolve(section: dict | None) -> dict:
    """Defaults merged with ``section`` and checked by :func:`metroem.config.check_section`
    (the rules live in config.py); raises a one-line MetroemError naming a bad key."""
    out = config.check_section("masks", section)
    for key in ("similarity_rings", "smoothness_rings"):
        out[key] = [[int(r), float(w)] for r, w in out[key]]
    return out


def valid_mask(img: Tensor, section: dict | None = None) -> Tensor:
    """1.0 where ``img`` has data (nonzero and inside the optional value range), else 0.0."""
    cfg = resolve(section)
    x = img.detach().float()
    valid = x != 0
    if cfg["valid_min"] is not None:
        valid &= x >= cfg["valid_min"]
    if cfg["valid_max"] is not None:
        valid &= x <= cfg["valid_max"]
    return valid.float()


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of a ``(N, 1, H, W)`` mask by a ``(2r+1)^2`` square."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius)


def warp_mask(mask: Tensor, field: Tensor, threshold: float = 0.5) -> Tensor:
    """Warp a source mask onto the target grid (border padding) and binarise it (> threshold)."""
    return (fields.warp_field(mask.float(), field) > threshold).float()


def ring_weights(bad: Tensor, rings: list[list], bad_weight: float) -> Tensor:
    """Weight map: ``bad_weight`` on bad pixels, ring weights near them, 1 elsewhere."""
    weight = torch.ones_like(bad, dtype=torch.float32)
    for radius, w in sorted(rings, key=lambda r: -r[0]):  # smaller rings overwrite larger
        weight = torch.where(dilate(bad, radius) > 0, torch.full_like(weight, w), weight)
    return torch.where(bad > 0, torch.full_like(weight, bad_weight), weight)


def build_masks(
    section: dict | None,
    src: Tensor,
    tgt: Tensor,
    field: Tensor,
    src_mask: Tensor | None = None,
    tgt_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weights ``{"sim_weight", "smooth_weight"}``, each ``(N, 1, H, W)`` on the target grid.

    ``src`` and ``tgt`` are ``(N, 1, H, W)`` images (0 = no data); ``field`` the pull field that
    warps ``src`` onto ``tgt``; ``src_mask`` / ``tgt_mask`` optional defect masks (nonzero above
    ``mask_threshold`` = exclude), the source one warped by the field.
    """
    cfg = resolve(section)
    with torch.no_grad():
        f = field.detach().float()
        # A warped pixel has data only if all its bilinear neighbours do.
        src_ok = fields.warp_image(valid_mask(src, cfg), f) > 0.999
        good = src_ok & (valid_mask(tgt, cfg) > 0)
        defect = torch.zeros_like(good)
        if src_mask is not None:
            defect |= warp_mask(src_mask, f, cfg["mask_threshold"]) > 0
        if tgt_mask is not None:
            defect |= tgt_mask.detach().float() > cfg["mask_threshold"]
        bad = (~good | defect).float()
        sim = ring_weights(bad, cfg["similarity_rings"], 0.0)
        smooth = ring_weights(bad, cfg["smoothness_rings"], cfg["smoothness_nodata_weight"])
        smooth = torch.where(defect, torch.full_like(smooth, cfg["smoothness_defect_weight"]),
                             smooth)
    return {"sim_weight": sim, "smooth_weight": smooth}
