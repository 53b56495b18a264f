"""Demo volume: a misaligned EM-like stack with a known ground-truth field layer.

Builds, from nothing, three local precomputed layers under one folder::

    <out_dir>/image          observed (misaligned) sections, uint8, MIPs 0..num_mips-1
    <out_dir>/field_gt       g_z: the field that aligns observed section z back onto the
                             aligned frame, float32, 2 channels, pixels of each MIP
    <out_dir>/image_aligned  the aligned sections (for reference)
    <out_dir>/demo.json      what was built and how

The aligned stack is procedural (cell membranes, mitochondria, vesicles, synapses, grain and
uneven illumination, changing smoothly from section to section) or a folder of real images.
Each section z is misaligned by a known smooth deformation d_z (random-walk drift + small affine
+ elastic); ``g_z = invert(d_z)``. The field aligning source z onto target z-1 is
``compose(g_z, invert(g_{z-1}))`` (:func:`pair_ground_truth`). See docs/demo.md.

Example::

    metroem-demo-volume demo_volume                      # 12 sections of 1024 x 1024, 4 MIPs
    python -m metroem.demo_volume demo_isbi --sections_dir ../shared/data/isbi --num_mips 3
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from metroem import cliargs, fields, synth, volumes
from metroem.atomic import replace_dir, temp_name
from metroem.errors import MetroemError, cli_errors
from metroem.images import load_sections

Tensor = torch.Tensor

log = logging.getLogger(__name__)

__all__ = [
    "DemoVolume",
    "build_demo_volume",
    "procedural_stack",
    "misalignment_fields",
    "pair_ground_truth",
    "main",
]

LAYERS = {"image": "image", "field": "field_gt", "aligned": "image_aligned"}


# --- procedural EM-like sections ----------------------------------------------------------------


def _zsmooth_noise(gen, nz: int, h: int, w: int, cell: float, every: float, ch: int = 1) -> Tensor:
    """Smooth noise ``(nz, ch, h, w)``, unit std: spatial correlation ``cell`` px, changing
    smoothly along z (independent key planes every ``every`` sections, linear in between)."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    nkey = math.ceil((nz - 1) / every) + 2
    keys = torch.randn(nkey, ch, gh, gw, generator=gen)
    zpos = torch.arange(nz, dtype=torch.float32) / every
    lo = zpos.floor().long()
    t = (zpos - lo).view(nz, 1, 1, 1)
    coarse = keys[lo] * (1 - t) + keys[lo + 1] * t
    coarse = coarse / coarse.flatten(1).std(dim=1).clamp_min(1e-6).view(nz, 1, 1, 1)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)


def _blur_noise(gen, n: int, h: int, w: int, factor: int) -> Tensor:
    """White noise upsampled ``factor`` x: grainy texture with ~``factor`` px correlation."""
    small = torch.randn(n, 1, math.ceil(h / factor) + 1, math.ceil(w / factor) + 1, generator=gen)
    big = F.interpolate(small, scale_factor=factor, mode="bilinear", align_corners=False)
    return big[..., :h, :w] / big.std()


@dataclass
class _Tissue:
    """3-D layout: neurite centres move linearly through z; organelles ride on their cells."""

    pos0: Tensor  # (S, 2) cell centre at z = 0, (x, y) px
    vel: Tensor  # (S, 2) px per section
    radius: Tensor  # (S,) additive Voronoi weight in px (larger = bigger cell)
    wobble: Tensor  # (S, 2) phase and rate of the size change along z
    shade: Tensor  # (S,) cytoplasm brightness offset
    mito: Tensor  # (M, 8) cell, offset x, offset y, half length, half width, angle, z0, z1
    syn: Tensor  # (Y, 4) pre cell, post cell, z0, z1


