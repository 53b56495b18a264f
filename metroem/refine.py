"""Online refinement: improve one pair's field by optimising the field itself.

Starting from the network's field, a displacement update is optimised with Adam on the pair's
similarity (masked MSE or local NCC of the normalised images) plus smoothness (rigidity or
Laplacian) and a fold penalty, from coarse to fine: at level ``l`` the images are downsampled
``2^l`` times and the update lives on that grid, which widens the capture range and keeps
updates smooth. The learning rate (pixels of the level per step) follows a cosine schedule at
every level.

Masks: pixels without data (0) in either image, and pixels under the defect masks, take no part
in the similarity; the smoothness there is weighted by ``smoothness_nodata_weight`` (a small
weight keeps the field tame where nothing can be matched); the fold penalty applies everywhere.
A result that folds (Jacobian determinant <= 0 where the starting field had none) is pulled back
towards the starting field until it does not, so refinement never introduces folds.

Option names follow the training loss config (:data:`metroem.losses.DEFAULTS`,
:data:`metroem.masks.DEFAULTS`): ``similarity`` and ``smoothness`` name the kind of term,
``*_weight`` its weight. (Refinement is per-pair and online; continuing to train a network's
weights is ``train.py --train_mode finetune``.)
"""

from __future__ import annotations

import math

import torch

from metroem import fields, losses, masks
from metroem.errors import MetroemError
from metroem.nets import normalize_image

Tensor = torch.Tensor

__all__ = ["refine_field", "DEFAULTS"]

DEFAULTS: dict = {
    "steps": 60,  # optimisation steps per level
    "levels": 3,  # coarse-to-fine levels: images downsampled 2^(levels-1) ... 1 times
    "lr": 0.3,  # Adam learning rate, pixels of the level per step, cosine-decayed to lr / 20
    "similarity": "mse",  # mse | ncc
    "smoothness": "rigidity",  # rigidity | laplacian
    "smoothness_weight": 3.0,  # weight of the smoothness term (the data term alone overfits noise)
    "fold_weight": 10.0,  # weight of relu(0.1 - det J)^2
    "smoothness_nodata_weight": 0.1,  # smoothness weight where there is no data or a defect
}

# Option names of earlier versions -> the name now (a number for ``smoothness`` was its weight).
RENAMED = {
    "iterations": "steps",
    "smoothness_kind": "smoothness",
    "nodata_smoothness": "smoothness_nodata_weight",
}


def _check(options: dict) -> dict:
    for old, new in RENAMED.items():
        if old in options:
            raise MetroemError(f"refine option {old} is now {new}")
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise MetroemError(
            f"unknown refine option(s) {', '.join(sorted(unknown))}; known: "
            f"{', '.join(sorted(DEFAULTS))}"
        )
    cfg = {**DEFAULTS, **options}
    if isinstance(cfg["smoothness"], (int, float)) and not isinstance(cfg["smoothness"], bool):
        raise MetroemError("refine option smoothness is the kind (rigidity or laplacian); its "
                           "weight is smoothness_weight")
    if not (isinstance(cfg["steps"], int) and cfg["steps"] >= 0):
        raise MetroemError(f"refine steps must be an int >= 0, got {cfg['steps']!r}")
    if not (isinstance(cfg["levels"], int) and cfg["levels"] >= 1):
        raise MetroemError(f"refine levels must be an int >= 1, got {cfg['levels']!r}")
    if cfg["similarity"] not in ("mse", "ncc"):
        raise MetroemError(f"refine similarity must be mse or ncc, got {cfg['similarity']!r}")
    if cfg["smoothness"] not in ("rigidity", "laplacian"):
        raise MetroemError("refine smoothness must be rigidity or laplacian")
    for key in ("lr", "smoothness_weight", "fold_weight", "smoothness_nodata_weight"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] < 0:
            raise MetroemError(f"refine {key} must be a number >= 0, got {cfg[key]!r}")
    return cfg


def _down_mask(mask: Tensor | None, level: int) -> Tensor | None:
    if mask is None or level == 0:
        return mask
    return torch.nn.functional.max_pool2d(mask.float(), 2**level, ceil_mode=True)


