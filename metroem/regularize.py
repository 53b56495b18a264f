"""Field regularisation with a physical length: keep the smooth distortion, drop the morph.

Neighbouring sections show different tissue, so a matcher's field between them has two parts:
the smooth distortion of the section (drift, stretch, shear, a gentle bend over microns),
which is what alignment must remove, and local pulls toward whichever membrane of the other
section looks most alike ("morphing"), which vary from neurite to neurite and must be left
alone. :func:`smooth_field` keeps the first and averages the second away: at every pixel it
fits a straight (affine) field to the surrounding field by weighted least squares, with a
Gaussian window of standard deviation ``sigma`` pixels, and takes the fit's value there
("local linear regression", a first-order normalised convolution).

* An affine field is returned unchanged, everywhere, the image edge included: drift, rotation,
  scale and shear are never shrunk, whatever ``sigma``.
* Variations shorter than ``sigma`` are averaged out. Choose ``sigma`` from the physical size
  of the distortion you expect (:func:`sigma_px` converts nm to pixels at a MIP); the trade-off
  between following real distortion and ignoring tissue change is measured in
  ``benchmarks/results/neighbours.md``.
* Pixels are weighted (``weight``, e.g. 0 where either image has no data), and a few rounds of
  iteratively reweighted least squares (Cauchy weights with scale ``robust_scale`` pixels)
  discount far matches that disagree with their surroundings.
* It is local (:func:`support_px`: about ``3 * sigma`` per reweighting round), so a tile
  padded by that much gives the whole-image result; it is differentiable.

The window sums are taken on a grid about ``sigma / 4`` times coarser (:func:`grid_factor`;
box average, Gaussian blur, bilinear interpolation of the fitted coefficients back to full
resolution), so its cost does not grow with ``sigma``.

**Match gate** (:func:`regularized_field`, on by default wherever smoothing is set from a
length): where the warped source matches the target as closely as a copy of the same section
does, nothing is lost to the tissue, and smoothing would only throw away real distortion
shorter than the length (a same-section pair, a re-imaged section). So the field is kept as
matched where the local correlation of the warped source with the target (both blurred by
:data:`GATE_BLUR_NM`, so that noise and focus do not count as other tissue; a square window
whose standard deviation is :data:`GATE_WINDOW_NM`; within it each image's plane of brightness
is taken out first, so that uneven illumination does not either) is at or above the gate's
upper end, smoothed where it is at or below its lower end (different tissue: neighbouring
sections), and blended in between; that blend weight is averaged over the same window and
squared, so the field turns from kept to smoothed gradually and a window that only partly
matches leans to the smoothed field; wherever the blend still comes near a fold (the pyramid's
own, or where the blend turns), the smoothed field takes over around it. On the benchmarks'
pairs the median same-section correlation is 0.99-1.0 (0.98-1.0 with heavy noise, a blurred
source or uneven illumination), that of FIB-SEM slices 40 nm apart about 0.86 and that of real
ssTEM neighbours about 0.7 (docs/experiments.md: "Smoothing only where the tissue differs", "A
gate that noise and focus do not open", "A gate that shading does not close").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metroem import fields
from metroem.errors import MetroemError

Tensor = torch.Tensor

__all__ = [
    "GATE",
    "GATE_WINDOW_NM",
    "check_gate",
    "checked_gate_arg",
    "data_weight",
    "gate_step",
    "gate_support_px",
    "grid_factor",
    "grid_multiple",
    "match_keep",
    "match_similarity",
    "regularized_field",
    "sigma_px",
    "smooth_field",
    "support_px",
]

WEIGHT_FLOOR = 1e-3  # pixels without data still count a little, so every window has a fit
SLOPE_RIDGE = 1e-9  # keeps the normal equations invertible in exact degenerate cases
# The match gate: local Pearson r of the warped source and the target at or below GATE[0] is
# "different tissue" (smoothed), at or above GATE[1] "the same tissue" (kept as matched).
GATE = (0.92, 0.98)
MIN_DATA_SHARE = 0.05  # a gate window with less data than this counts as no match
GATE_WINDOW_NM = 80.0  # std of the gate's square correlation window (a few membranes wide)
# both images are blurred by this much before the gate correlates them, so that noise and a
# focus difference between two images of the same section do not read as other tissue
GATE_BLUR_NM = 20.0
# keeps a window's plane fit solvable when its data lie on a line (relative to its data count)
PLANE_RIDGE = 1e-6
NEAR_FOLD_DET = 0.05  # a gated field whose Jacobian determinant falls to this is smoothed there
FOLD_PASSES = 2  # how many times that is checked and done


def sigma_px(length_nm: float, resolution_nm: float, mip: int = 0) -> float:
    """A length in nm as pixels of an image at ``mip`` whose MIP0 pixels are ``resolution_nm``."""
    if not (length_nm >= 0 and math.isfinite(length_nm)):
        raise MetroemError(f"smoothing length must be a number >= 0 nm, got {length_nm}")
    if not (resolution_nm > 0 and math.isfinite(resolution_nm)):
        raise MetroemError(
            f"resolution must be > 0 nm per pixel, got {resolution_nm}; pass the MIP0 pixel "
            "size of the images (e.g. --resolution_nm 4)"
        )
    return float(length_nm) / (float(resolution_nm) * 2 ** int(mip))


def grid_factor(sigma: float) -> int:
    """How much coarser the grid of the window sums is: the largest power of two at most
    ``sigma / 4`` (a power of two, so tiles cut at the usual multiples stay on the grid)."""
    return 1 << max(0, int(math.floor(math.log2(max(sigma, 1.0) / 4)))) if sigma >= 8 else 1


def support_px(sigma: float, robust_iterations: int = 2) -> int:
    """How far (px) a pixel's result can reach: a tile padded by this gives the whole-image
    result. Each reweighting round reaches one window further."""
    if sigma <= 0:
        return 0
    factor = grid_factor(sigma)
    one = (max(1, math.ceil(3 * sigma / factor)) + 2) * factor
    return (1 + robust_iterations) * one


def data_weight(src: Tensor, tgt: Tensor, field: Tensor) -> Tensor:
    """``(N, 1, H, W)``: 1 where the target has data and the field samples the source's data."""
    ok = fields.warp_image((src != 0).to(field.dtype), field) > 0.5
    return (ok & (tgt != 0)).to(field.dtype)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur, zero padding (sums of weighted values: outside counts 0)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def _axis_moments(x: Tensor, factor: int, sigma: float, powers: int) -> Tensor:
    """Per coarse cell (``factor`` px square, the last ones cut by the image edge), sums of
    ``x * u^k * v^l`` (``k, l < powers``), u/v the fine pixel's offset from its cell's centre
    in units of ``sigma``: ``(N, C, hc, wc, powers (v), powers (u))``. Sum pooling needs no
    padding, so a torch.export program of it holds for every image size."""
    _, _, h, w = x.shape

    def offsets(size: int) -> Tensor:
        i = torch.arange(size, dtype=x.dtype, device=x.device)
        return (torch.remainder(i, factor) - (factor - 1) / 2) / sigma

    def cell_sums(t: Tensor) -> Tensor:
        if factor == 1:
            return t
        return F.avg_pool2d(t, factor, factor, ceil_mode=True, divisor_override=1)

    v, u = offsets(h).view(1, 1, h, 1), offsets(w).view(1, 1, 1, w)
    rows = []
    for j in range(powers):
        xv = x * v**j if j else x  # (powers 0: no product)
        rows.append(torch.stack([cell_sums(xv * u**k if k else xv) for k in range(powers)],
                                dim=-1))
    return torch.stack(rows, dim=-2)


