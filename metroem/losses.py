"""Training losses for stage aligners: similarity, smoothness, folds, supervision, embedding.

Every term takes ``(N, ...)`` batches of any size and optional weight maps ``(N, 1, H, W)`` on
the target grid (see :mod:`metroem.masks`). Fields follow :mod:`metroem.fields` (pull, pixels).

* similarity (weighted mean over the weight map): :func:`mse`, :func:`local_ncc` (1 - NCC);
* smoothness (mean of weight x penalty, so a weight < 1 really relaxes it):
  :func:`rigidity` (8-neighbour springs, zero for rotations and translations),
  :func:`laplacian` (bending, zero for affine fields), :func:`total_variation`;
* :func:`fold_penalty`: ``relu(margin - det J)^2``;
* :func:`epe`: end-point error against a known field;
* embedding (metric learning on the network's own encoder features): :func:`feature_contrast`
  for one level, :func:`embedding_loss` over the pyramid levels.

:func:`build_loss` turns the config section ``loss`` into ``loss_fn(src, tgt, field, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metroem import config, fields, masks
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
    # Embedding (metric-learning) term on the encoder features: source features warped by a
    # field that aligns the pair should match the target's at the same pixel and differ from
    # the target's a few pixels away. 0 = off.
    "embedding_weight": 0.0,
    "embedding_margin": 1.0,  # push apart until the unit-feature distance reaches this (0, 2]
    "embedding_radius": 1,  # negatives: target features shifted 1..radius level pixels
    "embedding_levels": [],  # encoder levels (1..L) it applies to; [] = all of them
    "embedding_field": "auto",  # auto | truth | predicted (which field says what corresponds)
    # Equivariance term (applied by the trainer, which needs a second forward pass): each pair
    # is also aligned with its source deformed by a random field of augment.warp's magnitudes,
    # and the two fields must agree once the deformation is undone (mean EPE, px). 0 = off.
    "equivariance_weight": 0.0,
}

# The choices of the enumerated keys (their rules are config.ENUMS).
SIMILARITIES = config.ENUMS["loss.similarity"]
SMOOTHNESS = config.ENUMS["loss.smoothness"]
EMBEDDING_FIELDS = config.ENUMS["loss.embedding_field"]


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
# embedding (metric learning on encoder features)


def _unit_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance ``(N, 1, H, W)`` of unit feature vectors (differentiable at 0)."""
    return torch.sqrt(((a - b) ** 2).sum(1, keepdim=True) + 1e-8)


def feature_contrast(
    src_feat: Tensor,
    tgt_feat: Tensor,
    field: Tensor,
    weight: Tensor | None = None,
    margin: float = 1.0,
    radius: int = 1,
) -> Tensor:
    """Contrastive loss of one feature level under a field that aligns the pair.

    ``src_feat`` / ``tgt_feat`` are ``(N, C, H, W)``, ``field`` the pull field ``(N, 2, H, W)`` in
    pixels of this level, ``weight`` ``(N, 1, H, W)`` on the target grid. Feature vectors are
    scaled to unit length; with ``a = warp(src, field)`` and ``b = tgt``::

        pull(p) = |a(p) - b(p)|^2                        (corresponding pixels agree)
        push(p) = mean_d relu(margin - |a(p) - b(p + d)|)^2   (1 <= max(|dx|, |dy|) <= radius)

    The result is the ``weight``-weighted mean of pull plus the mean over shifts ``d`` of the
    push averaged with weight ``w(p) w(p + d)`` (pairs leaving the grid count 0). It is 0 when
    the warped source equals the target and features ``radius`` pixels apart are at least
    ``margin`` away from each other.
    """
    if src_feat.shape != tgt_feat.shape or field.shape[-2:] != tgt_feat.shape[-2:]:
        raise ValueError(
            f"features {tuple(src_feat.shape)}, {tuple(tgt_feat.shape)} and field "
            f"{tuple(field.shape)} must share N, H, W"
        )
    a = F.normalize(fields.warp(src_feat, field.to(src_feat.dtype)), dim=1, eps=1e-6)
    b = F.normalize(tgt_feat, dim=1, eps=1e-6)
    pull = ((a - b) ** 2).sum(1, keepdim=True)
    total = _weighted_mean(pull, weight)
    w = torch.ones_like(pull) if weight is None else weight.to(pull.dtype).expand_as(pull)
    h, wd = b.shape[-2:]
    r = radius
    bp, wp = F.pad(b, (r, r, r, r)), F.pad(w, (r, r, r, r))
    push = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx == 0 and dy == 0:
                continue
            rows, cols = slice(r + dy, r + dy + h), slice(r + dx, r + dx + wd)
            dist = _unit_distance(a, bp[..., rows, cols])
            push.append(_weighted_mean(F.relu(margin - dist) ** 2, w * wp[..., rows, cols]))
    return total + torch.stack(push).mean()


def _min_pool(weight: Tensor, k: int) -> Tensor:
    return weight if k == 1 else -F.max_pool2d(-weight, k)


