"""Pair augmentations that keep the image pair and its aligning field consistent.

A batch is a dict of tensors indexed by item along dim 0:

* ``src``, ``tgt``: images ``(N, C, H, W)``, float, 0 = no data;
* ``field`` (optional): saturated pull field ``(N, 2, H, W)`` aligning ``src`` to ``tgt``
  (``warp_image(src, field) ~ tgt``);
* ``src_agg_field`` (optional): the incoming aggregate field, transformed like ``field``;
* ``src_defects`` / ``tgt_defects`` (optional, bool ``(N, 1, H, W)``): pixels a simulated defect
  removed, for losses to ignore. Defect augmentations create them;
* ``field_known`` (optional, ``(N,)``): 1 where ``field`` is the truth, 0 where it is unknown
  (a placeholder the supervised term ignores); ``same_section`` pairs are known.

Every augmentation returns a new dict (inputs are not modified) on the batch's device and keeps
``warp_image(src, field) ~ tgt``. Derivations of the field updates are in docs/augment.md.
Randomness comes from a ``torch.Generator`` (numbers are drawn on its device, then moved), so a
seeded generator reproduces a batch exactly. :func:`build_augment` turns the ``augment`` config
section into one callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from metroem import config, fields
from metroem.synth import DeformationSpec, elastic_field, random_field

Tensor = torch.Tensor
Batch = dict

FIELD_KEYS = ("field", "src_agg_field")
_SIDE_KEYS = {"src": ("src", "src_defects"), "tgt": ("tgt", "tgt_defects")}
_SPATIAL_KEYS = set(FIELD_KEYS) | set(_SIDE_KEYS["src"]) | set(_SIDE_KEYS["tgt"])

__all__ = [
    "DEFAULTS",
    "Augment",
    "build_augment",
    "validate",
    "transpose",
    "flip",
    "rot90",
    "swap",
    "warp_source",
    "warp_target",
    "random_warp_source",
    "same_section_pair",
    "deformation_spec",
    "adjust_intensity",
    "holes_mask",
    "band",
    "add_defect",
    "add_fold",
    "add_crack",
]


# --------------------------------------------------------------------------- batch helpers


def _check_batch(batch: Batch) -> None:
    """Raise ``ValueError`` unless ``batch`` holds matching src/tgt/fields and nothing unknown."""
    for key in ("src", "tgt"):
        if key not in batch:
            raise ValueError(f"augmentation batch needs key {key!r}, got {sorted(batch)}")
    src, tgt = batch["src"], batch["tgt"]
    if src.dim() != 4 or src.shape != tgt.shape:
        raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must be equal 4-D")
    n, _, h, w = src.shape
    for key in FIELD_KEYS:
        if key in batch and tuple(batch[key].shape) != (n, 2, h, w):
            raise ValueError(f"{key} must have shape {(n, 2, h, w)}, got {tuple(batch[key].shape)}")
    for key, v in batch.items():
        if key in _SPATIAL_KEYS or not isinstance(v, Tensor):
            continue
        if v.dim() == 4 and v.shape[-2:] == (h, w):
            raise ValueError(
                f"augment does not know how to move batch key {key!r} with the images; "
                f"known spatial keys: {sorted(_SPATIAL_KEYS)}"
            )


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(shape, generator, like: Tensor) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to ``like``'s device."""
    return torch.rand(shape, generator=generator, device=_gen_device(generator)).to(like.device)


def _coins(n: int, p: float, generator) -> Tensor:
    """``n`` independent Bernoulli(p) draws (CPU bool tensor). Always consumes ``n`` numbers."""
    return torch.rand(n, generator=generator, device=_gen_device(generator)).cpu() < p


def _take(batch: Batch, idx: Tensor) -> Batch:
    n = batch["src"].shape[0]
    return {
        k: v[idx.to(v.device)] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
        for k, v in batch.items()
    }


def _apply_items(batch: Batch, chosen: Tensor, fn: Callable[[Batch], Batch]) -> Batch:
    """Apply a shape-preserving ``fn`` to the chosen items only and merge the results back."""
    if not bool(chosen.any()):
        return batch
    if bool(chosen.all()):
        return fn(batch)
    n = batch["src"].shape[0]
    idx = chosen.nonzero().flatten()
    sub = fn(_take(batch, idx))
    out = dict(batch)
    for key, v in sub.items():
        if not (isinstance(v, Tensor) and v.dim() and v.shape[0] == len(idx)):
            continue
        old = batch.get(key)
        merged = old.clone() if old is not None else v.new_zeros((n,) + tuple(v.shape[1:]))
        merged[idx.to(v.device)] = v
        out[key] = merged
    return out


