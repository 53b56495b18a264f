"""Alignment quality metrics: end-point error, equivariance, chunked Pearson, folds, residuals.

Every metric takes fields in metroem's convention (:mod:`metroem.fields`: pull, pixels, channel 0
= x) and images where 0 means no data. Inputs may be single items (``(H, W)`` images, ``(2, H,
W)`` fields) or batches of one (``(1, 1, H, W)``, ``(1, 2, H, W)``); results are plain floats so
they drop straight into JSON tables.

Equivariance (:func:`equivariance_target`): if ``f0`` aligns ``S`` to ``T`` and the source is
deformed, ``S' = warp(S, d)``, then with ``h = invert(d)`` (so ``warp(S', h) = S``) the field that
aligns ``S'`` to ``T`` is "warp by h, then by f0": ``compose(h, f0)(p) = f0(p) + h(p + f0(p))``.
A method is equivariant when its field on ``(S', T)`` matches that; the gap is measured in pixels
and needs no ground truth for the undeformed pair, so it works on real neighbouring sections.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from metroem import fields

Tensor = torch.Tensor

__all__ = [
    "as_field",
    "as_image",
    "valid_after_warp",
    "epe_map",
    "epe_stats",
    "equivariance_target",
    "equivariance_epe",
    "chunked_pearson",
    "pearson_summary",
    "fold_stats",
    "roughness",
    "strain_stats",
    "gradient_norm_stats",
    "affine_fit",
    "nonaffine_stats",
    "interior_mask",
    "residual",
]


def as_field(field) -> Tensor:
    """A field as a float32 ``(1, 2, H, W)`` tensor (accepts ``(2, H, W)`` and numpy)."""
    t = torch.as_tensor(np.asarray(field) if not isinstance(field, Tensor) else field)
    t = t.detach().float().cpu()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    fields.check_field(t)
    if t.shape[0] != 1:
        raise ValueError(f"metrics take one field at a time, got a batch of {t.shape[0]}")
    return t


def as_image(img) -> Tensor:
    """An image as a float32 ``(1, 1, H, W)`` tensor (accepts ``(H, W)``, ``(1, H, W)``, numpy)."""
    t = torch.as_tensor(np.asarray(img) if not isinstance(img, Tensor) else img)
    t = t.detach().float().cpu()
    while t.dim() < 4:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 1:
        raise ValueError(f"expected one single-channel image, got shape {tuple(t.shape)}")
    return t


def _as_mask(mask, shape: tuple[int, int]) -> Tensor:
    """Boolean ``(H, W)`` mask; ``None`` means every pixel."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
    m = m.detach().cpu().reshape(m.shape[-2:]) != 0
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask size {tuple(m.shape)} != field size {tuple(shape)}")
    return m


def valid_after_warp(src, field, margin: int = 0) -> Tensor:
    """Pixels ``p`` whose sample point ``p + field(p)`` lands inside the source's tissue.

    A pixel counts when the bilinear warp of the source's validity mask (``src != 0``) is
    fully valid there; ``margin`` also drops that many pixels along the image border.
    Returns a boolean ``(H, W)`` mask.
    """
    s, f = as_image(src), as_field(field)
    ok = fields.warp_image((s != 0).float(), f)[0, 0] > 0.999
    if margin > 0:
        border = torch.zeros_like(ok)
        border[margin:-margin, margin:-margin] = True
        ok &= border
    return ok


def epe_map(field, gt) -> Tensor:
    """Per-pixel end-point error ``|field - gt|`` in pixels, shape ``(H, W)``."""
    f, g = as_field(field), as_field(gt)
    if f.shape != g.shape:
        raise ValueError(f"field {tuple(f.shape)} and ground truth {tuple(g.shape)} differ")
    return (f - g).pow(2).sum(1).sqrt()[0]


def _stats(values: Tensor) -> dict[str, float]:
    if values.numel() == 0:
        nan = float("nan")
        return {"median": nan, "p95": nan, "max": nan, "mean": nan, "pixels": 0}
    v = values.double()
    return {
        "median": float(v.median()),
        "p95": float(torch.quantile(v, 0.95)) if v.numel() < 16_000_000 else float("nan"),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "pixels": int(v.numel()),
    }


def epe_stats(field, gt, mask=None) -> dict[str, float]:
    """End-point error statistics (median, p95, max, mean, pixels) over ``mask != 0`` pixels.

    Use a tissue mask (e.g. :func:`valid_after_warp` of the source under the ground truth) so
    pixels that map outside the data do not count.
    """
    err = epe_map(field, gt)
    return _stats(err[_as_mask(mask, tuple(err.shape))])


def equivariance_target(f0, h) -> Tensor:
    """The field a consistent method returns on the deformed pair: ``compose(h, f0)``.

    ``f0`` is the method's field on the undeformed pair ``(S, T)``; ``h = invert(d)`` undoes the
    synthetic deformation of the source (``S' = warp(S, d)``). Result: ``f0(p) + h(p + f0(p))``,
    shape ``(1, 2, H, W)``.
    """
    return fields.compose(as_field(h), as_field(f0))