def _level_loss(cfg, src, tgt, field, src_mask, tgt_mask, mask_cfg) -> Tensor:
    w = masks.build_masks(mask_cfg, src, tgt, field, src_mask, tgt_mask)
    s, t = normalize_image(src)[0], normalize_image(tgt)[0]
    warped = fields.warp_image(s, field)
    if cfg["similarity"] == "mse":
        sim = losses.mse(warped, t, w["sim_weight"])
    else:
        sim = losses.local_ncc(warped, t, w["sim_weight"])
    smooth = losses.SMOOTHNESS_FNS[cfg["smoothness"]](field, w["smooth_weight"])
    fold = losses.fold_penalty(field, None)
    return sim + cfg["smoothness_weight"] * smooth + cfg["fold_weight"] * fold


def _min_det(field: Tensor) -> Tensor:
    """Smallest Jacobian determinant per item, ``(N,)`` (inf for fields under 2x2 pixels)."""
    if field.shape[-1] < 2 or field.shape[-2] < 2:
        return torch.full((field.shape[0],), math.inf, device=field.device)
    return fields.jacobian_determinant(field).flatten(1).amin(1)


# Blend factors tried, largest first: a fine ladder, so one nearly folded pixel costs a little of
# the refinement rather than half of it.
_BLEND = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)


def _unfold(start: Tensor, result: Tensor) -> Tensor:
    """``start + t (result - start)`` with the largest t in ``_BLEND`` that adds no fold."""
    floor = torch.minimum(_min_det(start), torch.zeros(()))  # a folded start is not made worse
    out = result.clone()
    for i in range(start.shape[0]):
        for t in _BLEND:
            cand = start[i : i + 1] + t * (result[i : i + 1] - start[i : i + 1])
            if _min_det(cand)[0] > floor[i]:
                out[i : i + 1] = cand
                break
        else:
            out[i : i + 1] = start[i : i + 1]
    return out


def refine_field(
    src_img: Tensor,
    tgt_img: Tensor,
    field: Tensor,
    src_mask: Tensor | None = None,
    tgt_mask: Tensor | None = None,
    **options,
) -> Tensor:
    """Refine ``field`` (pixels, pull, ``(N, 2, H, W)``) aligning ``src_img`` to ``tgt_img``.

    Images are ``(N, 1, H, W)`` raw values (0 = no data); masks ``(N, 1, H, W)``, nonzero marks
    a defect to ignore. Options (see ``DEFAULTS``): ``steps`` per level, ``levels``, ``lr``,
    ``similarity``, ``smoothness`` (the kind), ``smoothness_weight``, ``fold_weight``,
    ``smoothness_nodata_weight``. Returns a new field on the same device, without gradient.
    """
    cfg = _check(options)
    fields.check_field(field)
    start = field.detach().float()
    src = src_img.detach().float()
    tgt = tgt_img.detach().float()
    if cfg["steps"] == 0 or not (src.ne(0).any() and tgt.ne(0).any()):
        return start.clone()
    mask_cfg = {"smoothness_nodata_weight": float(cfg["smoothness_nodata_weight"])}
    h, w = start.shape[-2:]
    current = start.clone()
    with torch.enable_grad():
        for level in range(cfg["levels"] - 1, -1, -1):
            k = 2**level
            if h // k < 4 or w // k < 4:
                continue
            ph, pw = (-h) % k, (-w) % k  # pad so the level grid covers the image exactly
            pad = (0, pw, 0, ph)
            s = fields.downsample_image(torch.nn.functional.pad(src, pad), level)
            t = fields.downsample_image(torch.nn.functional.pad(tgt, pad), level)
            base = fields.downsample_field(
                torch.nn.functional.pad(current, pad, mode="replicate"), level
            )
            sm = _down_mask(None if src_mask is None else torch.nn.functional.pad(
                src_mask.float(), pad), level)
            tm = _down_mask(None if tgt_mask is None else torch.nn.functional.pad(
                tgt_mask.float(), pad), level)
            delta = torch.zeros_like(base, requires_grad=True)
            opt = torch.optim.Adam([delta], lr=cfg["lr"])
            n_it = cfg["steps"]
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i, n=n_it: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / n))
            )
            for _ in range(n_it):
                opt.zero_grad(set_to_none=True)
                loss = _level_loss(cfg, s, t, base + delta, sm, tm, mask_cfg)
                loss.backward()
                opt.step()
                sched.step()
            up = fields.upsample_field(delta.detach(), level, size=(h + ph, w + pw))
            current = current + up[..., :h, :w]
    return _unfold(start, current).detach()