def embedding_loss(
    src_feats: list[Tensor],
    tgt_feats: list[Tensor],
    field: Tensor,
    weight: Tensor | None = None,
    levels: list[int] | None = None,
    margin: float = 1.0,
    radius: int = 1,
) -> Tensor:
    """Mean of :func:`feature_contrast` over encoder ``levels`` (None = all of 1..L).

    ``src_feats`` / ``tgt_feats`` are the network's features of levels 0..L (see
    ``StageAligner.pair_features``): level ``i`` is the pair's grid, padded up to a multiple of
    ``2^L``, at ``1/2^i`` resolution. ``field`` ``(N, 2, H, W)`` aligns the pair in pixels of
    the stage; it is detached, padded (border values) and box-downsampled to each level.
    ``weight`` ``(N, 1, H, W)`` is padded with 0 and min-pooled, so a level pixel counts only
    where all the stage pixels it covers do.
    """
    top = len(tgt_feats) - 1
    levels = list(range(1, top + 1)) if not levels else list(levels)
    bad = [lv for lv in levels if not 1 <= lv <= top]
    if bad:
        raise MetroemError(
            f"loss.embedding_levels: {bad} are not encoder levels of this network (1..{top}); "
            "use levels in that range or [] for all"
        )
    stride = 2**top
    h, w = field.shape[-2:]
    ph, pw = tgt_feats[0].shape[-2] - h, tgt_feats[0].shape[-1] - w
    if ph < 0 or pw < 0 or tgt_feats[0].shape[-2] % stride or tgt_feats[0].shape[-1] % stride:
        raise ValueError(
            f"level-0 features {tuple(tgt_feats[0].shape)} are not the field's grid "
            f"{(h, w)} padded to a multiple of {stride}"
        )
    f = F.pad(field.detach().float(), (0, pw, 0, ph), mode="replicate")
    wt = None if weight is None else F.pad(weight.detach().float(), (0, pw, 0, ph))
    total = field.new_zeros(())
    for lv in levels:
        k = 2**lv
        level_w = None if wt is None else _min_pool(wt, k)
        total = total + feature_contrast(
            src_feats[lv], tgt_feats[lv], fields.downsample_field(f, lv), level_w, margin, radius
        )
    return total / len(levels)


# --------------------------------------------------------------------------------------------
# config -> loss function


def _err(key: str, msg: str) -> MetroemError:
    return MetroemError(f"loss.{key}: {msg}")


def resolve(section: dict | None) -> dict:
    """Defaults merged with ``section`` and checked by :func:`metroem.config.check_section`
    (the rules live in config.py); raises a one-line MetroemError naming a bad key."""
    cfg = config.check_section("loss", section)
    cfg["embedding_levels"] = sorted(set(cfg["embedding_levels"]))
    return cfg


def check_embedding_levels(section: dict | None, num_levels: int) -> None:
    """Raise MetroemError when ``loss.embedding_levels`` names a level a network with
    ``num_levels`` pyramid levels (0..num_levels-1) does not have (only when the term is on)."""
    cfg = resolve(section)
    top = num_levels - 1
    bad = [lv for lv in cfg["embedding_levels"] if lv > top]
    if cfg["embedding_weight"] > 0 and bad:
        raise _err("embedding_levels", f"{bad} are not encoder levels of this network "
                   f"(1..{top}); use levels in that range or [] for all")


LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def build_loss(section: dict | None = None, masks_section: dict | None = None) -> LossFn:
    """Build ``loss_fn`` from config sections ``loss`` and ``masks`` (both validated here).

    ``loss_fn(src, tgt, field, gt_field=None, src_mask=None, tgt_mask=None, sim_weight=None,
    smooth_weight=None, features=None, gt_known=None) -> (total, terms)`` warps ``src`` by
    ``field`` itself; ``gt_known`` ``(N,)`` leaves items whose ``gt_field`` is a placeholder (0)
    out of the supervised term and the EPE;
    weights not given come from :func:`metroem.masks.build_masks`. ``terms`` holds the
    unweighted value of every configured term (``similarity``, ``smoothness``, ``fold``,
    ``supervised``, ``embedding``) plus ``epe`` / ``epe_median`` whenever ``gt_field`` is given;
    ``total`` is the weighted sum.

    ``features(src, tgt) -> (src_feats, tgt_feats)`` (the model's ``pair_features``) is needed
    when ``embedding_weight > 0``. The embedding term uses ``gt_field`` where given and the
    detached ``field`` otherwise (``embedding_field: auto``); with ``truth`` it is left out of
    batches without ``gt_field``, with ``predicted`` it always uses the detached ``field``.
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
        features: Callable[[Tensor, Tensor], tuple[list[Tensor], list[Tensor]]] | None = None,
        gt_known: Tensor | None = None,
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
            if gt_known is not None:  # items whose field is only a placeholder count 0
                valid = valid * gt_known.to(valid.dtype).view(-1, 1, 1, 1)
            mean, median = epe(field, gt_field, valid)
            terms["epe"], terms["epe_median"] = mean.detach(), median
            if cfg["supervised_weight"] > 0:
                terms["supervised"] = mean
                total = total + cfg["supervised_weight"] * mean
        if cfg["embedding_weight"] > 0:
            mode = cfg["embedding_field"]
            unknown = gt_known is not None and not bool((gt_known > 0).all())
            if mode == "predicted" or (mode == "auto" and (gt_field is None or unknown)):
                emb_field, emb_weight = field.detach(), sim_weight
            elif gt_field is not None and not unknown:
                emb_field = gt_field.detach()
                emb_weight = masks.build_masks(
                    mcfg, src, tgt, emb_field, src_mask, tgt_mask
                )["sim_weight"]
            else:  # "truth" and no (or not every) known field: nothing says what corresponds
                emb_field = None
            if emb_field is not None:
                if features is None:
                    raise ValueError(
                        "loss.embedding_weight > 0 needs features=model.pair_features"
                    )
                src_feats, tgt_feats = features(src, tgt)
                terms["embedding"] = embedding_loss(
                    src_feats, tgt_feats, emb_field, emb_weight,
                    cfg["embedding_levels"], float(cfg["embedding_margin"]),
                    cfg["embedding_radius"],
                )
                total = total + cfg["embedding_weight"] * terms["embedding"]
        return total, terms

    return loss_fn
