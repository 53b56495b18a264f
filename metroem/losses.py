"""Training losses for stage aligners: similarity, smoothness, folds, supervision.

Every term takes ``(N, ...)`` batches of any size and optional weight maps ``(N, 1, H, W)`` on
the target grid (see :mod:`metroem.masks`). Fields follow :mod:`metroem.fields` (pull, pixels).

* similarity (weighted mean over the weight map): :func:`mse`, :func:`local_ncc` (1 - NCC);
* smoothness (mean of weight x penalty, so a weight < 1 really relaxes it):
  :func:`rigidity` (8-neighbour springs, zero for rotations and translations),
  :func:`laplacian` (bending, zero for affine fields), :func:`total_variation`;
* :func:`fold_penalty`: ``relu(margin - det J)^2``;
* :func:`epe`: end-point error against a known field.

:func:`build_loss` turns the config section ``loss`` into ``loss_fn(src, tgt, field, ...)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metroem import fields, masks
from metroem.errors import MetroemError
from metroem.nets import normalize_image

Tensor = torch.Tensor

DEFAULTS: dict = {
    "similarity": "mse",  # mse | ncc | none
    "similarity_weight": 1.0,
    "ncc_window": 9,  # odd window side (pixels) of the local NCC
    "normalize": True,  # normalise images over valid pixels before the similarity
    "smoothness": "rigidity",  # rigidity | laplacian | tv | none
    "smoothness_weight": 1.0,
    "fold_weight": 10.0,  # weight of relu(fold_margin - det J)^2
    "fold_margin": 0.1,
    "supervised_weight": 0.0,  # weight of the mean end-point error (needs ground-truth fields)
}

SIMILARITIES = ("mse", "ncc", "none")
SMOOTHNESS = ("rigidity", "laplacian", "tv", "none")


# --------------------------------------------------------------------------------------------
# weighting helpers


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Sum(w v) / Sum(w); 0 (with a gradient path) when the weights are all 0."""
    if weight is None:
        return values.mean()
    weight = weight.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1e-8)


def _mean_of_weighted(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean(w v): weights scale the penalty in absolute terms."""
    return values.mean() if weight is None else (values * weight.expand_as(values)).mean()


def _pair(t: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """Views ``(t[p], t[p + (dy, dx)])`` over all p where both exist (``dy >= 0``)."""
    h, w = t.shape[-2:]
    a_rows, b_rows = slice(0, h - dy), slice(dy, h)
    if dx >= 0:
        a_cols, b_cols = slice(0, w - dx), slice(dx, w)
    else:
        a_cols, b_cols = slice(-dx, w), slice(0, w + dx)
    return t[..., a_rows, a_cols], t[..., b_rows, b_cols]


def _pair_weight(weight: Tensor | None, dy: int, dx: int) -> Tensor | None:
    if weight is None:
        return None
    a, b = _pair(weight, dy, dx)
    return 0.5 * (a + b)


# --------------------------------------------------------------------------------------------
# similarity


def mse(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted mean squared difference."""
    return _weighted_mean((a - b) ** 2, weight)


def local_ncc(a: Tensor, b: Tensor, weight: Tensor | None = None, window: int = 9) -> Tensor:
    """1 - weighted mean of the local normalised cross-correlation over ``window`` boxes.

    Local statistics use only weighted pixels, so no-data does not bias them. Invariant to
    ``a -> s a + c`` for ``s > 0`` (up to the small variance epsilon).
    """
    w = torch.ones_like(a) if weight is None else weight.expand_as(a).to(a.dtype)

    def box(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=True)

    wsum = box(w).clamp_min(1e-6)
    mu_a, mu_b = box(w * a) / wsum, box(w * b) / wsum
    var_a = (box(w * a * a) / wsum - mu_a**2).clamp_min(0)
    var_b = (box(w * b * b) / wsum - mu_b**2).clamp_min(0)
    cov = box(w * a * b) / wsum - mu_a * mu_b
    ncc = cov / torch.sqrt(var_a * var_b + 1e-6)
    return _weighted_mean(1 - ncc, w)


# --------------------------------------------------------------------------------------------
# smoothness and folds

_SPRINGS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx); each spring covers two of 8 neighbours


