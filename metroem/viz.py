"""Pictures of images and fields as uint8 RGB arrays ``(H, W, 3)``.

Used for tensorboard panels during training and for evaluation reports. Everything here takes
single items (``(H, W)`` images, ``(2, H, W)`` fields) as tensors or arrays.
"""

from __future__ import annotations

import os

import numpy as np
import torch


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def gray(img, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Greyscale image -> RGB uint8, robustly contrast-stretched over nonzero pixels."""
    a = _np(img)
    valid = a != 0
    vals = a[valid] if valid.any() else a.ravel()
    lo = float(np.percentile(vals, 1)) if lo is None else lo
    hi = float(np.percentile(vals, 99)) if hi is None else hi
    out = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    out[~valid] = 0
    return np.repeat((out * 255).astype(np.uint8)[..., None], 3, axis=2)


def overlay(src, tgt) -> np.ndarray:
    """Red-green overlay: source in red, target in green; aligned structure looks yellow."""
    r = gray(src)[..., 0]
    g = gray(tgt)[..., 0]
    return np.stack((r, g, np.zeros_like(r)), axis=2)


def checkerboard(src, tgt, tiles: int = 8) -> np.ndarray:
    """Alternate tiles of source and target; misalignment shows as broken edges at tile seams."""
    a, b = gray(src), gray(tgt)
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy * tiles // h) + (xx * tiles // w)) % 2 == 0
    return np.where(mask[..., None], a, b)


def difference(src, tgt) -> np.ndarray:
    """Absolute difference of the two normalised images over pixels valid in both."""
    a, b = _np(src), _np(tgt)
    valid = (a != 0) & (b != 0)

    def norm(x):
        v = x[valid]
        return (x - v.mean()) / (v.std() + 1e-6) if v.size else x

    d = np.abs(norm(a) - norm(b)) * valid
    return gray(d, lo=0.0, hi=max(float(np.percentile(d, 99)), 1e-6))


def field_rgb(field, max_mag: float | None = None) -> np.ndarray:
    """Colour-wheel rendering: hue = direction, saturation = magnitude (white = no motion)."""
    f = _np(field)
    u, v = f[0], f[1]
    mag = np.hypot(u, v)
    max_mag = float(np.percentile(mag, 99)) if max_mag is None else max_mag
    max_mag = max(max_mag, 1e-6)
    hue = (np.arctan2(v, u) / (2 * np.pi)) % 1.0
    sat = np.clip(mag / max_mag, 0, 1)
    return (_hsv_to_rgb(hue, sat, np.ones_like(hue)) * 255).astype(np.uint8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays in [0, 1]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,), np.float32)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        out[sel] = np.stack((r[sel], g[sel], b[sel]), axis=1)
    return out


def field_grid(field, spacing: int = 16, thickness: int = 1) -> np.ndarray:
    """A regular grid deformed by the field: each output pixel shows the grid at p + f(p)."""
    f = _np(field)
    h, w = f.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sx, sy = xx + f[0], yy + f[1]
    on = (np.mod(sx, spacing) < thickness) | (np.mod(sy, spacing) < thickness)
    img = np.full((h, w, 3), 255, np.uint8)
    img[on] = (40, 40, 160)
    return img


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate RGB panels of equal height horizontally with white gaps."""
    h = max(p.shape[0] for p in panels)
    parts = []
    for i, p in enumerate(panels):
        if p.shape[0] != h:
            pad = np.full((h - p.shape[0], p.shape[1], 3), 255, np.uint8)
            p = np.concatenate((p, pad), axis=0)
        parts.append(p)
        if i < len(panels) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def save_png(path: str, rgb: np.ndarray) -> str:
    """Write an RGB uint8 array as PNG atomically (temp file in the same folder, then rename)."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