def equivariance_epe(field_deformed, f0, h, mask=None) -> dict[str, float]:
    """EPE between the method's field on the deformed pair and :func:`equivariance_target`."""
    return epe_stats(field_deformed, equivariance_target(f0, h), mask)


def _blocks(x: Tensor, chunk: int) -> Tensor:
    """``(H, W)`` -> ``(nby, nbx, chunk*chunk)`` non-overlapping blocks (remainder dropped)."""
    nby, nbx = x.shape[0] // chunk, x.shape[1] // chunk
    x = x[: nby * chunk, : nbx * chunk]
    return x.reshape(nby, chunk, nbx, chunk).permute(0, 2, 1, 3).reshape(nby, nbx, -1)


def chunked_pearson(a, b, chunk: int = 32, min_valid: float = 0.5) -> Tensor:
    """Pearson r of ``a`` and ``b`` in each ``chunk x chunk`` block, shape ``(H//chunk, W//chunk)``.

    Within a block, both images are z-normalised over the pixels valid in both (nonzero), and r
    is the mean product of the z-scores. Blocks with fewer than ``min_valid`` of their pixels
    valid, or with a flat image, are NaN (no evidence either way). Use it between a warped
    section and its neighbour: low-r blocks show where the alignment (or the data) is bad.
    """
    x, y = as_image(a)[0, 0].double(), as_image(b)[0, 0].double()
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {tuple(x.shape)} vs {tuple(y.shape)}")
    if chunk < 2 or chunk > min(x.shape):
        raise ValueError(f"chunk must be in [2, {min(x.shape)}], got {chunk}")
    xb, yb = _blocks(x, chunk), _blocks(y, chunk)
    valid = (xb != 0) & (yb != 0)
    n = valid.sum(-1).double()
    w = valid.double()
    safe_n = n.clamp_min(1).unsqueeze(-1)
    xm = (xb * w).sum(-1, keepdim=True) / safe_n
    ym = (yb * w).sum(-1, keepdim=True) / safe_n
    xc, yc = (xb - xm) * w, (yb - ym) * w
    xs = (xc.pow(2).sum(-1) / n.clamp_min(1)).sqrt()
    ys = (yc.pow(2).sum(-1) / n.clamp_min(1)).sqrt()
    r = (xc * yc).sum(-1) / n.clamp_min(1) / (xs * ys).clamp_min(1e-12)
    enough = (n >= min_valid * chunk * chunk) & (xs > 1e-6) & (ys > 1e-6)
    return torch.where(enough, r.clamp(-1, 1), torch.full_like(r, math.nan)).float()


def pearson_summary(rmap, low: float = 0.3) -> dict[str, float]:
    """Summary of a chunked-Pearson map over its non-NaN blocks.

    mean, median and 5th percentile of r, the fraction of blocks with ``r < low`` (likely
    misaligned or damaged), and the number of blocks that had data.
    """
    r = torch.as_tensor(np.asarray(rmap) if not isinstance(rmap, Tensor) else rmap).float()
    v = r[~torch.isnan(r)].double()
    if v.numel() == 0:
        nan = float("nan")
        return {"mean": nan, "median": nan, "p5": nan, "frac_low": nan, "blocks": 0}
    return {
        "mean": float(v.mean()),
        "median": float(v.median()),
        "p5": float(torch.quantile(v, 0.05)),
        "frac_low": float((v < low).double().mean()),
        "blocks": int(v.numel()),
    }


def fold_stats(field, mask=None) -> dict[str, float]:
    """Folds: pixels where the Jacobian determinant of ``p -> p + field(p)`` is ``<= 0``.

    Returns the count, the fraction of counted pixels, and the minimum determinant. ``mask``
    (``(H, W)``) restricts the count; the determinant grid is ``(H-1, W-1)`` (forward
    differences), so the mask is cropped to match.
    """
    f = as_field(field)
    det = fields.jacobian_determinant(f)[0]
    m = _as_mask(mask, tuple(f.shape[-2:]))[: det.shape[0], : det.shape[1]]
    d = det[m]
    if d.numel() == 0:
        return {"count": 0, "fraction": float("nan"), "min_det": float("nan")}
    count = int((d <= 0).sum())
    return {"count": count, "fraction": count / d.numel(), "min_det": float(d.min())}


def strain_stats(field, mask=None) -> dict[str, float]:
    """Local strain of ``p -> p + field(p)``: per pixel the larger ``|s - 1|`` of the two
    singular values ``s`` of its Jacobian (0 for translations and rotations, 0.05 for a 5 %
    stretch). Returns the median, p95 and max over interior pixels (within ``mask``).

    Says how hard a deformation is for a method that matches windows: section distortions
    in real EM are a few percent; a synthetic elastic field can easily reach tens.
    """
    f = as_field(field)[0].double()
    gx = (f[:, 1:-1, 2:] - f[:, 1:-1, :-2]) / 2  # d/dx of (u, v)
    gy = (f[:, 2:, 1:-1] - f[:, :-2, 1:-1]) / 2  # d/dy of (u, v)
    jac = torch.stack((gx, gy), -1).permute(1, 2, 0, 3)  # (H-2, W-2, 2, 2): rows u, v
    jac = jac + torch.eye(2, dtype=jac.dtype)
    s = torch.linalg.svdvals(jac.reshape(-1, 2, 2))
    dev = (s - 1).abs().amax(1).reshape(jac.shape[:2])
    if mask is not None:
        dev = dev[_as_mask(mask, tuple(f.shape[-2:]))[1:-1, 1:-1]]
    return _stats(dev.flatten())


