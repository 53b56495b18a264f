"""Pictures of images and fields as uint8 RGB arrays ``(H, W, 3)``.

Used for tensorboard panels during training and for evaluation reports (maps, legends and simple
line charts drawn with PIL, no matplotlib). Everything here takes single items (``(H, W)``
images, ``(2, H, W)`` fields) as tensors or arrays.
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

    def near_line(s: np.ndarray) -> np.ndarray:
        # Distance to the nearest grid line, against a half-width that grows where the map
        # stretches (so a line never breaks into dashes between two pixels).
        gy, gx = np.gradient(s)
        half = 0.5 * thickness * np.maximum(np.maximum(np.abs(gx), np.abs(gy)), 1.0)
        dist = np.abs(np.mod(s + spacing / 2, spacing) - spacing / 2)
        return dist < half

    on = near_line(sx) | near_line(sy)
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

    from metroem.atomic import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
    return path


# --- maps, legends and charts for evaluation reports -------------------------------------------

# A perceptually ordered dark-blue -> teal -> yellow ramp (viridis-like control points).
_RAMP = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float32
)
NAN_RGB = (150, 150, 150)


def heatmap(values, lo: float, hi: float, cell: int = 1) -> np.ndarray:
    """Scalar map -> RGB on a dark-blue..yellow ramp; NaN shows grey.

    ``cell`` repeats each value into a ``cell x cell`` square (block maps at image scale).
    """
    a = _np(values)
    t = np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)
    t = np.nan_to_num(t, nan=0.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(t).astype(int), len(_RAMP) - 2)
    frac = (t - i)[..., None]
    rgb = _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac
    rgb[np.isnan(a)] = NAN_RGB
    out = rgb.round().astype(np.uint8)
    if cell > 1:
        out = out.repeat(cell, axis=0).repeat(cell, axis=1)
    return out


def colorbar(lo: float, hi: float, height: int = 256, width: int = 16) -> np.ndarray:
    """Vertical legend for :func:`heatmap` (``hi`` at the top) with its end values printed."""
    ramp = np.linspace(hi, lo, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    bar = heatmap(ramp, lo, hi)
    pad = np.full((height, 44, 3), 255, np.uint8)
    out = np.concatenate((bar, pad), axis=1)
    out = draw_text(out, f"{hi:g}", (width + 3, 0))
    return draw_text(out, f"{lo:g}", (width + 3, height - 12))


def color_wheel(size: int = 96) -> np.ndarray:
    """Legend for :func:`field_rgb`: displacement direction as hue, magnitude as saturation.

    The point at (x, y) from the centre shows the colour of a displacement (x, y) (image
    axes: y grows downwards), full saturation at the rim.
    """
    r = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - r
    f = np.stack((xx, yy))
    rgb = field_rgb(f, max_mag=r)
    rgb[np.hypot(xx, yy) > r] = 255
    return rgb


def _font(size: int = 12):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw_text(
    rgb: np.ndarray, text: str, xy: tuple[int, int], color=(0, 0, 0), size: int = 12
) -> np.ndarray:
    """Copy of ``rgb`` with ``text`` drawn at pixel ``xy`` (top-left)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb))
    ImageDraw.Draw(im).text(xy, text, fill=tuple(color), font=_font(size))
    return np.asarray(im).copy()


def titled(rgb: np.ndarray, title: str, size: int = 13) -> np.ndarray:
    """Panel with a white title strip above it."""
    strip = np.full((size + 8, rgb.shape[1], 3), 255, np.uint8)
    strip = draw_text(strip, title, (3, 3), size=size)
    return np.concatenate((strip, rgb), axis=0)


def stack_rows(*rows: np.ndarray, gap: int = 4) -> np.ndarray:
    """Stack RGB panels vertically (left-aligned, padded white to the widest) with gaps."""
    w = max(r.shape[1] for r in rows)
    parts = []
    for i, r in enumerate(rows):
        if r.shape[1] != w:
            r = np.concatenate((r, np.full((r.shape[0], w - r.shape[1], 3), 255, np.uint8)), 1)
        parts.append(r)
        if i < len(rows) - 1:
            parts.append(np.full((gap, w, 3), 255, np.uint8))
    return np.concatenate(parts, axis=0)