def _centres(n_cells: int, factor: int, size: int, sigma: float, like: Tensor) -> Tensor:
    """Global coordinates (about the image centre, in units of ``sigma``) of the cell centres."""
    i = torch.arange(n_cells, dtype=like.dtype, device=like.device)
    return (i * factor + (factor - 1) / 2 - (size - 1) / 2) / sigma


def _upsample_cells(coarse: Tensor, factor: int, h: int, w: int) -> Tensor:
    """Bilinear interpolation of per-cell values ``(N, C, hc, wc)`` at the ``h`` x ``w`` fine
    pixels, cell centres where ``F.interpolate(scale_factor=factor, align_corners=False)``
    puts them. Asked for the output size and the scale at once (the aten op takes both), so
    nothing is cropped: a torch.export program of it holds for every image size (a crop
    would tie it to whether the size is a multiple of ``factor``)."""
    return torch.ops.aten.upsample_bilinear2d.default(coarse, [h, w], False, float(factor),
                                                      float(factor))


def _local_linear(field: Tensor, weight: Tensor, sigma: float) -> Tensor:
    """One weighted local-linear fit of ``field``, see the module docstring.

    Window sums are collected per coarse cell about the cell's centre (small numbers, float32
    on the full-resolution data), moved to global coordinates and blurred in float64 on the
    coarse grid; the fitted coefficients of ``a + bx x + by y`` are interpolated back.
    """
    n, _, h, w = field.shape
    factor = grid_factor(sigma)
    hc, wc = -(-h // factor), -(-w // factor)
    wt = weight.to(field.dtype)
    m_w = _axis_moments(wt, factor, sigma, 3).double()[:, 0]  # (N, hc, wc, 3 (v), 3 (u))
    m_f = _axis_moments(field * wt, factor, sigma, 2).double()  # (N, 2, ., ., 2, 2)
    cx = _centres(wc, factor, w, sigma, m_w).view(1, 1, wc)
    cy = _centres(hc, factor, h, sigma, m_w).view(1, hc, 1)
    s0, su, sv = m_w[..., 0, 0], m_w[..., 0, 1], m_w[..., 1, 0]
    suu, suv, svv = m_w[..., 0, 2], m_w[..., 1, 1], m_w[..., 2, 0]
    cx2, cy2 = cx.unsqueeze(1), cy.unsqueeze(1)
    sums = torch.cat(
        [
            torch.stack(
                [s0, cx * s0 + su, cy * s0 + sv, cx * cx * s0 + 2 * cx * su + suu,
                 cx * cy * s0 + cx * sv + cy * su + suv, cy * cy * s0 + 2 * cy * sv + svv],
                dim=1,
            ),
            m_f[..., 0, 0],
            cx2 * m_f[..., 0, 0] + m_f[..., 0, 1],
            cy2 * m_f[..., 0, 0] + m_f[..., 1, 0],
        ],
        dim=1,
    )  # (N, 12, hc, wc): 1, x, y, xx, xy, yy of the weight; f, f x, f y of both channels
    sums = _gaussian_blur(sums, sigma / factor)
    s0, sx, sy, sxx, sxy, syy = sums[:, 0:6].unbind(1)
    ridge = SLOPE_RIDGE * s0
    row0 = torch.stack((s0, sx, sy), -1)
    row1 = torch.stack((sx, sxx + ridge, sxy), -1)
    row2 = torch.stack((sy, sxy, syy + ridge), -1)
    normal = torch.stack((row0, row1, row2), -2)  # (N, hc, wc, 3, 3)
    rhs = torch.stack((sums[:, 6:8], sums[:, 8:10], sums[:, 10:12]), -1)  # (N, 2, hc, wc, 3)
    coef = torch.linalg.solve(normal, rhs.permute(0, 2, 3, 4, 1))  # (N, hc, wc, 3, 2)
    coef = coef.permute(0, 3, 4, 1, 2).reshape(n, 6, hc, wc).to(field.dtype)
    if factor > 1:
        coef = _upsample_cells(coef, factor, h, w)
    ys = (torch.arange(h, dtype=field.dtype, device=field.device) - (h - 1) / 2) / sigma
    xs = (torch.arange(w, dtype=field.dtype, device=field.device) - (w - 1) / 2) / sigma
    return coef[:, 0:2] + coef[:, 2:4] * xs.view(1, 1, 1, w) + coef[:, 4:6] * ys.view(1, 1, h, 1)


def smooth_field(
    field: Tensor,
    sigma: float,
    weight: Tensor | None = None,
    robust_iterations: int = 2,
    robust_scale: float = 2.0,
) -> Tensor:
    """The field's local affine fit in a Gaussian window of ``sigma`` pixels (module docstring).

    ``field`` is ``(N, 2, H, W)`` in pixels; ``weight`` ``(N, 1, H, W)`` (or ``(H, W)``) >= 0,
    default all ones; ``sigma <= 0`` returns the field unchanged. ``robust_iterations`` rounds
    of reweighting by ``1 / (1 + (r / robust_scale)^2)``, ``r`` each pixel's distance (px) from
    the previous fit.
    """
    fields.check_field(field)
    if not math.isfinite(sigma):
        raise MetroemError(f"smoothing sigma must be finite, got {sigma}")
    if sigma <= 0:
        return field
    if robust_iterations < 0 or not robust_scale > 0:
        raise MetroemError("robust_iterations must be >= 0 and robust_scale > 0")
    n, _, h, w = field.shape
    base = torch.ones(n, 1, h, w, dtype=field.dtype, device=field.device)
    if weight is not None:
        weight = weight.to(field.dtype)
        if weight.shape[-2:] != (h, w):
            raise MetroemError(f"weight {tuple(weight.shape)} does not match field {(h, w)}")
        base = base * weight.reshape(-1, 1, h, w).clamp_min(0)
    base = base.clamp_min(WEIGHT_FLOOR)
    wt = base
    out = _local_linear(field, wt, float(sigma))
    for _ in range(robust_iterations):
        r = (field - out).pow(2).sum(1, keepdim=True).sqrt()
        wt = (base / (1 + (r / robust_scale) ** 2)).clamp_min(WEIGHT_FLOOR)
        out = _local_linear(field, wt, float(sigma))
    return out


def check_gate(gate) -> tuple[float, float] | None:
    """``gate`` as ``(low, high)`` correlations with ``-1 <= low < high <= 1``, or None for off
    (``None``, ``False``, ``"off"``); one-line error otherwise."""
    if gate is None or gate is False or (isinstance(gate, str) and gate.lower() == "off"):
        return None
    try:
        low, high = (float(v) for v in (gate.split(",") if isinstance(gate, str) else gate))
    except (TypeError, ValueError):
        raise MetroemError(f"smoothing gate must be two correlations LOW,HIGH (e.g. "
                           f"{GATE[0]},{GATE[1]}) or off, got {gate!r}") from None
    if not -1 <= low < high <= 1:
        raise MetroemError(f"smoothing gate {low:g},{high:g}: need -1 <= LOW < HIGH <= 1 "
                           f"(e.g. {GATE[0]},{GATE[1]}), or off")
    return low, high


def checked_gate_arg(text: str | None) -> str | tuple[float, float] | None:
    """A command line's ``--smoothing_gate``: None (the default), ``"off"`` or ``(low, high)``,
    checked (one-line error)."""
    if text is None:
        return None
    gate = check_gate(text)
    return "off" if gate is None else gate


def gate_blur_px(window_px: float) -> float:
    """The gate's blur (px) for a window of ``window_px``: both are physical lengths
    (:data:`GATE_BLUR_NM`, :data:`GATE_WINDOW_NM`), so one follows the other at every MIP."""
    return window_px * GATE_BLUR_NM / GATE_WINDOW_NM


def gate_step(window_px: float) -> int:
    """How much coarser the grid is on which the gate correlates (a power of two): both images
    are blurred by :func:`gate_blur_px` first, so sampling them every ``blur / 2`` pixels
    loses nothing the correlation would see, and costs a quarter per halving."""
    blur = gate_blur_px(window_px)
    return 1 << max(0, int(math.floor(math.log2(blur / 2)))) if blur >= 4 else 1


def grid_multiple(sigma: float, gate: tuple[float, float] | None, window_px: float) -> int:
    """Tile origins must be multiples of this (px) for :func:`regularized_field` on a tile to
    equal the whole image's: the smoothing's grid and, with a gate, the gate's."""
    factor = grid_factor(sigma) if sigma > 0 else 1
    return max(factor, gate_step(window_px)) if gate is not None and window_px > 0 else factor


def gate_support_px(window_px: float) -> int:
    """How far (px) the gate reaches: its blur, its correlation window, the keep map's
    average, and the fold check's reach and turn (:func:`regularized_field`)."""
    if not window_px > 0:
        return 0
    blur = math.ceil(3 * gate_blur_px(window_px))
    step = gate_step(window_px)
    window = step * (_box_radius(window_px / step) + 1)  # the correlation's, on its grid
    return blur + window + step + (1 + 2 * FOLD_PASSES) * (_box_radius(window_px) + 1)


def regularized_support_px(sigma: float, gate: tuple[float, float] | None,
                           window_px: float) -> int:
    """How far (px) :func:`regularized_field` reaches: the smoothing's support plus, with a
    gate, the gate's; a tile padded by this gives the whole-image result."""
    if sigma <= 0:
        return 0
    return support_px(sigma) + (gate_support_px(window_px) if gate is not None else 0)


def _blur_data(*imgs: Tensor, sigma: float) -> list[Tensor]:
    """Each ``(N, 1, H, W)`` image Gaussian-blurred over its data pixels only (normalised
    convolution: no data, 0, neither darkens nor brightens its surroundings; 0 stays 0), all
    in one float32 convolution."""
    if not sigma > 0:
        return list(imgs)
    parts = []
    for img in imgs:
        x = img.float()
        data = (x != 0).float()
        parts += [x * data, data]
    blurred = _gaussian_blur(torch.cat(parts, 1), sigma)
    out = []
    for i, img in enumerate(imgs):
        val, data = blurred[:, 2 * i : 2 * i + 1], blurred[:, 2 * i + 1 : 2 * i + 2]
        out.append((val / data.clamp_min(1e-6) * (img != 0)).to(img.dtype))
    return out


def match_similarity(src: Tensor, tgt: Tensor, field: Tensor, window_px: float,
                     weight: Tensor | None = None, blur_px: float | None = None) -> Tensor:
    """``(N, 1, H, W)``: local correlation of ``warp(src, field)`` and ``tgt`` in a square
    window whose standard deviation is ``window_px`` pixels (half-width about
    ``1.7 window_px``), over the pixels ``weight`` (default :func:`data_weight`) marks; 0 where
    a window holds little data or no contrast.

    * Both images are first blurred by ``blur_px`` (default :func:`gate_blur_px`): pixel noise
      and a focus difference lower the correlation of two images of the same section far more
      than that of their blurred copies, while the different membranes of neighbouring
      sections stay different.
    * Within each window the correlation is partial: each image's best-fitting plane in x and
      y is taken out first (weighted least squares over the window's data), so a brightness
      that changes slowly across the section (uneven illumination, charging) is no more
      "other tissue" than a uniform change of brightness or contrast is.

    docs/experiments.md, "A gate that noise and focus do not open" and "A gate that shading
    does not close"."""
    if not window_px > 0:
        raise MetroemError(f"the gate's window must be > 0 px, got {window_px}")
    if weight is None:
        weight = data_weight(src, tgt, field)
    blur = gate_blur_px(window_px) if blur_px is None else float(blur_px)
    # (both as floats: a uint8 target would have its blurred copy rounded back to uint8)
    src_b, tgt_b = _blur_data(src.to(field.dtype), tgt.to(field.dtype), sigma=blur)
    step = gate_step(window_px)
    full = field.shape[-2:]
    a = fields.warp_image(src_b, field)[..., ::step, ::step].double()
    b = tgt_b[..., ::step, ::step].double()
    w = weight[..., ::step, ::step].double()
    r = _box_radius(window_px / step)
    h, wd = a.shape[-2:]
    # coordinates in window half-widths (well-conditioned sums); the moments below are taken
    # about each window's centre pixel, so a tile gives the whole image's value
    ys = torch.arange(h, dtype=a.dtype, device=a.device)[:, None].expand(h, wd) / r
    xs = torch.arange(wd, dtype=a.dtype, device=a.device)[None, :].expand(h, wd) / r
    wx, wy = w * xs, w * ys
    sums = _box_sum(torch.cat([w, wx, wy, wx * xs, wy * ys, wx * ys,
                               a * w, a * wx, a * wy, b * w, b * wx, b * wy,
                               a * a * w, b * b * w, a * b * w], 1), r)
    s0, sx, sy = sums[:, 0:1], sums[:, 1:2], sums[:, 2:3]
    # the window's Gram matrix of (1, dx, dy), dx = x - x_centre: [[g00 g01 g02] ...]
    g01, g02 = sx - xs * s0, sy - ys * s0
    g11 = sums[:, 3:4] - 2 * xs * sx + xs * xs * s0
    g22 = sums[:, 4:5] - 2 * ys * sy + ys * ys * s0
    g12 = sums[:, 5:6] - xs * sy - ys * sx + xs * ys * s0
    g11 = g11 + PLANE_RIDGE * s0  # a window whose data lie on a line still has a fit
    g22 = g22 + PLANE_RIDGE * s0
    # its inverse by cofactors (elementwise: cheap, and exportable)
    c00 = g11 * g22 - g12 * g12
    c01 = g02 * g12 - g01 * g22
    c02 = g01 * g12 - g02 * g11
    c11 = s0 * g22 - g02 * g02
    c12 = g01 * g02 - s0 * g12
    c22 = s0 * g11 - g01 * g01
    det = (s0 * c00 + g01 * c01 + g02 * c02).clamp_min(1e-30)

    def moments(k: int) -> tuple[Tensor, Tensor, Tensor]:
        m0 = sums[:, k : k + 1]
        return m0, sums[:, k + 1 : k + 2] - xs * m0, sums[:, k + 2 : k + 3] - ys * m0

    def explained(u, v) -> Tensor:  # u' G^-1 v: the part of a cross moment the planes explain
        return (c00 * u[0] * v[0] + c11 * u[1] * v[1] + c22 * u[2] * v[2]
                + c01 * (u[0] * v[1] + u[1] * v[0]) + c02 * (u[0] * v[2] + u[2] * v[0])
                + c12 * (u[1] * v[2] + u[2] * v[1])) / det

    ma, mb = moments(6), moments(9)
    va = sums[:, 12:13] - explained(ma, ma)
    vb = sums[:, 13:14] - explained(mb, mb)
    cov = sums[:, 14:15] - explained(ma, mb)
    scale = (va.clamp_min(0) * vb.clamp_min(0)).sqrt()
    share = s0 / (2 * r + 1) ** 2
    ok = (share > MIN_DATA_SHARE) & (scale > 1e-9 * s0)
    out = torch.where(ok, cov / scale.clamp_min(1e-12), torch.zeros_like(cov)).clamp(-1, 1)
    if step > 1:  # back to every pixel from the valid samples only (no-data edges stay sharp)
        both = _upsample_grid(torch.cat([out, ok.double()], 1), step, *full)
        out = torch.where(both[:, 1:] > 1e-6, both[:, :1] / both[:, 1:].clamp_min(1e-6), 0.0)
    return out.to(field.dtype)


def _upsample_grid(x: Tensor, step: int, h: int, w: int) -> Tensor:
    """``x`` sampled at every ``step``-th pixel (sample ``j`` at pixel ``step * j``) back at
    every pixel of ``h x w``, bilinearly (beyond the last sample: its value)."""
    if step == 1:
        return x
    for dim, n in ((-2, h), (-1, w)):
        pos = torch.arange(n, dtype=x.dtype, device=x.device) / step
        lo = pos.floor().long().clamp(max=x.shape[dim] - 1)
        hi = (lo + 1).clamp(max=x.shape[dim] - 1)
        frac = (pos - lo).clamp(0, 1)
        shape = [n, 1] if dim == -2 else [n]
        frac = frac.view(shape)
        x = x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac
    return x


def _box_radius(window_px: float) -> int:
    """Half-width of the square window whose standard deviation is ``window_px``."""
    return max(1, round(math.sqrt(3) * window_px - 0.5))


def _box_sum(x: Tensor, r: int) -> Tensor:
    """Sums over the ``(2r+1)^2`` window around each pixel, zero outside (cumulative sums in
    float64: cost independent of ``r``, the same value for a pixel in a tile and the whole)."""
    x = F.pad(x, (r + 1, r, r + 1, r))
    c = x.cumsum(-1)
    x = c[..., 2 * r + 1 :] - c[..., : -2 * r - 1]
    c = x.cumsum(-2)
    return c[..., 2 * r + 1 :, :] - c[..., : -2 * r - 1, :]


def match_keep(src: Tensor, tgt: Tensor, field: Tensor, gate: tuple[float, float],
               window_px: float, weight: Tensor | None = None) -> Tensor:
    """``(N, 1, H, W)`` in [0, 1]: how much of the matched field the gate keeps (1 where the
    warped source matches like the same section, 0 where the tissue differs or there is no
    data), turning over about one window so the blended field does not fold."""
    if weight is None:
        weight = data_weight(src, tgt, field)
    checked = check_gate(gate)
    if checked is None:
        raise MetroemError("match_keep needs a gate (LOW, HIGH), not 'off'")
    low, high = checked
    r = match_similarity(src, tgt, field, window_px, weight)
    data = (weight > 0).double()
    keep = ((r.double() - low) / (high - low)).clamp(0, 1) * data
    # averaged once more over the window's data pixels, so the blend turns slowly (a sharp
    # edge between the kept and the smoothed field folds it), then squared, so a window
    # that only partly matches leans to the smoothed field (docs/experiments.md: morph 0.66
    # -> 0.46 px on 40 nm neighbours, same-section unchanged on ISBI)
    sums = _box_sum(torch.cat([keep, data], 1), _box_radius(window_px))
    return ((sums[:, 0:1] / sums[:, 1:2].clamp_min(1e-6)) ** 2 * data).to(field.dtype)


def regularized_field(field: Tensor, src: Tensor, tgt: Tensor, sigma: float,
                      gate: tuple[float, float] | None = None,
                      window_px: float = 0.0) -> Tensor:
    """The field smoothed over ``sigma`` px (:func:`smooth_field`, weighted by
    :func:`data_weight`), kept as matched where the match gate says the two images show the
    same tissue (module docstring). ``src``/``tgt`` ``(N, 1, H, W)`` are the images the field
    aligns (0 = no data); ``gate`` ``(low, high)`` or None for plain smoothing; ``window_px``
    the gate's window in pixels of the field."""
    if sigma <= 0:
        return field
    weight = data_weight(src, tgt, field)
    smooth = smooth_field(field, sigma, weight)
    gate = check_gate(gate)
    if gate is None:
        return smooth
    keep = match_keep(src, tgt, field, gate, window_px, weight)
    # the kept field may fold (a pyramid's own fold), and two fold-free fields blended can
    # fold where the blend turns (the edge of the data, a sharp change of match): near a
    # fold the smoothed field takes over, turning over the window; twice, for the new turn
    radius = _box_radius(window_px)
    for _ in range(FOLD_PASSES):
        out = smooth + keep * (field - smooth)
        det = fields.jacobian_determinant(out)[:, None]
        near_fold = F.pad((det <= NEAR_FOLD_DET).double(), (0, 1, 0, 1))
        # (a shortcut only: without a fold the passes below change nothing; torch.export
        # cannot branch on data, so the exported program always runs them)
        if not torch.compiler.is_exporting() and not near_fold.any():
            return out
        near = (_box_sum(near_fold, radius) > 0.5).double()
        release = _box_sum(near, radius) / (2 * radius + 1) ** 2
        keep = keep * (1 - release).to(keep.dtype)
    return smooth + keep * (field - smooth)