def gradient_norm_stats(field, mask=None) -> dict[str, float]:
    """Frobenius norm of the field's spatial gradient (px/px) per pixel, central differences:
    0 for a translation, about ``angle`` (rad) x sqrt(2) for a small rotation. Returns median,
    p95 and max over interior pixels (within ``mask``).

    A field between real neighbouring sections should be nearly affine, so this stays small
    (a few hundredths); a field that bends each neurite onto its neighbour's ("morphing") has
    gradients of tenths.
    """
    f = as_field(field)[0].double()
    gx = (f[:, 1:-1, 2:] - f[:, 1:-1, :-2]) / 2
    gy = (f[:, 2:, 1:-1] - f[:, :-2, 1:-1]) / 2
    norm = (gx.pow(2) + gy.pow(2)).sum(0).sqrt()
    if mask is not None:
        norm = norm[_as_mask(mask, tuple(f.shape[-2:]))[1:-1, 1:-1]]
    return _stats(norm.flatten())


def interior_mask(shape: tuple[int, int], margin: int) -> Tensor:
    """Boolean ``(H, W)`` mask without a ``margin``-pixel band along the border."""
    h, w = shape
    m = torch.zeros(h, w, dtype=torch.bool)
    if 2 * margin < h and 2 * margin < w:
        m[margin : h - margin, margin : w - margin] = True
    return m


def affine_fit(field, mask=None) -> Tensor:
    """The least-squares affine field ``A [x, y, 1]`` of ``field`` over ``mask`` (all pixels if
    None), as a ``(1, 2, H, W)`` field."""
    f = as_field(field)
    h, w = f.shape[-2:]
    m = _as_mask(mask, (h, w)).reshape(-1)
    if int(m.sum()) < 3:
        raise ValueError("an affine fit needs at least 3 pixels in the mask")
    ys = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    design = torch.stack((gx, gy, torch.ones_like(gx)), -1).reshape(-1, 3)
    values = f[0].reshape(2, -1).T.double()
    coef = torch.linalg.lstsq(design[m], values[m]).solution  # (3, 2)
    return (design @ coef).T.reshape(1, 2, h, w).float()


def nonaffine_stats(field, mask=None) -> dict[str, float]:
    """Size (px) of what is left of ``field`` after its least-squares affine fit over ``mask``.

    On a pair whose right field is affine (real neighbouring sections of a small field of
    view, registered slices) this residual is the "morph": the part of the field that bends
    one section's tissue onto the other's. Median, p95, max, mean over ``mask``.
    """
    f = as_field(field)
    m = _as_mask(mask, tuple(f.shape[-2:]))
    rest = (f - affine_fit(f, m)).pow(2).sum(1).sqrt()[0]
    return _stats(rest[m])


def roughness(field, mask=None) -> float:
    """RMS of the 5-point Laplacian of the field (pixels): zero for any affine field.

    Measures high-frequency jitter a smooth deformation does not have; computed on interior
    pixels (and within ``mask`` if given).
    """
    f = as_field(field).double()
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=f.dtype).view(1, 1, 3, 3)
    lap = F.conv2d(f.reshape(2, 1, *f.shape[-2:]), k)  # (2, 1, H-2, W-2)
    mag2 = lap.pow(2).sum(0)[0]
    if mask is not None:
        m = _as_mask(mask, tuple(f.shape[-2:]))[1:-1, 1:-1]
        mag2 = mag2[m]
    return float(mag2.mean().sqrt()) if mag2.numel() else float("nan")


def residual(warped, tgt, mask=None) -> dict[str, float]:
    """Similarity of a warped source and its target over pixels valid in both (and ``mask``).

    ``mse`` is in squared intensity units of the inputs; ``ncc`` is the global normalised
    cross-correlation (Pearson r) over those pixels, 1 for a perfect (affine-intensity) match.
    """
    a, b = as_image(warped)[0, 0].double(), as_image(tgt)[0, 0].double()
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {tuple(a.shape)} vs {tuple(b.shape)}")
    m = (a != 0) & (b != 0) & _as_mask(mask, tuple(a.shape))
    x, y = a[m], b[m]
    if x.numel() < 2:
        return {"mse": float("nan"), "ncc": float("nan"), "pixels": int(x.numel())}
    xc, yc = x - x.mean(), y - y.mean()
    denom = float(xc.norm() * yc.norm())
    ncc = float((xc * yc).sum()) / denom if denom > 0 else float("nan")
    return {"mse": float((x - y).pow(2).mean()), "ncc": ncc, "pixels": int(x.numel())}