def _layout(gen, nz: int, h: int, w: int, cell_px: float) -> _Tissue:
    """Draw the cells (a jittered grid of large ones plus random small ones) and organelles."""
    pad = cell_px
    gy = torch.arange(-pad, h + pad, cell_px)
    gx = torch.arange(-pad, w + pad, cell_px)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = torch.stack((xx.flatten(), yy.flatten()), dim=1)
    grid = grid + (torch.rand(grid.shape, generator=gen) - 0.5) * 0.8 * cell_px
    n_small = int(grid.shape[0] * 1.2)
    lo = torch.tensor([-pad, -pad])
    small = lo + torch.rand(n_small, 2, generator=gen) * torch.tensor([w + 2 * pad, h + 2 * pad])
    pos0 = torch.cat((grid, small))
    s = pos0.shape[0]
    radius = torch.cat(
        (
            cell_px * (0.1 + 0.12 * torch.randn(grid.shape[0], generator=gen)),
            -cell_px * (0.12 + 0.1 * torch.rand(n_small, generator=gen)),
        )
    )
    # Slow lateral motion: neighbouring sections differ by content (growth, organelles, noise)
    # far more than by sliding, so the ground-truth pair field is what an aligner can recover.
    vel = torch.randn(s, 2, generator=gen) * 0.8
    wobble = torch.stack(
        (torch.rand(s, generator=gen) * 6.28, 0.1 + 0.25 * torch.rand(s, generator=gen)), 1
    )
    shade = torch.randn(s, generator=gen) * 0.04

    m = int(grid.shape[0] * 0.7)
    host = torch.randint(0, grid.shape[0], (m,), generator=gen).float()
    off = (torch.rand(m, 2, generator=gen) - 0.5) * 0.3 * cell_px
    half_len = cell_px * (0.2 + 0.25 * torch.rand(m, generator=gen))
    half_wid = cell_px * (0.12 + 0.07 * torch.rand(m, generator=gen))
    ang = torch.rand(m, generator=gen) * math.pi
    zc = torch.rand(m, generator=gen) * (nz + 8) - 4
    span = 2 + torch.rand(m, generator=gen) * 8
    mito = torch.stack(
        (host, off[:, 0], off[:, 1], half_len, half_wid, ang, zc - span, zc + span), 1
    )

    y = int(grid.shape[0] * 0.25)
    pre = torch.randint(0, s, (y,), generator=gen)
    d = torch.cdist(pos0[pre], pos0)
    d[torch.arange(y), pre] = float("inf")
    post = d.argmin(dim=1)
    zc = torch.rand(y, generator=gen) * (nz + 6) - 3
    span = 1 + torch.rand(y, generator=gen) * 3
    syn = torch.stack((pre.float(), post.float(), zc - span, zc + span), 1)
    return _Tissue(pos0, vel, radius, wobble, shade, mito, syn)