def rigidity(field: Tensor, weight: Tensor | None = None) -> Tensor:
    """8-neighbour spring energy: ``(|d + f(p + d) - f(p)| - |d|)^2`` averaged over springs.

    Zero for translations and rotations (lengths are kept), positive for stretch and shear.
    """
    total = field.new_zeros(())
    for dy, dx in _SPRINGS:
        a, b = _pair(field, dy, dx)
        vx = dx + b[:, 0] - a[:, 0]
        vy = dy + b[:, 1] - a[:, 1]
        length = torch.sqrt(vx * vx + vy * vy + 1e-12)
        pen = (length - math.hypot(dx, dy)) ** 2
        w = _pair_weight(weight, dy, dx)
        total = total + _mean_of_weighted(pen.unsqueeze(1), w)
    return total / len(_SPRINGS)


def laplacian(field: Tensor, weight: Tensor | None = None) -> Tensor:
    """Bending energy: squared 5-point Laplacian of both channels (zero for affine fields)."""
    c = field[..., 1:-1, 1:-1]
    lap = (
        field[..., :-2, 1:-1] + field[..., 2:, 1:-1] + field[..., 1:-1, :-2] + field[..., 1:-1, 2:]
    ) - 4 * c
    pen = (lap**2).sum(1, keepdim=True)
    w = None if weight is None else weight[..., 1:-1, 1:-1]
    return _mean_of_weighted(pen, w)


def total_variation(field: Tensor, weight: Tensor | None = None) -> Tensor:
    """Anisotropic total variation: mean |forward difference| along x plus along y."""
    total = field.new_zeros(())
    for dy, dx in ((0, 1), (1, 0)):
        a, b = _pair(field, dy, dx)
        pen = (b - a).abs().sum(1, keepdim=True)
        total = total + _mean_of_weighted(pen, _pair_weight(weight, dy, dx))
    return total


def fold_penalty(field: Tensor, weight: Tensor | None = None, margin: float = 0.1) -> Tensor:
    """Mean of ``relu(margin - det J)^2``: zero for mild deformations, positive at folds."""
    det = fields.jacobian_determinant(field).unsqueeze(1)
    pen = F.relu(margin - det) ** 2
    w = None if weight is None else weight[..., :-1, :-1]
    return _mean_of_weighted(pen, w)


SMOOTHNESS_FNS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "rigidity": rigidity,
    "laplacian": laplacian,
    "tv": total_variation,
}


# --------------------------------------------------------------------------------------------
# supervision