def _defects(batch: Batch, side: str) -> Tensor:
    """The batch's defect mask for ``side``, or an all-False one."""
    key = f"{side}_defects"
    if key in batch:
        return batch[key]
    img = batch[side]
    return torch.zeros(img.shape[0], 1, *img.shape[-2:], dtype=torch.bool, device=img.device)


def _warp_mask(mask: Tensor, field: Tensor) -> Tensor:
    """Warp a bool mask conservatively: a pixel is flagged if any flagged pixel contributes."""
    return fields.warp_image(mask.to(field.dtype), field) > 0


# --------------------------------------------------------------------------- symmetries


def transpose(batch: Batch) -> Batch:
    """Swap the H and W axes of images and masks; fields via :func:`fields.transpose_xy`."""
    _check_batch(batch)
    out = dict(batch)
    for key in _SPATIAL_KEYS & batch.keys():
        out[key] = fields.transpose_xy(batch[key], is_field=key in FIELD_KEYS)
    return out


def flip(batch: Batch, axis: str) -> Batch:
    """Mirror along ``axis`` ("x" = columns, "y" = rows); the field's matching channel is negated.

    If ``tgt(p) = src(p + f(p))`` then with ``R`` the mirror, ``tgt(Rp) = src(R(p + f'(p)))`` for
    ``f'(p) = R_linear f(Rp)``: the grid is mirrored and the component along the axis flips sign.
    """
    _check_batch(batch)
    if axis not in ("x", "y"):
        raise ValueError(f"flip axis must be 'x' or 'y', got {axis!r}")
    dim, channel = (-1, 0) if axis == "x" else (-2, 1)
    out = dict(batch)
    for key in _SPATIAL_KEYS & batch.keys():
        v = batch[key].flip(dim)
        if key in FIELD_KEYS:
            sign = torch.ones(2, device=v.device, dtype=v.dtype)
            sign[channel] = -1
            v = v * sign.view(1, 2, 1, 1)
        out[key] = v
    return out


def rot90(batch: Batch, k: int = 1) -> Batch:
    """Rotate by ``k`` quarter turns, images matching ``torch.rot90(img, k, dims=(-2, -1))``.

    Built from :func:`transpose` and :func:`flip`, so the field update is inherited from them.
    """
    k = int(k) % 4
    if k == 1:
        return flip(transpose(batch), "y")
    if k == 2:
        return flip(flip(batch, "x"), "y")
    if k == 3:
        return flip(transpose(batch), "x")
    _check_batch(batch)
    return dict(batch)


def swap(batch: Batch) -> Batch:
    """Exchange source and target; ``field`` and ``src_agg_field`` become their inverses.

    ``tgt(p) = src(p + f(p))`` means ``src(q) = tgt(q + g(q))`` with ``g = invert(f)``. A batch
    without a field (self-supervised) just has its images (and defect masks) exchanged.
    """
    _check_batch(batch)
    out = dict(batch)
    out["src"], out["tgt"] = batch["tgt"], batch["src"]
    if "src_defects" in batch or "tgt_defects" in batch:
        out["src_defects"], out["tgt_defects"] = _defects(batch, "tgt"), _defects(batch, "src")
    for key in FIELD_KEYS:
        if key in batch:
            out[key] = fields.invert(batch[key])
    return out


# --------------------------------------------------------------------------- deformations


def warp_source(batch: Batch, d: Tensor, inverse: Tensor | None = None) -> Batch:
    """Deform the source: ``src' = warp_image(src, d)``, fields become ``compose(invert(d), f)``.

    ``inverse`` may supply an exact ``invert(d)`` (e.g. for a fold); otherwise it is computed.
    Derivation: ``src'(q + d^-1(q)) = src(q)``, so warping ``src'`` by ``d^-1`` and then by ``f``
    gives ``tgt``; :func:`fields.compose` ``(first=d^-1, second=f)`` is that single field.
    """
    _check_batch(batch)
    d = d.to(device=batch["src"].device, dtype=batch["src"].dtype)
    inv = fields.invert(d) if inverse is None else inverse.to(d)
    out = dict(batch)
    out["src"] = fields.warp_image(batch["src"], d)
    if "src_defects" in batch:
        out["src_defects"] = _warp_mask(batch["src_defects"], d)
    for key in FIELD_KEYS:
        if key in batch:
            out[key] = fields.compose(inv, batch[key])
    return out