def _voronoi(centres: Tensor, radius: Tensor, px: Tensor, k: int = 24):
    """Additively weighted Voronoi on a pixel grid ``px`` ``(H, W, 2)`` (H, W multiples of 32).

    Returns, per pixel, the smallest and second-smallest ``|p - c_i| - r_i`` and the nearest
    cell index. Pixels are processed in 32 x 32 tiles against their ``k`` closest cells only.
    """
    t = 32
    h, w = px.shape[:2]
    tiles = px.reshape(h // t, t, w // t, t, 2).permute(0, 2, 1, 3, 4).reshape(-1, t * t, 2)
    mid = tiles.mean(dim=1)
    cand = (torch.cdist(mid, centres) - radius).topk(k, dim=1, largest=False).indices  # (T, k)
    d = torch.cdist(tiles, centres[cand]) - radius[cand].unsqueeze(1)  # (T, t*t, k)
    v, i = d.topk(2, dim=2, largest=False)
    idx = cand.gather(1, i[..., 0])

    def untile(x):
        return x.reshape(h // t, w // t, t, t).permute(0, 2, 1, 3).reshape(h, w)

    return untile(v[..., 0]), untile(v[..., 1]), untile(idx)


def _stamp(h: int, w: int, xy: Tensor, kernel: Tensor) -> Tensor:
    """Sum of ``kernel`` copies ``(k, k)`` centred at integer pixel positions ``xy`` ``(N, 2)``."""
    k = kernel.shape[-1]
    out = torch.zeros((h + k) * (w + k))
    if xy.shape[0] == 0:
        return out.view(h + k, w + k)[k // 2 : k // 2 + h, k // 2 : k // 2 + w]
    oy, ox = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    rows = xy[:, 1].view(-1, 1, 1) + oy  # top-left of the padded canvas is (-k//2, -k//2)
    cols = xy[:, 0].view(-1, 1, 1) + ox
    flat = (rows * (w + k) + cols).flatten()
    out.index_add_(0, flat, kernel.expand(xy.shape[0], k, k).flatten())
    return out.view(h + k, w + k)[k // 2 : k // 2 + h, k // 2 : k // 2 + w]


def _ring_kernel(r_out: float, r_in: float) -> Tensor:
    """A vesicle: dark membrane ring around a lighter lumen."""
    n = int(math.ceil(r_out)) * 2 + 3
    c = (n - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(n) - c, torch.arange(n) - c, indexing="ij")
    r = torch.sqrt(xx.float() ** 2 + yy.float() ** 2)
    outer = torch.sigmoid((r_out - r) * 2.5)
    inner = torch.sigmoid((r_in - r) * 2.5)
    return outer - 0.7 * inner


def procedural_stack(
    num_sections: int, height: int, width: int, seed: int = 0, cell_px: float = 80.0
) -> Tensor:
    """Aligned EM-like sections ``(num_sections, 1, height, width)`` uint8, values 1..255.

    Light cytoplasm; dark membranes of a curved (weighted, domain-warped) Voronoi tessellation;
    mitochondria (dark ellipses with cristae); vesicle clouds beside dark synaptic bands; grain
    and slow illumination changes. Cells drift well under a pixel per section (so the true
    pair field is recoverable) and change shape, so neighbouring sections
    correlate (Pearson r ~0.3-0.5 at MIP0) and distant ones do not. ``cell_px`` is the spacing
    of the large cells in pixels; small (axon-like) profiles fill the space between them.
    """
    gen = torch.Generator().manual_seed(int(seed))
    nz, h, w = int(num_sections), int(height), int(width)
    tissue = _layout(gen, nz, h, w, cell_px)
    # Half-resolution grid for the tessellation, padded to whole 32 x 32 tiles.
    hh, hw = math.ceil(h / 64) * 32, math.ceil(w / 64) * 32
    bend = _zsmooth_noise(gen, nz, hh, hw, cell_px * 0.5, 4.0, ch=2) * (cell_px * 0.04)
    contrast = _zsmooth_noise(gen, nz, h, w, cell_px * 0.5, 3.0)
    texture = _zsmooth_noise(gen, nz, h, w, 10.0, 1.5)
    ys, xs = torch.meshgrid(
        torch.arange(hh, dtype=torch.float32) * 2 + 0.5,
        torch.arange(hw, dtype=torch.float32) * 2 + 0.5,
        indexing="ij",
    )
    base_px = torch.stack((xs, ys), dim=-1)
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    ves_kernel = _ring_kernel(4.5, 2.2)
    speck_kernel = _ring_kernel(1.5, 0.0)
    out = torch.empty(nz, 1, h, w, dtype=torch.uint8)
    for z in range(nz):
        centres = tissue.pos0 + tissue.vel * z
        wob = torch.sin(tissue.wobble[:, 0] + tissue.wobble[:, 1] * z)
        radius = tissue.radius + 0.05 * cell_px * wob
        e1, e2, idx = _voronoi(centres, radius, base_px + bend[z].permute(1, 2, 0))
        # Half the weighted-distance gap is the distance to the cell boundary in pixels.
        gap = F.interpolate(((e2 - e1) / 2)[None, None], scale_factor=2, mode="bilinear")
        gap = gap[0, 0, :h, :w]
        cell = idx.repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w]

        img = 0.72 + tissue.shade[cell] + 0.05 * texture[z, 0]
        memb = torch.exp(-((gap / 3.0) ** 2)) * (0.66 + 0.1 * contrast[z, 0]).clamp(0.4, 0.85)
        halo = torch.exp(-((gap / 7.0) ** 2)) * 0.1
        img = img * (1 - memb) * (1 - halo)
        img = img * _mitochondria(tissue, centres, cell, z, xx, yy)
        syn_dark, ves_density = _synapses(tissue, centres, radius, cell, z, gap, xx, yy)
        img = img * (1 - syn_dark)

        # Vesicles clustered at synapses (plus a few scattered), and fine dark specks.
        p_ves = 0.008 * ves_density + 0.00003
        ves_xy = (torch.rand(h, w, generator=gen) < p_ves).nonzero().flip(1)
        img = img * (1 - 0.5 * _stamp(h, w, ves_xy, ves_kernel).clamp(0, 1))
        speck_xy = (torch.rand(h, w, generator=gen) < 0.004).nonzero().flip(1)
        img = img * (1 - 0.25 * _stamp(h, w, speck_xy, speck_kernel).clamp(0, 1))

        # Grain (per section) and a slow illumination gradient.
        img = img + 0.07 * _blur_noise(gen, 1, h, w, 2)[0, 0]
        img = img + 0.05 * torch.randn(h, w, generator=gen)
        tilt = torch.randn(2, generator=gen) * 0.06
        img = img * (1 + tilt[0] * (xx / w - 0.5) + tilt[1] * (yy / h - 0.5))
        out[z, 0] = (img.clamp(0, 1) * 254 + 1).round().to(torch.uint8)
    return out


def _mitochondria(tissue: _Tissue, centres, cell, z, xx, yy) -> Tensor:
    """Multiplicative darkening by the mitochondria in section ``z``, clipped to their cell."""
    h, w = cell.shape
    factor = torch.ones(h, w)
    live = (tissue.mito[:, 6] <= z) & (z <= tissue.mito[:, 7])
    for host, ox, oy, a, b, ang, z0, z1 in tissue.mito[live].tolist():
        # The cross-section shrinks towards the ends of the organelle in z.
        taper = math.sqrt(max(0.05, 1 - ((2 * z - z0 - z1) / max(z1 - z0, 1e-3)) ** 2))
        a, b = a * (0.5 + 0.5 * taper), b * (0.6 + 0.4 * taper)
        cx, cy = (centres[int(host)] + torch.tensor([ox, oy])).tolist()
        x0, x1, y0, y1 = _box(cx, cy, a + 4, h, w)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = dx * math.cos(ang) + dy * math.sin(ang)
        v = -dx * math.sin(ang) + dy * math.cos(ang)
        rho = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
        body = torch.sigmoid((1 - rho) * b * 1.2)
        rim = torch.exp(-(((rho - 1) * b / 1.6) ** 2))
        cristae = 0.5 + 0.5 * torch.cos(u * 2 * math.pi / 7.0 + 0.3 * v)
        dark = (body * (0.3 + 0.2 * cristae) + rim * 0.35).clamp(0, 0.85)
        dark = dark * (cell[y0:y1, x0:x1] == int(host))
        factor[y0:y1, x0:x1] *= 1 - dark
    return factor


def _box(cx: float, cy: float, r: float, h: int, w: int) -> tuple[int, int, int, int]:
    return (
        max(0, int(cx - r)),
        min(w, int(cx + r) + 1),
        max(0, int(cy - r)),
        min(h, int(cy + r) + 1),
    )


def _synapses(tissue: _Tissue, centres, radius, cell, z, gap, xx, yy):
    """Dark postsynaptic densities along membranes and where presynaptic vesicles cluster."""
    h, w = cell.shape
    dark = torch.zeros(h, w)
    ves = torch.zeros(h, w)
    live = (tissue.syn[:, 2] <= z) & (z <= tissue.syn[:, 3])
    band = torch.exp(-((gap / 5.0) ** 2))
    for pre, post, _, _ in tissue.syn[live].tolist():
        pre, post = int(pre), int(post)
        pa, pb = centres[pre], centres[post]
        d = float((pb - pa).norm()) + 1e-6
        # Where the additively weighted boundary crosses the segment between the two centres.
        frac = min(max((d + radius[pre] - radius[post]) / (2 * d), 0.1), 0.9)
        cx, cy = (pa + (pb - pa) * frac).tolist()
        ux, uy = ((pa - pb) / d).tolist()
        x0, x1, y0, y1 = _box(cx, cy, 70, h, w)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        disc = torch.exp(-(dx**2 + dy**2) / (2 * 18.0**2))
        sub = cell[y0:y1, x0:x1]
        dark[y0:y1, x0:x1] += 0.5 * disc * band[y0:y1, x0:x1] * (sub == post)
        qx, qy = dx - ux * 25, dy - uy * 25  # vesicle cloud on the presynaptic side
        cloud = torch.exp(-(qx**2 + qy**2) / (2 * 20.0**2)) * (sub == pre)
        ves[y0:y1, x0:x1] += cloud
    return dark.clamp(0, 0.7), ves.clamp(0, 1)


# --- misalignment -------------------------------------------------------------------------------


def drift_walk(num_sections: int, drift: float, generator: torch.Generator) -> Tensor:
    """Random-walk translations ``(Z, 2)`` in pixels, centred, largest |component| = ``drift``."""
    walk = torch.randn(num_sections, 2, generator=generator).cumsum(dim=0)
    walk = walk - walk.mean(dim=0, keepdim=True)
    peak = walk.abs().max()
    return walk * (drift / peak) if peak > 0 else walk


def misalignment_fields(
    num_sections: int,
    height: int,
    width: int,
    drift: float = 40.0,
    rotation_deg: float = 1.0,
    scale: float = 0.015,
    shear: float = 0.01,
    elastic: float = 3.0,
    elastic_scale: float = 256.0,
    seed: int = 0,
) -> Tensor:
    """Known smooth deformations ``d_z`` ``(Z, 2, H, W)`` (pull fields, pixels).

    ``d_z`` = cumulative drift (random walk, max |t| = ``drift``) + a small random affine about
    the centre + a smooth elastic field. The observed section is ``warp_image(aligned_z, d_z)``.
    """
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    spec = synth.DeformationSpec(
        rotation_deg=rotation_deg,
        scale=scale,
        shear=shear,
        elastic=elastic,
        elastic_scale=elastic_scale,
    )
    d = synth.random_field(num_sections, height, width, spec, generator=gen)
    return d + drift_walk(num_sections, drift, gen).view(num_sections, 2, 1, 1)


def _margin(size_xy: tuple[int, int], drift, rotation_deg, scale, shear, elastic) -> int:
    """Pixels of extra tissue around the view so that deformed sections still cover it."""
    half_diag = math.hypot(*size_xy) / 2
    affine = half_diag * (math.radians(rotation_deg) + scale + shear)
    return int(math.ceil(drift + affine + 4 * elastic)) + 8


# --- the demo volume ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoVolume:
    """Where a demo volume was written and what it holds."""

    out_dir: str
    image_path: str  # observed (misaligned) sections, file:// URL
    field_path: str  # ground-truth fields g_z, file:// URL
    aligned_path: str  # aligned sections, file:// URL
    size: tuple[int, int]  # (width, height) at MIP0
    num_sections: int
    mips: tuple[int, ...]
    resolution: tuple[float, float, float]  # nm per voxel at MIP0 (x, y, z)
    source: str  # "procedural" or the sections folder


def _as_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise MetroemError(f"{out} exists and is not a folder; choose another output folder")
    is_demo = (out / "demo.json").exists()
    if is_demo and not overwrite:
        raise MetroemError(f"a demo volume already exists at {out}; pass --overwrite to replace it")
    if not is_demo and any(out.iterdir()):
        raise MetroemError(
            f"{out} is not empty and holds no demo volume; choose a new or empty output folder"
        )


def build_demo_volume(
    out_dir: str | os.PathLike,
    num_sections: int = 12,
    size: int | tuple[int, int] | None = None,
    num_mips: int = 4,
    seed: int = 0,
    sections_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    drift: float = 40.0,
    rotation_deg: float = 1.0,
    scale: float = 0.015,
    shear: float = 0.01,
    elastic: float = 3.0,
    elastic_scale: float = 256.0,
    resolution: tuple[float, float, float] = (4.0, 4.0, 40.0),
    chunk_xy: int = 256,
    verbose: bool = False,
) -> DemoVolume:
    """Write a misaligned EM-like stack, its aligned original and the ground-truth field layer.

    ``size`` is the MIP0 (width, height) or one int for a square; it must be a multiple of
    ``2 ** (num_mips - 1)``. Default: 1024 (procedural), or the images' size cropped down to
    such a multiple (``sections_dir``). Procedural sections are generated with a margin around
    the view so that deformed sections still cover it; real sections get 0 (no data) where the
    deformation pulls from outside the image. All magnitudes are MIP0 pixels. The whole demo is
    built in a hidden sibling folder and renamed into place, so a crash leaves no partial demo.
    """
    out = Path(out_dir).expanduser().resolve()
    _prepare_out_dir(out, overwrite)
    if num_mips < 1 or num_sections < 1:
        raise MetroemError("num_mips and num_sections must be at least 1")
    k = 2 ** (num_mips - 1)
    want = _as_size(size)
    started = time.time()

    if sections_dir is not None:
        real = load_sections(sections_dir, num_sections)
        num_sections = real.shape[0]
        h_img, w_img = real.shape[-2:]
        w, h = want if want is not None else (w_img // k * k, h_img // k * k)
        if w > w_img or h > h_img:
            raise MetroemError(f"size {w}x{h} is larger than the images ({w_img}x{h_img})")
        y0, x0 = (h_img - h) // 2, (w_img - w) // 2
        real = real[..., y0 : y0 + h, x0 : x0 + w]
        margin = 0
        source = str(Path(sections_dir).resolve())
    else:
        w, h = want if want is not None else (1024, 1024)
        margin = _margin((w, h), drift, rotation_deg, scale, shear, elastic)
        source = "procedural"
    if w % k or h % k or w < k or h < k:
        raise MetroemError(
            f"size {w}x{h} must be a positive multiple of {k} for {num_mips} MIPs; "
            f"try {max(k, w // k * k)}x{max(k, h // k * k)}"
        )

    canvas_h, canvas_w = h + 2 * margin, w + 2 * margin
    if sections_dir is None:
        aligned_all = procedural_stack(num_sections, canvas_h, canvas_w, seed=seed)
    else:
        aligned_all = real
    d_all = misalignment_fields(
        num_sections,
        canvas_h,
        canvas_w,
        drift,
        rotation_deg,
        scale,
        shear,
        elastic,
        elastic_scale,
        seed,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_name(str(out)))
    try:
        paths = {key: str(tmp / name) for key, name in LAYERS.items()}
        size_xyz = (w, h, num_sections)
        common = dict(num_mips=num_mips, resolution=resolution, chunk_xy=chunk_xy)
        volumes.create_volume(paths["image"], size_xyz, **common)
        volumes.create_volume(paths["aligned"], size_xyz, **common)
        volumes.create_volume(paths["field"], size_xyz, dtype="float32", num_channels=2, **common)
        crop = (..., slice(margin, margin + h), slice(margin, margin + w))
        for z in range(num_sections):
            aligned = aligned_all[z : z + 1]
            d = d_all[z : z + 1]
            observed = fields.warp_image(aligned, d)
            g = fields.invert(d, steps=100, tol=1e-3)
            volumes.write_all_mips(paths["aligned"], 0, 0, z, aligned[crop])
            volumes.write_all_mips(paths["image"], 0, 0, z, observed[crop])
            volumes.write_all_mips(paths["field"], 0, 0, z, g[crop].contiguous(), is_field=True)
            if verbose:
                log.info("section %d/%d written", z + 1, num_sections)
        final = {key: volumes.normalize_path(str(out / name)) for key, name in LAYERS.items()}
        demo = DemoVolume(
            out_dir=str(out),
            image_path=final["image"],
            field_path=final["field"],
            aligned_path=final["aligned"],
            size=(w, h),
            num_sections=num_sections,
            mips=tuple(range(num_mips)),
            resolution=tuple(float(r) for r in resolution),
            source=source,
        )
        meta = {
            "format": "metroem-demo-volume/1",
            **asdict(demo),
            "layers": dict(LAYERS),
            "seed": seed,
            "deformation": {
                "drift": drift,
                "rotation_deg": rotation_deg,
                "scale": scale,
                "shear": shear,
                "elastic": elastic,
                "elastic_scale": elastic_scale,
                "units": "MIP0 pixels",
            },
            "field_gt": "g_z aligns observed section z onto the aligned frame: "
            "warp_image(image[z], field_gt[z]) ~ image_aligned[z]; the field aligning source z "
            "onto target z-1 is compose(g_z, invert(g_{z-1})) "
            "(metroem.demo_volume.pair_ground_truth)",
        }
        (tmp / "demo.json").write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        # Volumes opened (and cached) under the temporary or the replaced folder are stale now.
        for name in LAYERS.values():
            volumes.forget(str(tmp / name))
            volumes.forget(str(out / name))
    if verbose:
        log.info("built in %.1f s", time.time() - started)
    return demo


def pair_ground_truth(
    field_path: str,
    mip: int,
    x0: int,
    y0: int,
    z: int,
    width: int,
    height: int | None = None,
    margin: int | None = None,
) -> Tensor:
    """Ground-truth field ``(1, 2, height, width)`` aligning observed source ``z`` onto ``z-1``.

    Reads ``g_z`` and ``g_{z-1}`` from the demo's field layer at ``mip`` (voxel coordinates of
    that MIP) and returns ``compose(g_z, invert(g_{z-1}))``: warp source z back to the aligned
    frame, then deform it like section z-1 was. Exact where sections z and z-1 show the same
    tissue; a pixel-accurate reference for training/evaluation either way. The fields are read
    with ``margin`` extra pixels per side (default: from the largest displacement in the window)
    clipped to the volume, so the composition is right up to the window border.
    """
    height = width if height is None else height
    if z < 1:
        raise MetroemError(f"section {z} has no previous section; pass z >= 1")
    info = volumes.volume_info(field_path)
    if info.num_channels != 2 or info.dtype != "float32":
        raise MetroemError(f"{field_path} is not a field layer (float32, 2 channels)")
    if mip not in info.mips:
        raise MetroemError(f"field layer has no MIP {mip}; it has MIPs {list(info.mips)}")
    lo = info.offset[mip]
    hi = tuple(o + s for o, s in zip(lo, info.size[mip], strict=True))
    if not (lo[2] + 1 <= z < hi[2]):
        raise MetroemError(f"section {z} is outside the field layer's z[{lo[2]},{hi[2]})")
    if margin is None:
        both = volumes.read(field_path, mip, x0, y0, z - 1, width, height, nz=2)
        margin = int(math.ceil(2 * float(both.abs().max()))) + 4
    rx0, ry0 = max(lo[0], x0 - margin), max(lo[1], y0 - margin)
    rx1, ry1 = min(hi[0], x0 + width + margin), min(hi[1], y0 + height + margin)
    rx1, ry1 = max(rx1, rx0 + 1), max(ry1, ry0 + 1)
    both = volumes.read(field_path, mip, rx0, ry0, z - 1, rx1 - rx0, ry1 - ry0, nz=2)
    g_prev, g_cur = both[0:1], both[1:2]
    pair = fields.compose(g_cur, fields.invert(g_prev, steps=100, tol=1e-3))
    # Pad (border) where the wanted window sticks out of the volume, then cut it out.
    pad = (max(0, rx0 - x0), max(0, x0 + width - rx1), max(0, ry0 - y0), max(0, y0 + height - ry1))
    if any(pad):
        pair = F.pad(pair, pad, mode="replicate")
    ox, oy = x0 - rx0 + pad[0], y0 - ry0 + pad[2]
    return pair[..., oy : oy + height, ox : ox + width].contiguous()


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="metroem-demo-volume",
        description="Build a local misaligned EM-like demo volume with ground-truth fields.",
        epilog="example: metroem-demo-volume demo_volume --num_sections 12 --size 1024",
    )
    p.add_argument("out_dir", help="output folder (image, field_gt, image_aligned, demo.json)")
    p.add_argument("--num_sections", type=int, default=12, help="sections (default 12)")
    p.add_argument(
        "--size",
        type=int,
        nargs="+",
        metavar="PX",
        help="MIP0 size: one value (square) or WIDTH HEIGHT (default 1024, or the images' size)",
    )
    p.add_argument("--num_mips", type=int, default=4, help="MIPs 0..N-1 to write (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--sections_dir", help="folder of aligned images to use instead of procedural")
    p.add_argument("--drift", type=float, default=40.0, help="max drift, MIP0 px (default 40)")
    p.add_argument("--rotation_deg", type=float, default=1.0, help="max rotation (default 1)")
    p.add_argument("--elastic", type=float, default=3.0, help="elastic std, MIP0 px (default 3)")
    p.add_argument(
        "--resolution",
        type=float,
        nargs=3,
        default=(4.0, 4.0, 40.0),
        metavar=("X", "Y", "Z"),
        help="nm per voxel at MIP0 (default 4 4 40)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo volume")
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """Console entry point ``metroem-demo-volume``."""
    args = cliargs.parse_args(build_parser(), argv)
    if args.size is not None and len(args.size) not in (1, 2):
        raise MetroemError("--size takes one value (square) or two (WIDTH HEIGHT)")
    size = None if args.size is None else (args.size * 2)[:2]
    demo = build_demo_volume(
        args.out_dir,
        num_sections=args.num_sections,
        size=None if size is None else (size[0], size[1]),
        num_mips=args.num_mips,
        seed=args.seed,
        sections_dir=args.sections_dir,
        overwrite=args.overwrite,
        drift=args.drift,
        rotation_deg=args.rotation_deg,
        elastic=args.elastic,
        resolution=tuple(args.resolution),
        verbose=True,
    )
    print(
        f"demo volume: {demo.num_sections} sections of {demo.size[0]}x{demo.size[1]}, "
        f"MIPs {demo.mips[0]}..{demo.mips[-1]}, {demo.source}\n"
        f"  image:         {demo.image_path}\n"
        f"  field_gt:      {demo.field_path}\n"
        f"  image_aligned: {demo.aligned_path}"
    )
    return 0


if __name__ == "__main__":
    main()