def epe(field: Tensor, gt_field: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(mean, median)`` end-point error in pixels over ``weight > 0`` pixels (all if None).

    The median is detached (for logging).
    """
    err = torch.sqrt(((field - gt_field) ** 2).sum(1, keepdim=True) + 1e-12)
    mean = _weighted_mean(err, weight)
    with torch.no_grad():
        sel = err if weight is None else err[weight.expand_as(err) > 0]
        median = sel.median() if sel.numel() else err.new_zeros(())
    return mean, median


# --------------------------------------------------------------------------------------------
# config -> loss function


def _err(key: str, msg: str) -> MetroemError:
    return MetroemError(f"loss.{key}: {msg}")


def resolve(section: dict | None) -> dict:
    """Defaults merged with ``section``, checked; raises MetroemError naming a bad key."""
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise MetroemError(f"loss: must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in DEFAULTS:
            raise _err(key, f"unknown key; known keys: {', '.join(sorted(DEFAULTS))}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(section)
    if cfg["similarity"] not in SIMILARITIES:
        raise _err("similarity", f"must be one of {', '.join(SIMILARITIES)}")
    if cfg["smoothness"] not in SMOOTHNESS:
        raise _err("smoothness", f"must be one of {', '.join(SMOOTHNESS)}")
    win = cfg["ncc_window"]
    if not isinstance(win, int) or isinstance(win, bool) or win < 3 or win % 2 == 0:
        raise _err("ncc_window", f"must be an odd integer >= 3, got {win!r}")
    if not isinstance(cfg["normalize"], bool):
        raise _err("normalize", f"must be true or false, got {cfg['normalize']!r}")
    for key in ("similarity_weight", "smoothness_weight", "fold_weight", "supervised_weight"):
        v = cfg[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise _err(key, f"must be a number >= 0, got {v!r}")
    m = cfg["fold_margin"]
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0 <= m < 1:
        raise _err("fold_margin", f"must be a number in [0, 1), got {m!r}")
    return cfg


LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def build_loss(section: dict | None = None, masks_section: dict | None = None) -> LossFn:
    """Build ``loss_fn`` from config sections ``loss`` and ``masks`` (both validated here).

    ``loss_fn(src, tgt, field, gt_field=None, src_mask=None, tgt_mask=None, sim_weight=None,
    smooth_weight=None) -> (total, terms)`` warps ``src`` by ``field`` itself; weights not given
    come from :func:`metroem.masks.build_masks`. ``terms`` holds the unweighted value of every
    configured term (``similarity``, ``smoothness``, ``fold``, ``supervised``) plus
    ``epe`` / ``epe_median`` whenever ``gt_field`` is given; ``total`` is the weighted sum.
    """
    cfg = resolve(section)
    mcfg = masks.resolve(masks_section)

    def loss_fn(
        src: Tensor,
        tgt: Tensor,
        field: Tensor,
        gt_field: Tensor | None = None,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        sim_weight: Tensor | None = None,
        smooth_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        fields.check_field(field)
        if src.shape != tgt.shape or src.shape[-2:] != field.shape[-2:]:
            raise ValueError(
                f"src {tuple(src.shape)}, tgt {tuple(tgt.shape)} and field "
                f"{tuple(field.shape)} must share N, H, W"
            )
        if sim_weight is None or smooth_weight is None:
            built = masks.build_masks(mcfg, src, tgt, field, src_mask, tgt_mask)
            sim_weight = built["sim_weight"] if sim_weight is None else sim_weight
            smooth_weight = built["smooth_weight"] if smooth_weight is None else smooth_weight
        terms: dict[str, Tensor] = {}
        total = field.new_zeros(())
        if cfg["similarity"] != "none":
            s, t = src.float(), tgt.float()
            if cfg["normalize"]:
                s, t = normalize_image(s)[0], normalize_image(t)[0]
            warped = fields.warp_image(s, field)
            if cfg["similarity"] == "mse":
                terms["similarity"] = mse(warped, t, sim_weight)
            else:
                terms["similarity"] = local_ncc(warped, t, sim_weight, cfg["ncc_window"])
            total = total + cfg["similarity_weight"] * terms["similarity"]
        if cfg["smoothness"] != "none":
            terms["smoothness"] = SMOOTHNESS_FNS[cfg["smoothness"]](field, smooth_weight)
            total = total + cfg["smoothness_weight"] * terms["smoothness"]
        if cfg["fold_weight"] > 0:
            terms["fold"] = fold_penalty(field, smooth_weight, cfg["fold_margin"])
            total = total + cfg["fold_weight"] * terms["fold"]
        if cfg["supervised_weight"] > 0 and gt_field is None:
            raise MetroemError(
                "loss.supervised_weight > 0 needs ground-truth fields; set it to 0 or train "
                "on synthetic pairs"
            )
        if gt_field is not None:
            valid = masks.valid_mask(tgt, mcfg)
            mean, median = epe(field, gt_field, valid)
            terms["epe"], terms["epe_median"] = mean.detach(), median
            if cfg["supervised_weight"] > 0:
                terms["supervised"] = mean
                total = total + cfg["supervised_weight"] * mean
        return total, terms

    return loss_fn