def warp_target(batch: Batch, d: Tensor) -> Batch:
    """Deform the target: ``tgt' = warp_image(tgt, d)``, fields become ``compose(f, d)``.

    ``tgt'(p) = tgt(p + d(p)) = src(p + d(p) + f(p + d(p)))``: exactly ``compose(f, d)``.
    """
    _check_batch(batch)
    d = d.to(device=batch["tgt"].device, dtype=batch["tgt"].dtype)
    out = dict(batch)
    out["tgt"] = fields.warp_image(batch["tgt"], d)
    if "tgt_defects" in batch:
        out["tgt_defects"] = _warp_mask(batch["tgt_defects"], d)
    for key in FIELD_KEYS:
        if key in batch:
            out[key] = fields.compose(batch[key], d)
    return out


def _random_deformation(batch: Batch, spec: DeformationSpec, generator) -> Tensor:
    n, _, h, w = batch["src"].shape
    d = random_field(n, h, w, spec, generator=generator, device=_gen_device(generator))
    return d.to(device=batch["src"].device, dtype=batch["src"].dtype)


def random_warp_source(batch: Batch, spec: DeformationSpec, generator=None) -> Batch:
    """Deform every source by a random smooth field (magnitudes in pixels of the batch's MIP)."""
    _check_batch(batch)
    return warp_source(batch, _random_deformation(batch, spec, generator))


def same_section_pair(batch: Batch, spec: DeformationSpec, generator=None) -> Batch:
    """Replace each pair by a supervised pair made from its target alone.

    ``tgt`` is kept, ``src = warp_image(tgt, d)`` and ``field = invert(d)`` (the ground truth).
    For training on sections that are already aligned. A present ``src_agg_field`` becomes 0
    (no earlier stage has seen this pair); ``src_defects`` is ``tgt_defects`` moved by ``d``.
    """
    _check_batch(batch)
    d = _random_deformation(batch, spec, generator)
    out = dict(batch)
    out["src"] = fields.warp_image(batch["tgt"], d)
    out["field"] = fields.invert(d)
    if "field_known" in batch:  # the field of a same-section pair is known, always
        out["field_known"] = torch.ones_like(batch["field_known"])
    if "src_defects" in batch or "tgt_defects" in batch:
        out["src_defects"] = _warp_mask(_defects(batch, "tgt"), d)
    if "src_agg_field" in batch:
        out["src_agg_field"] = torch.zeros_like(batch["src_agg_field"])
    return out


# --------------------------------------------------------------------------- intensity


def adjust_intensity(
    img: Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    gamma: float = 0.0,
    noise: float = 0.0,
    generator=None,
    shading: float = 0.0,
) -> Tensor:
    """Random gamma, contrast, brightness, shading and Gaussian noise on the valid (nonzero)
    pixels.

    Per item, with ``s`` the largest valid value and ``m`` the valid mean, and ``u`` uniform
    in [-1, 1]: ``x <- s (x/s)^exp(u gamma)``, ``x <- m + (x - m)(1 + u contrast)``,
    ``x <- x + u brightness s``, then (``shading`` > 0) ``x <- x (1 + a (X cos t + Y sin t))``
    with ``X, Y`` in [-1, 1] across the image, a random direction ``t`` and ``a`` uniform in
    [0, shading] (uneven illumination: a gain that changes across the image; at least 0.1),
    then ``x <- x + N(0, 1) noise s``. Expects raw, non-negative intensities. No-data pixels
    stay 0; valid pixels are clamped to at least ``1e-3 s`` so they stay valid.
    """
    if not img.is_floating_point():
        raise ValueError(f"adjust_intensity needs a floating image, got {img.dtype}")
    n = img.shape[0]
    valid = img != 0
    shape = (n,) + (1,) * (img.dim() - 1)
    count = valid.flatten(1).sum(1).clamp_min(1).view(shape)
    x = torch.where(valid, img.clamp_min(0), torch.zeros_like(img))
    s = x.flatten(1).amax(1).view(shape).clamp_min(1e-12)
    u = _rand((4, n), generator, img).mul(2).sub(1).to(img.dtype)
    x = s * (x / s) ** torch.exp(u[0] * gamma).view(shape)
    m = x.sum(dim=tuple(range(1, img.dim())), keepdim=True) / count
    x = m + (x - m) * (1 + u[1] * contrast).view(shape)
    x = x + (u[2] * brightness).view(shape) * s
    if shading > 0:  # drawn only when asked, so other configs keep their random streams
        x = x * _shading_gain(img, shading, generator)
    if noise > 0:
        eps = torch.randn(img.shape, generator=generator, device=_gen_device(generator))
        x = x + eps.to(img) * noise * s
    return torch.where(valid, x.clamp_min(1e-3 * s), torch.zeros_like(img))