# Distinct line colours for charts (colour-blind-friendly Okabe-Ito order, then greys).
CHART_COLORS = [
    (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233),
    (213, 94, 0), (0, 0, 0), (190, 160, 0), (120, 120, 120), (170, 60, 60), (60, 60, 170),
    (90, 150, 60),
]


def line_chart(
    series: dict[str, list[float]],
    xlabels: list[str],
    title: str = "",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (760, 420),
    colors: dict[str, tuple[int, int, int]] | None = None,
    dashed: set[str] | frozenset[str] = frozenset(),
) -> np.ndarray:
    """A simple line chart (one line per series over categorical x) as an RGB array.

    NaN / missing values break the line. ``log_y`` plots log10 of positive values, with tick
    labels at powers of ten. ``colors`` overrides a series' colour; series in ``dashed`` are
    drawn with dashes (e.g. a variant in its base method's colour).
    """
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 170, 30, 40
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    font = _font(12)

    def tr(v):
        if v is None or not np.isfinite(v) or (log_y and v <= 0):
            return None
        return float(np.log10(v)) if log_y else float(v)

    vals = [tr(v) for s in series.values() for v in s]
    vals = [v for v in vals if v is not None] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if log_y:
        lo, hi = np.floor(lo), np.ceil(hi)
    else:
        lo = min(lo, 0.0)
    if hi - lo < 1e-9:
        hi = lo + 1
    pw, ph = w - left - right, h - top - bottom

    def px(i: int, v: float) -> tuple[float, float]:
        x = left + (i + 0.5) * pw / max(len(xlabels), 1)
        return x, top + ph - (v - lo) / (hi - lo) * ph

    ticks = (
        [float(t) for t in np.arange(lo, hi + 0.5)]
        if log_y
        else [float(t) for t in np.linspace(lo, hi, 5)]
    )
    for t in ticks:
        _, y = px(0, t)
        d.line([(left, y), (left + pw, y)], fill=(225, 225, 225))
        label = f"{10 ** t:g}" if log_y else f"{t:.3g}"
        d.text((4, y - 7), label, fill=(0, 0, 0), font=font)
    d.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for i, name in enumerate(xlabels):
        x, _ = px(i, lo)
        d.text((x - 3 * len(name), top + ph + 6), name, fill=(0, 0, 0), font=font)
    d.text((left, 6), title, fill=(0, 0, 0), font=_font(14))
    d.text((left, h - 16), ylabel, fill=(80, 80, 80), font=font)
    def segment(p0, p1, col, dash: bool, width: int = 2):
        if not dash:
            d.line([p0, p1], fill=col, width=width)
            return
        length = float(np.hypot(p1[0] - p0[0], p1[1] - p0[1]))
        for s in np.arange(0, length, 9.0):
            a, b = s / max(length, 1e-9), min(s + 5.0, length) / max(length, 1e-9)
            d.line([(p0[0] + a * (p1[0] - p0[0]), p0[1] + a * (p1[1] - p0[1])),
                    (p0[0] + b * (p1[0] - p0[0]), p0[1] + b * (p1[1] - p0[1]))],
                   fill=col, width=width)

    colors = colors or {}
    for k, (name, ys) in enumerate(series.items()):
        col = tuple(colors.get(name, CHART_COLORS[k % len(CHART_COLORS)]))
        dash = name in dashed
        pts = [(i, tr(v)) for i, v in enumerate(ys)]
        for (i0, a), (i1, b) in zip(pts, pts[1:], strict=False):
            if a is not None and b is not None:
                segment(px(i0, a), px(i1, b), col, dash)
        for i, v in pts:
            if v is not None:
                x, y = px(i, v)
                box = [x - 3, y - 3, x + 3, y + 3]
                d.ellipse(box, fill=(255, 255, 255) if dash else col, outline=col, width=2)
        ly = top + 4 + 16 * k
        segment((left + pw + 10, ly + 7), (left + pw + 30, ly + 7), col, dash, width=3)
        d.text((left + pw + 36, ly), name, fill=(0, 0, 0), font=font)
    return np.asarray(im).copy()
