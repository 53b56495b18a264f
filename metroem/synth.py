"""Synthetic smooth deformations with known ground truth.

Used by the demo volume (misaligning a stack), by augmentation (deforming a source on the fly)
and by benchmarks (pairs with a known field). All fields follow :mod:`metroem.fields`: pull
fields in pixels of the tensor they act on.

A deformation is specified by magnitudes; :func:`random_field` draws one. To make a pair with a
known aligning field from an image ``img``: ``src = warp_image(img, d)`` and the field that aligns
``src`` back onto ``img`` is ``invert(d)``. :func:`deformed_pair` does exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metroem import fields

Tensor = torch.Tensor


@dataclass
class DeformationSpec:
    """Magnitudes of a random smooth deformation, in pixels of the target grid.

    translation: max |shift| per axis (uniform in [-t, t]).
    rotation_deg: max |rotation| in degrees; scale: max |relative scale change|;
    shear: max |shear|. elastic: std of the elastic displacement in pixels; elastic_scale:
    its correlation length in pixels (control-point spacing).
    """

    translation: float = 0.0
    rotation_deg: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    elastic: float = 0.0
    elastic_scale: float = 64.0


def _uniform(shape, lo, hi, generator, device):
    return torch.rand(shape, generator=generator, device=device) * (hi - lo) + lo


def affine_field(matrix: Tensor, translation: Tensor, h: int, w: int) -> Tensor:
    """Field of the affine map ``p -> A (p - c) + c + t`` as a pull field ``A(p-c)+c+t - p``.

    ``matrix`` is ``(N, 2, 2)`` acting on (x, y), ``translation`` ``(N, 2)`` in pixels, ``c`` the
    image centre.
    """
    n = matrix.shape[0]
    dev, dt = matrix.device, matrix.dtype
    ys = torch.arange(h, device=dev, dtype=dt) - (h - 1) / 2
    xs = torch.arange(w, device=dev, dtype=dt) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    p = torch.stack((gx, gy), dim=0).reshape(1, 2, -1).expand(n, 2, h * w)
    eye = torch.eye(2, device=dev, dtype=dt).unsqueeze(0)
    disp = torch.bmm(matrix - eye, p) + translation.unsqueeze(-1)
    return disp.reshape(n, 2, h, w)


def elastic_field(
    n: int, h: int, w: int, std: float, scale: float, generator=None, device=None
) -> Tensor:
    """Smooth random field: Gaussian noise on a coarse control grid, bicubic-upsampled.

    ``std`` is the standard deviation of the displacement in pixels, ``scale`` the control-point
    spacing in pixels (larger = smoother).
    """
    if std <= 0:
        return fields.identity(n, h, w, device=device)
    gh = max(2, math.ceil(h / scale) + 1)
    gw = max(2, math.ceil(w / scale) + 1)
    coarse = torch.randn(n, 2, gh, gw, generator=generator, device=device) * std
    out = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    # Bicubic interpolation shrinks the variance between control points; rescale to `std`.
    cur = out.flatten(1).std(dim=1).clamp_min(1e-6).view(n, 1, 1, 1)
    return out * (std / cur)


def random_field(
    n: int, h: int, w: int, spec: DeformationSpec, generator=None, device=None
) -> Tensor:
    """Draw ``n`` random deformations (pull fields, pixels) of size ``h x w``."""
    g = generator
    ang = _uniform(n, -1, 1, g, device) * math.radians(spec.rotation_deg)
    sc = 1 + _uniform((n, 2), -1, 1, g, device) * spec.scale
    sh = _uniform(n, -1, 1, g, device) * spec.shear
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    shear = torch.eye(2, device=device).repeat(n, 1, 1)
    shear[:, 0, 1] = sh
    scale = torch.diag_embed(sc)
    matrix = rot @ shear @ scale
    trans = _uniform((n, 2), -1, 1, g, device) * spec.translation
    field = affine_field(matrix, trans, h, w)
    if spec.elastic > 0:
        field = field + elastic_field(n, h, w, spec.elastic, spec.elastic_scale, g, device)
    return field


def deformed_pair(img: Tensor, deformation: Tensor) -> tuple[Tensor, Tensor]:
    """Deform ``img`` into a source and return ``(src, gt_field)``.

    ``src = warp_image(img, deformation)``; ``gt_field = invert(deformation)`` aligns ``src`` back
    onto ``img``: ``warp_image(src, gt_field) ~ img`` away from the borders.
    """
    src = fields.warp_image(img.float(), deformation)
    return src, fields.invert(deformation)


# --- folds ---------------------------------------------------------------------------------------


@dataclass
class FoldSpec:
    """A fold: a strip of tissue along a curve is lost (folded under) and the tissue on either
    side closes the gap, each side moving ``width / 2`` pixels toward the curve.

    width: pixels of tissue lost into the fold (the true field jumps by this across it).
    line: width in pixels of the dark folded-over line in the folded section.
    radius: the curve is an arc of this radius in pixels (larger = straighter), drawn through a
    point within ``spread`` x the image size of the centre, in a random direction.
    darkness: the line's intensity as a fraction of the tissue's (folded tissue is thicker).
    """

    width: float = 16.0
    line: float = 3.0
    radius: float = 600.0
    spread: float = 0.2
    darkness: float = 0.35


def fold_curve(h: int, w: int, spec: FoldSpec, generator=None) -> tuple[Tensor, Tensor]:
    """``(signed distance (1, 1, H, W), unit normal (1, 2, H, W) in (x, y))`` of a random arc:
    the distance is positive on the convex side, in pixels."""
    g = generator
    ang = float(_uniform(1, 0, 2 * math.pi, g, None))
    off = _uniform(2, -spec.spread, spec.spread, g, None)
    px, py = (w - 1) / 2 + float(off[0]) * w, (h - 1) / 2 + float(off[1]) * h
    cx, cy = px - math.cos(ang) * spec.radius, py - math.sin(ang) * spec.radius
    ys = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    xs = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    dx, dy = xs - cx, ys - cy
    r = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-6)
    normal = torch.stack((dx / r, dy / r), 0)[None]
    return (r - spec.radius)[None, None], normal


def fold_section(img: Tensor, spec: FoldSpec, generator=None) -> dict[str, Tensor]:
    """Fold ``img`` ``(1, 1, H, W)`` (raw values, 0 = no data) along a random arc.

    Returns ``folded`` (the folded section), ``field`` (the pull field that aligns ``folded``
    back onto ``img``: ``-normal * sign(s) * width / 2`` at target pixels at signed distance
    ``s`` from the arc), ``defect`` (the dark line in the folded section, 1.0 = defect) and
    ``lost`` (target pixels whose tissue went into the fold: no answer there). The arc is the
    same in both grids: both sides move along its normals, which do not change along a normal.
    """
    n_, _, h, w = img.shape
    s, normal = fold_curve(h, w, spec, generator)
    half = spec.width / 2
    side = torch.where(s >= 0, 1.0, -1.0)
    # The folded section at q shows the tissue at q + normal * side * half of the unfolded one.
    folded = fields.warp_image(img.float(), normal * side * half)
    defect = (s.abs() < spec.line / 2).float()
    folded = torch.where(defect > 0, folded * spec.darkness, folded)
    lost = (s.abs() <= half).float()
    field = torch.where(lost > 0, torch.zeros_like(normal), -normal * side * half)
    return {"folded": folded, "field": field, "defect": defect, "lost": lost}