def _shading_gain(img: Tensor, shading: float, generator) -> Tensor:
    """A random plane of gain per item, ``1 + a (X cos t + Y sin t)`` over ``img``'s last two
    axes (``X, Y`` from -1 to 1), ``a`` uniform in [0, shading], floored at 0.1."""
    n, (h, w) = img.shape[0], img.shape[-2:]
    v = _rand((2, n), generator, img).to(img.dtype)
    a, t = v[0] * shading, v[1] * 2 * math.pi
    ys = torch.linspace(-1, 1, h, device=img.device, dtype=img.dtype)
    xs = torch.linspace(-1, 1, w, device=img.device, dtype=img.dtype)
    lead = (n,) + (1,) * (img.dim() - 1)
    slope_x = (a * torch.cos(t)).view(lead)
    slope_y = (a * torch.sin(t)).view(lead)
    return (1 + slope_x * xs + slope_y * ys[:, None]).clamp_min(0.1)


# --------------------------------------------------------------------------- defects


def _grid(h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
    ys = torch.arange(h, device=like.device, dtype=like.dtype)
    xs = torch.arange(w, device=like.device, dtype=like.dtype)
    return torch.meshgrid(ys, xs, indexing="ij")


def holes_mask(
    n: int, h: int, w: int, count: int, radius: float, generator=None, like: Tensor | None = None
) -> Tensor:
    """Bool ``(n, 1, h, w)``: 1 to ``count`` irregular blobs per item, radius up to ``radius`` px.

    Blobs are disks of radius in [radius/2, radius] whose outline is wobbled by a smooth random
    field, so they look like torn or missing tissue rather than circles.
    """
    like = torch.empty(0) if like is None else like
    if radius <= 0 or count <= 0:
        return torch.zeros(n, 1, h, w, dtype=torch.bool, device=like.device)
    gd = _gen_device(generator)
    wobble = elastic_field(n, h, w, radius / 4, max(radius, 4.0), generator, gd).to(like.device)
    gy, gx = _grid(h, w, wobble)
    px, py = gx + wobble[:, 0], gy + wobble[:, 1]
    r = _rand((5, n, count), generator, wobble)
    number = 1 + (r[4, :, 0] * count).long().clamp_max(count - 1)
    mask = torch.zeros(n, h, w, dtype=torch.bool, device=like.device)
    for k in range(count):
        cx = (r[0, :, k] * (w - 1)).view(n, 1, 1)
        cy = (r[1, :, k] * (h - 1)).view(n, 1, 1)
        rad = (radius * (0.5 + 0.5 * r[2, :, k])).view(n, 1, 1)
        inside = (px - cx) ** 2 + (py - cy) ** 2 <= rad**2
        mask |= inside & (k < number).view(n, 1, 1)
    return mask.unsqueeze(1)


def band(n: int, h: int, w: int, generator=None, like: Tensor | None = None):
    """A random gently curved line per item, as a level set ``phi = 0``.

    Returns ``(phi, normal)``: ``phi`` ``(n, 1, h, w)`` is the signed distance-like coordinate
    ``(p - c).n + kappa ((p - c).t)^2`` and ``normal`` ``(n, 2)`` the unit (x, y) vector ``n``.
    Moving a point by ``s n`` raises ``phi`` by exactly ``s`` (the bend is along ``t``), which is
    what makes the fold displacement exactly invertible.
    """
    like = torch.empty(0) if like is None else like
    like = like if like.is_floating_point() else like.float()
    r = _rand((4, n), generator, like).to(like.dtype)
    cx = ((0.2 + 0.6 * r[0]) * (w - 1)).view(n, 1, 1)
    cy = ((0.2 + 0.6 * r[1]) * (h - 1)).view(n, 1, 1)
    theta = r[2] * 2 * math.pi
    nx, ny = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    kappa = ((2 * r[3] - 1) * 0.4 / max(h, w)).view(n, 1, 1)
    gy, gx = _grid(h, w, like)
    along = -(gx - cx) * ny + (gy - cy) * nx
    phi = (gx - cx) * nx + (gy - cy) * ny + kappa * along**2
    return phi.unsqueeze(1), torch.stack((torch.cos(theta), torch.sin(theta)), dim=1)


def add_defect(batch: Batch, side: str, mask: Tensor) -> Batch:
    """Set ``mask`` pixels of ``side`` ("src"/"tgt") to 0 and OR them into ``<side>_defects``."""
    _check_batch(batch)
    if side not in _SIDE_KEYS:
        raise ValueError(f"side must be 'src' or 'tgt', got {side!r}")
    img = batch[side]
    mask = mask.to(device=img.device, dtype=torch.bool)
    out = dict(batch)
    out[side] = torch.where(mask, torch.zeros_like(img), img)
    key = f"{side}_defects"
    out[key] = mask | batch[key] if key in batch else mask
    return out


def add_fold(batch: Batch, side: str, width: float, displacement: float, generator=None) -> Batch:
    """Zero a thin curved band on ``side`` and hide up to ``displacement`` px of tissue under it.

    Tissue on the ``phi > 0`` side is pulled across by ``s n`` (``s`` uniform in
    [0, displacement]): ``d = s n [phi > 0]`` with exact inverse ``-s n [phi > s/2]``, and the
    field is updated as for any source (``compose(d^-1, f)``) or target (``compose(f, d)``)
    warp. The zeroed band (half-width at least ``s/2 + 1.5``) covers the lost tissue.
    """
    if side not in _SIDE_KEYS:
        raise ValueError(f"side must be 'src' or 'tgt', got {side!r}")
    n, _, h, w = batch["src"].shape
    like = batch["src"]
    phi, normal = band(n, h, w, generator, like)
    s = _rand(n, generator, like).to(like.dtype) * displacement
    if displacement <= 0:  # a flat fold: only the band, no resampling
        return add_defect(batch, side, phi.abs() <= width / 2)
    shift = (s.view(n, 1) * normal).view(n, 2, 1, 1)
    d = shift * (phi > 0).to(like.dtype)
    if side == "src":
        out = warp_source(batch, d, inverse=-shift * (phi > s.view(n, 1, 1, 1) / 2).to(d))
    else:
        out = warp_target(batch, d)
    half = torch.maximum(torch.full_like(s, width / 2), s / 2 + 1.5).view(n, 1, 1, 1)
    return add_defect(out, side, phi.abs() <= half)


def add_crack(batch: Batch, side: str, width: float, generator=None) -> Batch:
    """Zero a thin curved line of ``width`` px on ``side``."""
    n, _, h, w = batch["src"].shape
    phi, _ = band(n, h, w, generator, batch["src"])
    return add_defect(batch, side, phi.abs() <= width / 2)


# --------------------------------------------------------------------------- config


def _deform_group(p: float) -> dict:
    return {
        "p": p,
        "translation": 4.0,  # px at the batch's MIP, max |shift| per axis
        "rotation_deg": 1.0,  # degrees
        "scale": 0.01,  # max relative scale change
        "shear": 0.01,  # max shear
        "elastic": 1.0,  # px, std of the smooth elastic displacement
        "elastic_scale": 64.0,  # px, its correlation length
    }


DEFAULTS: dict = {
    # Replace a pair by (warp(tgt, d), tgt) with field invert(d); for already-aligned sections.
    "same_section": _deform_group(0.0) | {"translation": 8.0, "elastic": 2.0},
    "warp": _deform_group(0.5),  # random smooth deformation of the source
    "swap": {"p": 0.5},  # exchange source and target, invert the field
    "transpose": {"p": 0.5},  # whole batch; with the two flips gives all 8 symmetries
    "flip_x": {"p": 0.5},
    "flip_y": {"p": 0.5},
    "rot90": {"p": 0.0},  # whole batch, k in {1, 2, 3}; redundant with transpose + flips
    "holes": {"p": 0.1, "on": "both", "count": 3, "radius": 12.0},  # radius in px
    "folds": {"p": 0.05, "on": "both", "width": 4.0, "displacement": 6.0},  # px
    "cracks": {"p": 0.05, "on": "both", "width": 2.0},  # px
    # Per image; magnitudes are fractions of the image's largest valid value (gamma: log scale).
    # shading: the largest gain slope across the image (uneven illumination; 0 = none)
    "intensity": {"p": 0.5, "brightness": 0.1, "contrast": 0.2, "gamma": 0.2, "noise": 0.02,
                  "shading": 0.0},
}

def validate(section: dict | None) -> dict:
    """Merge ``section`` over :data:`DEFAULTS` and check it with
    :func:`metroem.config.check_section` (the rules live in config.py); returns the full
    config or raises a one-line MetroemError naming ``augment.<group>.<key>``."""
    return config.check_section("augment", section)


def deformation_spec(group: dict) -> DeformationSpec:
    """The deformation magnitudes of a ``same_section`` / ``warp`` config group (``p`` dropped)."""
    return DeformationSpec(**{k: float(v) for k, v in group.items() if k != "p"})


def _sides(on: str) -> tuple[str, ...]:
    return ("src", "tgt") if on == "both" else (on,)


class Augment:
    """The configured pipeline; call as ``augment(batch, generator)``.

    Order: same_section, warp, swap, holes, folds, cracks, transpose, flip_x, flip_y, rot90,
    intensity. Each step is drawn per item, except transpose and rot90 (they can change H, W)
    and same_section on a batch with no field (all items or none, so fields stay batch-wide).
    """

    def __init__(self, config: dict):
        self.config = config

    def __repr__(self) -> str:
        return f"Augment({self.config})"

    def __call__(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        _check_batch(batch)
        c, g = self.config, generator
        n = batch["src"].shape[0]

        def per_item(b: Batch, p: float, fn: Callable[[Batch], Batch]) -> Batch:
            return _apply_items(b, _coins(n, p, g), fn)

        chosen = _coins(n, c["same_section"]["p"], g)
        if "field" not in batch:
            chosen = chosen[:1].expand(n)
        spec = deformation_spec(c["same_section"])
        batch = _apply_items(batch, chosen, lambda b: same_section_pair(b, spec, g))
        spec_w = deformation_spec(c["warp"])
        batch = per_item(batch, c["warp"]["p"], lambda b: random_warp_source(b, spec_w, g))
        batch = per_item(batch, c["swap"]["p"], swap)
        for side in _sides(c["holes"]["on"]):
            h = c["holes"]

            def holes(b: Batch, side=side, h=h) -> Batch:
                m = holes_mask(
                    len(b["src"]), *b["src"].shape[-2:], int(h["count"]), h["radius"], g, b["src"]
                )
                return add_defect(b, side, m)

            batch = per_item(batch, h["p"], holes)
        for side in _sides(c["folds"]["on"]):
            f = c["folds"]
            batch = per_item(
                batch,
                f["p"],
                lambda b, s=side, f=f: add_fold(b, s, f["width"], f["displacement"], g),
            )
        for side in _sides(c["cracks"]["on"]):
            w = c["cracks"]["width"]
            batch = per_item(batch, c["cracks"]["p"], lambda b, s=side, w=w: add_crack(b, s, w, g))
        if bool(_coins(1, c["transpose"]["p"], g)[0]):
            batch = transpose(batch)
        batch = per_item(batch, c["flip_x"]["p"], lambda b: flip(b, "x"))
        batch = per_item(batch, c["flip_y"]["p"], lambda b: flip(b, "y"))
        r = torch.rand(2, generator=g, device=_gen_device(g)).cpu()
        if r[0] < c["rot90"]["p"]:
            batch = rot90(batch, 1 + int(r[1] * 3))
        it = {k: v for k, v in c["intensity"].items() if k != "p"}
        for side in ("src", "tgt"):

            def intensity(b: Batch, side=side) -> Batch:
                return b | {side: adjust_intensity(b[side], generator=g, **it)}

            batch = per_item(batch, c["intensity"]["p"], intensity)
        return batch


def build_augment(section: dict | None) -> Augment:
    """Validate the ``augment`` config section (merged over :data:`DEFAULTS`) into a pipeline.

    Unknown keys and bad values raise :class:`MetroemError` naming ``augment.<group>.<key>``.
    """
    return Augment(validate(section))
