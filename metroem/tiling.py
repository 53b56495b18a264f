"""Tiled inference: align images of any size chunk by chunk, with bounded memory.

Stage-wise tiling (:class:`StageTiler`; :func:`tiled_field`, what ``metroem align`` and
:func:`align_tiled` run) runs the pyramid one stage at a time over the whole region. Stage ``k``
is tiled at its own MIP: chunks of ``chunk`` stage pixels, each run on a window padded by
``pad_k`` stage pixels per side (default: :func:`default_stage_pad` of the stage's net) and
clipped to the region, fed the images box-averaged to the stage's MIP and the previous stage's
field resampled exactly as the whole-image :class:`~metroem.aligner.PyramidAligner` resamples
it. Coarse stages store their field for the whole region (4^k times smaller than the output; in
memory or an ``.npy`` cache); the last stage runs per output chunk and writes straight into the
output. The tiled field equals the whole-image field wherever the pads cover the stages' reach.

Only windows are in memory: sources are read window by window (:class:`NpySource` reads rows of
an ``.npy`` file with ``pread``, :class:`VolumeSource` reads a CloudVolume cutout; coarse stages
read their window in strips and box-average them), so peak memory depends on ``chunk + 2 pad``,
not on the image size.

:func:`run_chunks` runs chunk jobs over one or more devices (one worker thread and one copy of
the aligner per device) with a progress bar; jobs already marked done are skipped, which makes
interrupted runs resumable.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metroem import fields, regularize, translation
from metroem.errors import MetroemError

Tensor = torch.Tensor

__all__ = [
    "Chunk",
    "plan_chunks",
    "ArraySource",
    "NpySource",
    "NpyWriter",
    "VolumeSource",
    "warp_chunk",
    "compose_chunk",
    "align_tiled",
    "tiled_field",
    "StageTiler",
    "StagePlan",
    "VolumeFieldStore",
    "CoarseFieldStore",
    "stage_quantum",
    "default_stage_pad",
    "read_resampled",
    "upsample_region",
    "MemoryFieldStore",
    "VolumeMaskSource",
    "NpyFieldStore",
    "run_chunks",
]


@dataclass(frozen=True)
class Chunk:
    """An output region ``[y0, y0 + h) x [x0, x0 + w)``; ``index`` numbers it row-major."""

    index: int
    y0: int
    x0: int
    h: int
    w: int


def plan_chunks(height: int, width: int, chunk: int) -> list[Chunk]:
    """Row-major chunks of ``chunk x chunk`` covering ``height x width``."""
    if chunk < 1:
        raise MetroemError(f"chunk size must be positive, got {chunk}")
    out = []
    for y0 in range(0, height, chunk):
        for x0 in range(0, width, chunk):
            out.append(Chunk(len(out), y0, x0, min(chunk, height - y0), min(chunk, width - x0)))
    return out


def check_chunking(chunk: int, pad: int, multiple: int) -> None:
    """Chunk and pad must be multiples of the aligner's size multiple (grids stay aligned)."""
    for name, value in (("chunk", chunk), ("pad", pad)):
        if value < 0 or value % multiple:
            raise MetroemError(
                f"--{name} {value} must be a multiple of {multiple} for this pyramid (its "
                f"coarsest grid); try {max(multiple, round(value / multiple) * multiple)}"
            )
    if chunk == 0:
        raise MetroemError("--chunk must be positive")


# --- sources: read a window, zeros outside ------------------------------------------------------


class ArraySource:
    """A 2-D array in memory (or any object with ``shape`` and 2-D slicing, e.g. a memmap)."""

    def __init__(self, array):
        if array.ndim != 2:
            raise MetroemError(f"expected a 2-D image, got shape {tuple(array.shape)}")
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = np.zeros((h, w), dtype=self.dtype)
        ya, yb = max(0, y0), min(self.shape[0], y0 + h)
        xa, xb = max(0, x0), min(self.shape[1], x0 + w)
        if ya < yb and xa < xb:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self.array[ya:yb, xa:xb]
        return out


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran:
        raise MetroemError(f"{f.name} is Fortran-ordered; save it C-ordered (np.ascontiguousarray)")
    return tuple(shape), np.dtype(dtype), f.tell()


class NpySource:
    """A ``.npy`` file of shape ``(H, W)`` (or ``(C, H, W)``) read row segment by row segment.

    ``pread`` keeps nothing mapped, so resident memory stays at one window (a memory map would
    keep every touched page of a huge file resident).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                shape, self.dtype, self.offset = _npy_header(f)
        except (OSError, ValueError) as e:
            raise MetroemError(f"cannot read {path} as .npy ({e})") from e
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3:
            raise MetroemError(f"{path}: expected (H, W) or (C, H, W), got shape {shape}")
        self.channels, h, w = shape
        self.shape = (h, w)

    def read(self, y0: int, x0: int, h: int, w: int, channel: int = 0) -> np.ndarray:
        out = np.zeros((h, w), dtype=self.dtype)
        hh, ww = self.shape
        ya, yb = max(0, y0), min(hh, y0 + h)
        xa, xb = max(0, x0), min(ww, x0 + w)
        if ya >= yb or xa >= xb:
            return out
        item = self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for y in range(ya, yb):
                pos = self.offset + ((channel * hh + y) * ww + xa) * item
                buf = os.pread(fd, (xb - xa) * item, pos)
                out[y - y0, xa - x0 : xb - x0] = np.frombuffer(buf, dtype=self.dtype)
        finally:
            os.close(fd)
        return out


class NpyWriter:
    """A ``(C, H, W)`` or ``(H, W)`` ``.npy`` file made at full size (sparse), written by window."""

    def __init__(self, path: str, shape: Sequence[int], dtype, create: bool):
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if create:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": self.shape}
            with open(path, "wb") as f:
                np.lib.format.write_array_header_2_0(f, header)
                self.offset = f.tell()
                f.truncate(self.offset + math.prod(self.shape) * self.dtype.itemsize)
        with open(path, "rb") as f:
            shape_, dtype_, self.offset = _npy_header(f)
        if shape_ != self.shape or dtype_ != self.dtype:
            raise MetroemError(
                f"{path} holds {shape_} {dtype_}, expected {self.shape} {self.dtype}"
            )

    def write(self, y0: int, x0: int, data: np.ndarray) -> None:
        """Write ``data`` ``(C, h, w)`` (or ``(h, w)`` for a 2-D file) at ``(y0, x0)``."""
        c, hh, ww = self.shape if len(self.shape) == 3 else (1, *self.shape)
        data = np.ascontiguousarray(data, dtype=self.dtype).reshape(c, *data.shape[-2:])
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for ch in range(c):
                for y in range(data.shape[1]):
                    pos = self.offset + ((ch * hh + y0 + y) * ww + x0) * self.dtype.itemsize
                    os.pwrite(fd, data[ch, y].tobytes(), pos)
        finally:
            os.close(fd)


class VolumeSource:
    """Section ``z`` of a CloudVolume layer at ``mip`` (window coordinates relative to the
    layer's voxel offset; reads outside the bounds give 0)."""

    def __init__(self, path: str, mip: int, z: int):
        from metroem import volumes

        info = volumes.volume_info(path)
        if mip not in info.mips:
            raise MetroemError(f"{path} has no MIP {mip}; it has MIPs {list(info.mips)}")
        self.path, self.mip, self.z = path, mip, z
        self.x_off, self.y_off, _ = info.offset[mip]
        self.shape = (info.size[mip][1], info.size[mip][0])
        self.dtype = np.dtype(info.dtype)

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        from metroem import volumes

        t = volumes.read(self.path, self.mip, self.x_off + x0, self.y_off + y0, self.z, w, h)
        return t[0, 0].numpy()


class VolumeMaskSource:
    """Section ``z`` of a mask layer read on an image layer's grid at ``mip``: the mask at its
    own ``mask_mip`` (``>= mip``) with each pixel repeated ``2^(mask_mip - mip)`` times along
    each axis (nearest), window coordinates relative to the image layer's voxel offset at
    ``mip`` (``image_offset``, x and y); 0 outside the mask layer."""

    def __init__(self, path: str, mask_mip: int, mip: int, z: int,
                 image_offset: tuple[int, int]):
        if mask_mip < mip:
            raise MetroemError(f"mask MIP {mask_mip} is finer than the images' MIP {mip}")
        self.path, self.mask_mip, self.z = path, mask_mip, z
        self.factor = 2 ** (mask_mip - mip)
        self.x_off, self.y_off = int(image_offset[0]), int(image_offset[1])

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        from metroem import volumes

        f = self.factor
        ay0, ax0 = self.y_off + y0, self.x_off + x0  # absolute pixels at the images' MIP
        cy0, cx0 = ay0 // f, ax0 // f
        cy1, cx1 = -(-(ay0 + h) // f), -(-(ax0 + w) // f)
        t = volumes.read(self.path, self.mask_mip, cx0, cy0, self.z, cx1 - cx0, cy1 - cy0)
        m = t[0, 0].numpy()
        if f > 1:
            m = m.repeat(f, axis=0).repeat(f, axis=1)
        oy, ox = ay0 - cy0 * f, ax0 - cx0 * f
        return m[oy : oy + h, ox : ox + w]


# --- one chunk ----------------------------------------------------------------------------------


def _as_tensor(a: np.ndarray, device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)[None, None]


def warp_chunk(src, field: Tensor, chunk: Chunk) -> Tensor:
    """The source warped by a chunk's field, ``(1, 1, h, w)`` float: ``src(p + field(p))``.

    The source window is read with a margin of the field's largest displacement, so nothing
    the field points at is cut off.
    """
    margin = int(math.ceil(float(field.abs().max()))) + 2 if field.numel() else 2
    win = _as_tensor(src.read(chunk.y0 - margin, chunk.x0 - margin, chunk.h + 2 * margin,
                              chunk.w + 2 * margin), "cpu").float()
    big = torch.nn.functional.pad(field, (margin,) * 4, mode="replicate")
    out = fields.warp_image(win, big)
    return out[..., margin : margin + chunk.h, margin : margin + chunk.w]


def compose_chunk(read_first, second: Tensor, chunk: Chunk) -> Tensor:
    """One chunk of ``fields.compose(first, second)`` (warp by ``first``, then ``second``):
    ``second(p) + first(p + second(p))``, with ``first`` read through
    ``read_first(y0, x0, h, w)`` on the chunk widened by ``second``'s largest displacement
    (border repeated outside, as :func:`metroem.fields.warp_field` does)."""
    margin = int(math.ceil(float(second.abs().max()))) + 2 if second.numel() else 2
    win = read_first(chunk.y0 - margin, chunk.x0 - margin, chunk.h + 2 * margin,
                     chunk.w + 2 * margin)
    big = torch.nn.functional.pad(second, (margin,) * 4, mode="replicate")
    out = big + fields.warp_field(win, big)
    return out[..., margin : margin + chunk.h, margin : margin + chunk.w].contiguous()


# --- stage-wise tiling --------------------------------------------------------------------------


def stage_quantum(model) -> int:
    """Window origins of a stage (its own pixels) must be multiples of this.

    The network pools by its ``stride``; a locally normalised :class:`metroem.nets.StageAligner`
    also takes its statistics on an 8-pixel grid (its ``grid`` attribute names the result).
    """
    if hasattr(model, "grid"):
        return int(model.grid)
    q = int(getattr(model, "stride", 1))
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict) and spec.get("normalization") == "local":
        q = math.lcm(q, 8)
    return q


PAD_SIGMAS = 6.0  # see default_stage_pad; measured in docs/inference.md


def default_stage_pad(model) -> int:
    """Context per side (pixels of the stage's MIP) that makes a stage's tiled field match its
    whole-image field to a few 0.001 px: the reach of its coarsest level's block-matching prior.

    For a :class:`metroem.nets.StageAligner` the coarsest level (``stride`` = 2^(levels-1)
    stage pixels per level pixel) aggregates the NCC prior over Gaussians of ``prior_sigma``
    level pixels (high-pass, then products), which sets the range that matters:
    ``PAD_SIGMAS * prior_sigma * stride`` (480 for the default net), at least 3 ``norm_sigma``
    (the local normalisation window); without the prior ``PAD_SIGMAS * stride``; plus 3 sigmas
    of the residual blur, of any wider per-level blur and of every Lucas-Kanade step; times
    ``iterations`` (each pass reaches as far again). Rounded up to :func:`stage_quantum`.
    Other stage modules may define ``tile_pad``; otherwise 8 ``stride``. Measured:
    docs/inference.md.
    """
    q = stage_quantum(model)
    if hasattr(model, "tile_pad"):
        pad = int(model.tile_pad)
    else:
        stride = int(getattr(model, "stride", 1))
        spec = getattr(model, "spec", None)
        if isinstance(spec, dict) and "prior_sigma" in spec:
            sigma = float(spec["prior_sigma"]) if spec.get("local_prior", False) else 1.0
            pad = max(PAD_SIGMAS * sigma * stride, 3 * float(spec.get("norm_sigma", 0)))
            # the parameter-free refinements reach further: residual blur, then LK windows
            pad += 3 * float(spec.get("residual_sigma", 0))
            # wider per-level residual blurs (level_smooth_sigma), in stage pixels; like the
            # net, only on refined levels and only with smooth_output
            if spec.get("smooth_output", True):
                sigmas = spec.get("level_smooth_sigma") or []
                base = float(spec.get("smooth_sigma", 0))
                finest = int(spec.get("finest_level", 0))
                pad += sum(3 * max(0.0, float(sigmas[lv]) - base) * 2**lv
                           for lv in range(finest, len(sigmas)))
            pad += 3 * float(spec.get("lk_sigma", 0)) * int(spec.get("lk_iterations", 0))
            pad *= int(spec.get("iterations", 1))  # every pass reaches as far again
        else:
            pad = 8 * stride
    return int(math.ceil(pad / q) * q)


@dataclass(frozen=True)
class StagePlan:
    """How one stage is tiled: its grid (the whole-image aligner's padded size at its MIP),
    chunk, pad and window quantum, all in pixels of the stage's MIP."""

    index: int
    mip: int
    levels: int  # mip - input MIP
    height: int
    width: int
    chunk: int
    pad: int
    quantum: int


def read_resampled(src, levels: int, y0: int, x0: int, h: int, w: int) -> Tensor:
    """Window ``[y0, y0 + h) x [x0, x0 + w)`` at ``levels`` MIPs above ``src``'s, ``(1, 1, h, w)``
    float32: the masked box average of :func:`metroem.fields.downsample_image`, read in strips
    so that no more than about ``h x w`` source pixels are in memory at once."""
    if levels == 0:
        return _as_tensor(src.read(y0, x0, h, w), "cpu").float()
    f = 2**levels
    out = torch.empty(1, 1, h, w)
    rows = max(1, h // (f * f))
    for r0 in range(0, h, rows):
        n = min(rows, h - r0)
        strip = _as_tensor(src.read((y0 + r0) * f, x0 * f, n * f, w * f), "cpu").float()
        out[..., r0 : r0 + n, :] = fields.downsample_image(strip, levels)
    return out


def _clamped(n: int, start: int, size: int) -> np.ndarray:
    return np.clip(np.arange(start, start + size), 0, n - 1)


class MemoryFieldStore:
    """A stage's field ``(1, 2, H, W)`` in memory; reads outside repeat the border."""

    def __init__(self, height: int, width: int):
        self.shape = (height, width)
        self.field = torch.zeros(1, 2, height, width)

    def read(self, y0: int, x0: int, h: int, w: int) -> Tensor:
        iy = torch.from_numpy(_clamped(self.shape[0], y0, h))
        ix = torch.from_numpy(_clamped(self.shape[1], x0, w))
        return self.field.index_select(2, iy).index_select(3, ix)

    def write(self, y0: int, x0: int, data: Tensor) -> None:
        self.field[..., y0 : y0 + data.shape[-2], x0 : x0 + data.shape[-1]] = data


class NpyFieldStore:
    """A stage's field as a ``(2, H, W)`` float32 ``.npy`` file (a resumable cache on disk);
    reads outside repeat the border. ``create`` makes the file, else an existing one is used."""

    def __init__(self, path: str, height: int, width: int, create: bool):
        self.path = path
        self.shape = (height, width)
        if create:  # made under a temporary name: a killed run never leaves a half header
            from metroem.atomic import atomic_path

            with atomic_path(path) as tmp:
                NpyWriter(tmp, (2, height, width), np.float32, True)
        self.writer = NpyWriter(path, (2, height, width), np.float32, False)
        self.source = NpySource(path)

    def read(self, y0: int, x0: int, h: int, w: int) -> Tensor:
        iy, ix = _clamped(self.shape[0], y0, h), _clamped(self.shape[1], x0, w)
        ya, xa = int(iy[0]), int(ix[0])
        hh, ww = int(iy[-1]) - ya + 1, int(ix[-1]) - xa + 1
        block = np.stack([self.source.read(ya, xa, hh, ww, channel=c) for c in (0, 1)])
        return torch.from_numpy(block[:, iy - ya][:, :, ix - xa].copy())[None]

    def write(self, y0: int, x0: int, data: Tensor) -> None:
        self.writer.write(y0, x0, data[0].numpy())


def upsample_region(read, y0: int, x0: int, h: int, w: int, levels: int) -> Tensor:
    """Region ``[y0, y0 + h) x [x0, x0 + w)`` of ``upsample_field(field, levels)`` where
    ``read(y0, x0, h, w)`` gives ``field`` ``levels`` MIPs coarser (border repeated outside).

    Bilinear upsampling is local: a crop with one coarse pixel of margin upsamples to exactly the
    whole field's pixels, and the repeated border reproduces its clamping at the field's edges.
    """
    if levels == 0:
        return read(y0, x0, h, w)
    r = 2**levels
    cy0, cx0 = y0 // r - 1, x0 // r - 1
    cy1, cx1 = -(-(y0 + h) // r) + 1, -(-(x0 + w) // r) + 1
    up = fields.upsample_field(read(cy0, cx0, cy1 - cy0, cx1 - cx0), levels)
    oy, ox = y0 - cy0 * r, x0 - cx0 * r
    return up[..., oy : oy + h, ox : ox + w]


def _window_reader(field: Tensor, y0: int, x0: int):
    """``read`` over a window field whose top-left pixel is ``(y0, x0)``, border repeated."""
    store = MemoryFieldStore.__new__(MemoryFieldStore)
    store.shape, store.field = tuple(field.shape[-2:]), field
    return lambda y, x, h, w: store.read(y - y0, x - x0, h, w)


class ConstantFieldStore:
    """A constant shift ``(1, 2)`` read like a field store (the phase-correlation start)."""

    def __init__(self, shift: Tensor):
        self.shift = shift.reshape(1, 2, 1, 1).float().cpu()

    def read(self, y0: int, x0: int, h: int, w: int) -> Tensor:
        return self.shift.expand(1, 2, h, w).clone()


class VolumeFieldStore:
    """Section ``z`` of a field layer at ``mip`` read like a field store (``(1, 2, h, w)``,
    coordinates relative to the layer's voxel offset, the border repeated outside the layer's
    ``height x width``): the previous section's whole field in a serial stack."""

    def __init__(self, path: str, mip: int, z: int):
        from metroem import volumes

        info = volumes.volume_info(path)
        self.path, self.mip, self.z = path, mip, z
        self.x_off, self.y_off, _ = info.offset[mip]
        self.shape = (info.size[mip][1], info.size[mip][0])

    def read(self, y0: int, x0: int, h: int, w: int) -> Tensor:
        from metroem import volumes

        iy, ix = _clamped(self.shape[0], y0, h), _clamped(self.shape[1], x0, w)
        ya, xa = int(iy[0]), int(ix[0])
        hh, ww = int(iy[-1]) - ya + 1, int(ix[-1]) - xa + 1
        block = volumes.read(self.path, self.mip, self.x_off + xa, self.y_off + ya, self.z,
                             ww, hh)[0].float()
        return block[:, iy - ya][:, :, ix - xa][None].contiguous()


class CoarseFieldStore:
    """A field store read ``levels`` MIPs coarser: windows box-averaged from the fine store as
    :func:`metroem.fields.downsample_field` does (how the whole-image aligner hands an incoming
    field to a coarser stage)."""

    def __init__(self, fine, levels: int):
        self.fine, self.levels = fine, int(levels)

    def read(self, y0: int, x0: int, h: int, w: int) -> Tensor:
        f = 2**self.levels
        return fields.downsample_field(self.fine.read(y0 * f, x0 * f, h * f, w * f),
                                      self.levels)


class StageTiler:
    """Stage-wise tiling of one section pair of ``height x width`` pixels at the input MIP.

    The pyramid runs one stage at a time over the whole region. Stage ``k`` is tiled at its own
    MIP: chunks of ``chunk`` stage pixels, each run on a window padded by ``pad_k`` stage pixels
    per side and clipped to the stage's grid (the whole-image aligner's grid at that MIP, so
    image borders look the same as in a whole-image call). A window sees the images box-averaged
    from the input MIP to the stage's MIP and the previous stage's field resampled to it
    exactly as the whole-image aligner does (a bilinear upsampling of a crop); the stage's
    field for the region goes to a store (memory or ``.npy``). The last stage is run per chunk of
    the *output* grid (input MIP) and its field upsampled straight into the output, so its
    chunks are the unit of resumable work.

    ``pad`` is one context width for every stage (stage pixels) or ``None`` for each stage's
    :func:`default_stage_pad`.

    The aligner's whole-image options have tiled counterparts: ``translation_init``
    (:meth:`initial_store` feeds stage 0 the phase-correlation shift of the whole region) and
    ``smoothing_px`` (:meth:`smooth_chunk`, a pass over the finished field with
    :data:`smoothing_pad` pixels of context).
    """

    def __init__(self, aligner, height: int, width: int, chunk: int, pad: int | None = None):
        mip_in = aligner.input_mip
        finer = [m for m in aligner.mips if m < mip_in]
        if finer:
            raise MetroemError(
                f"stage-wise tiling needs every stage at the input MIP {mip_in} or coarser, but "
                f"a stage runs at MIP {finer[0]}; pass images at MIP {min(aligner.mips)}"
            )
        if chunk < 1:
            raise MetroemError("--chunk must be positive")
        self.aligner = aligner
        self.height, self.width = int(height), int(width)
        self.chunk = int(chunk)
        levels = [m - mip_in for m in aligner.mips]
        k = 2 ** max(levels)
        hp, wp = -(-self.height // k) * k, -(-self.width // k) * k
        last = len(levels) - 1
        multiple = math.lcm(aligner.size_multiple(), 2 ** levels[-1] * stage_quantum(
            aligner.stages[last]))
        if chunk % multiple:
            raise MetroemError(
                f"--chunk {chunk} must be a multiple of {multiple} for this pyramid (its "
                f"coarsest grid); try {max(multiple, round(chunk / multiple) * multiple)}"
            )
        self.plans: list[StagePlan] = []
        for i, (mip, lev, model) in enumerate(zip(aligner.mips, levels, aligner.stages,
                                                   strict=True)):
            q = stage_quantum(model)
            p = default_stage_pad(model) if pad is None else int(pad)
            if p < 0 or p % q:
                raise MetroemError(
                    f"--pad {p} must be a multiple of {q} (stage {i}'s grid at MIP {mip}); try "
                    f"{max(q, round(p / q) * q)}"
                )
            c = chunk // 2**lev if i == last else -(-chunk // q) * q
            self.plans.append(StagePlan(i, mip, lev, hp // 2**lev, wp // 2**lev, c, p, q))
        self.smoothing_px = float(getattr(aligner, "smoothing_px", 0.0))
        self.smoothing_gate = getattr(aligner, "smoothing_gate", None)
        self.gate_window_px = float(getattr(aligner, "gate_window_px", 0.0))
        self.smoothing_pad = 0
        if self.smoothing_px > 0:
            factor = regularize.grid_multiple(  # the grids of its window sums and gate
                self.smoothing_px, self.smoothing_gate, self.gate_window_px)
            sp = regularize.regularized_support_px(self.smoothing_px, self.smoothing_gate,
                                                   self.gate_window_px)
            self.smoothing_pad = -(-sp // factor) * factor
            check_chunking(chunk, self.smoothing_pad, factor)

    def field_store(self, fine):
        """Stage 0's incoming field from a store of a field at the input MIP (a serial stack's
        previous section), resampled as the whole-image aligner resamples ``src_agg_field``."""
        return CoarseFieldStore(fine, self.plans[0].levels)

    def initial_store(self, src, tgt):
        """Stage 0's incoming field: the phase-correlation shift of the whole region (read at
        the coarsest stage's MIP, as small as the whole-image aligner's) when the aligner has
        ``translation_init``, else ``None``."""
        if not getattr(self.aligner, "translation_init", False):
            return None
        p = self.plans[0]
        s = read_resampled(src, p.levels, 0, 0, p.height, p.width)
        t = read_resampled(tgt, p.levels, 0, 0, p.height, p.width)
        return ConstantFieldStore(translation.phase_translation(s, t))  # stage-0 pixels

    def smooth_chunk(self, c: Chunk, read_field, src, tgt) -> Tensor:
        """The regularised field of output chunk ``c`` (``(1, 2, h, w)``, input MIP): the
        finished field read through ``read_field(y0, x0, h, w)`` on the chunk padded by
        :attr:`smoothing_pad`, smoothed (and gated) as the whole-image aligner does, cropped."""
        pad = self.smoothing_pad
        wy0, wx0 = max(0, c.y0 - pad), max(0, c.x0 - pad)
        wy1, wx1 = min(self.height, c.y0 + c.h + pad), min(self.width, c.x0 + c.w + pad)
        f = read_field(wy0, wx0, wy1 - wy0, wx1 - wx0)
        s = read_resampled(src, 0, wy0, wx0, wy1 - wy0, wx1 - wx0)
        t = read_resampled(tgt, 0, wy0, wx0, wy1 - wy0, wx1 - wx0)
        out = regularize.regularized_field(f, s, t, self.smoothing_px, self.smoothing_gate,
                                           self.gate_window_px)
        oy, ox = c.y0 - wy0, c.x0 - wx0
        return out[..., oy : oy + c.h, ox : ox + c.w].contiguous()

    @property
    def coarse(self) -> list[StagePlan]:
        """The stages run over the whole region before the output stage."""
        return self.plans[:-1]

    def stage_chunks(self, k: int) -> list[Chunk]:
        """Chunks of coarse stage ``k`` (its own pixels)."""
        p = self.plans[k]
        return plan_chunks(p.height, p.width, p.chunk)

    def output_chunks(self) -> list[Chunk]:
        """Chunks of the output (input MIP pixels): the last stage's units of work."""
        return plan_chunks(self.height, self.width, self.chunk)

    def store(self, name: str, path: str | None = None, create: bool = True):
        """The field store of one pass of :func:`tiled_field`: ``"stage<k>"`` (coarse stage
        ``k``, its pixels) or an output pass (``"raw"``, ``"smooth"``: input-MIP pixels); in
        memory, or the ``.npy`` file ``path`` (``create``: make it, else use the existing one)."""
        if name.startswith("stage"):
            p = self.plans[int(name[len("stage"):])]
            height, width = p.height, p.width
        else:
            height, width = self.height, self.width
        if path is None:
            return MemoryFieldStore(height, width)
        return NpyFieldStore(path, height, width, create)

    def describe(self, k: int) -> str:
        """``stage k/last (MIP m)``: a progress label."""
        return f"stage {k}/{len(self.plans) - 1} (MIP {self.plans[k].mip})"

    def _window(self, k: int, y0: int, x0: int, h: int, w: int) -> tuple[int, int, int, int]:
        p = self.plans[k]
        wy0, wx0 = max(0, y0 - p.pad), max(0, x0 - p.pad)
        wy1, wx1 = min(p.height, y0 + h + p.pad), min(p.width, x0 + w + p.pad)
        return wy0, wx0, wy1 - wy0, wx1 - wx0

    def _incoming(self, k: int, prev, y0: int, x0: int, h: int, w: int) -> Tensor:
        """The field so far on stage ``k``'s window, as the whole-image aligner hands it over
        (the previous stage's field upsampled to the input MIP, box-averaged to stage ``k``)."""
        lev, prev_lev = self.plans[k].levels, self.plans[k - 1].levels
        if prev_lev > lev:  # up 2^a then box-average 2^b (b < a) is up 2^(a - b), exactly
            return upsample_region(prev.read, y0, x0, h, w, prev_lev - lev)
        f = 2**lev  # same MIP: through the input MIP and back, like the aligner
        fine = upsample_region(prev.read, y0 * f, x0 * f, h * f, w * f, lev)
        return fields.downsample_field(fine, lev)

    def _run_window(self, model, k: int, src, tgt, prev, win) -> Tensor:
        wy0, wx0, wh, ww = win
        lev = self.plans[k].levels
        dev = model.device
        s = read_resampled(src, lev, wy0, wx0, wh, ww).to(dev)
        t = read_resampled(tgt, lev, wy0, wx0, wh, ww).to(dev)
        if k == 0:  # prev: None, or the translation start (ConstantFieldStore, stage pixels)
            a = None if prev is None else prev.read(wy0, wx0, wh, ww).to(dev)
        else:
            a = self._incoming(k, prev, wy0, wx0, wh, ww).to(dev)
        with torch.no_grad():
            out = model.stages[k](s, t, src_agg_field=a)
        out = out.as_subclass(Tensor) if type(out) is not Tensor else out
        return out.float().cpu()

    def run_stage_chunk(self, model, k: int, c: Chunk, src, tgt, prev, store) -> None:
        """Compute coarse stage ``k`` on chunk ``c`` (stage pixels) and write it to ``store``.

        ``model`` is the :class:`~metroem.aligner.PyramidAligner` (or a copy on another device);
        ``prev`` is stage ``k - 1``'s store (for stage 0: :meth:`initial_store`)."""
        win = self._window(k, c.y0, c.x0, c.h, c.w)
        out = self._run_window(model, k, src, tgt, prev, win)
        oy, ox = c.y0 - win[0], c.x0 - win[1]
        store.write(c.y0, c.x0, out[..., oy : oy + c.h, ox : ox + c.w].contiguous())

    def output_chunk(self, model, c: Chunk, src, tgt, prev) -> Tensor:
        """Field ``(1, 2, h, w)`` (CPU, pixels of the input MIP) of output chunk ``c``: the last
        stage on its window, upsampled to the input MIP (and refined there if the aligner
        refines)."""
        k = len(self.plans) - 1
        lev = self.plans[k].levels
        r = 2**lev
        win = self._window(k, c.y0 // r, c.x0 // r, -(-c.h // r), -(-c.w // r))
        out = self._run_window(model, k, src, tgt, prev, win)
        read = _window_reader(out, win[0], win[1])
        if not getattr(model, "refine", False):
            return upsample_region(read, c.y0, c.x0, c.h, c.w, lev).contiguous()
        from metroem.refine import refine_field

        fy0, fx0 = win[0] * r, win[1] * r
        fh = min(win[2] * r, self.height - fy0)
        fw = min(win[3] * r, self.width - fx0)
        field = upsample_region(read, fy0, fx0, fh, fw, lev)
        dev = model.device
        s = read_resampled(src, 0, fy0, fx0, fh, fw).to(dev)
        t = read_resampled(tgt, 0, fy0, fx0, fh, fw).to(dev)
        field = refine_field(s, t, field.to(dev), **model.refine_options)
        oy, ox = c.y0 - fy0, c.x0 - fx0
        return field[..., oy : oy + c.h, ox : ox + c.w].float().cpu().contiguous()


def tiled_field(
    tiler: StageTiler,
    aligner,
    src,
    tgt,
    devices: Sequence[torch.device],
    *,
    stores: Callable[[str], object] | None = None,
    marks=None,
    start=None,
    progress: bool = False,
    label: str = "",
) -> tuple[object, int]:
    """The pyramid's field of ``src`` onto ``tgt`` over the tiler's region, stage by stage.

    Every coarse stage ``k`` runs over the whole region into store ``"stage<k>"``; the last
    stage runs per output chunk into store ``"raw"``; when the aligner smooths, a pass of
    :meth:`StageTiler.smooth_chunk` follows into store ``"smooth"``. ``stores(name)`` makes each
    store (default: in memory, :meth:`StageTiler.store`). ``marks`` makes a run resumable: an
    object with ``done(name, chunk)`` and ``mark(name, chunk)``; chunks done are skipped and each
    chunk is marked once its data is written (``metroem align`` keeps ``.npy`` stores and marker
    files). Stage 0 starts from ``start`` (a store in its pixels) if given, else from
    :meth:`StageTiler.initial_store`. Chunks are spread over ``devices``; ``label`` prefixes the
    progress bars.

    Returns the store of the finished field (``(1, 2, h, w)`` reads, input-MIP pixels) and the
    number of chunks its last pass ran.
    """
    stores = stores or tiler.store

    def run(name: str, jobs, fn, desc: str) -> int:
        def work(model, c: Chunk) -> None:
            fn(model, c)
            if marks is not None:
                marks.mark(name, c)

        done = (lambda c: marks.done(name, c)) if marks is not None else (lambda c: False)
        return run_chunks(jobs, work, aligner, devices, is_done=done, progress=progress,
                          desc=label + desc)

    prev = start if start is not None else tiler.initial_store(src, tgt)
    for p in tiler.coarse:
        store = stores(f"stage{p.index}")

        def coarse(model, c: Chunk, k=p.index, prev=prev, store=store) -> None:
            tiler.run_stage_chunk(model, k, c, src, tgt, prev, store)

        run(f"stage{p.index}", tiler.stage_chunks(p.index), coarse, tiler.describe(p.index))
        prev = store
    raw = stores("raw")

    def final(model, c: Chunk) -> None:
        raw.write(c.y0, c.x0, tiler.output_chunk(model, c, src, tgt, prev))

    ran = run("raw", tiler.output_chunks(), final, tiler.describe(len(tiler.plans) - 1))
    if tiler.smoothing_px <= 0:
        return raw, ran
    smooth = stores("smooth")

    def regular(model, c: Chunk) -> None:
        smooth.write(c.y0, c.x0, tiler.smooth_chunk(c, raw.read, src, tgt))

    ran = run("smooth", tiler.output_chunks(), regular,
              f"smoothing ({tiler.smoothing_px:g} px"
              f"{', gated' if tiler.smoothing_gate is not None else ''})")
    return smooth, ran


def align_tiled(
    aligner,
    src,
    tgt,
    chunk: int,
    pad: int | None = None,
    devices: Sequence[torch.device] | None = None,
    progress: bool = False,
) -> Tensor:
    """Whole field ``(1, 2, H, W)`` of two sources (or 2-D arrays), computed chunk by chunk.

    Tiles stage by stage (:class:`StageTiler`, :func:`tiled_field`; ``pad`` in pixels of each
    stage's MIP, ``None`` = per-stage default) and equals the whole-image field
    ``aligner(src, tgt)`` up to the window cuts' effect, which the default pads keep below 0.01
    px away from the image border. Coarse stages' fields are kept in memory (4^k times smaller
    than the output); each stage's chunks are spread over ``devices`` (default: the aligner's).
    ``metroem align`` runs the same passes with ``.npy`` caches and chunk markers.
    """
    src = src if hasattr(src, "read") else ArraySource(np.asarray(src))
    tgt = tgt if hasattr(tgt, "read") else ArraySource(np.asarray(tgt))
    if src.shape != tgt.shape:
        raise MetroemError(f"source {src.shape} and target {tgt.shape} differ in size")
    h, w = src.shape
    tiler = StageTiler(aligner, h, w, chunk, pad)
    devices = list(devices) if devices else [aligner.device]
    store, _ = tiled_field(tiler, aligner, src, tgt, devices, progress=progress)
    return store.field


# --- the chunk runner -----------------------------------------------------------------------------


class _Progress:
    """A tqdm bar (chunks done / total, rate, ETA) or nothing."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="chunk", smoothing=0.1)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_chunks(
    jobs: Sequence,
    work: Callable[[object, object], None],
    aligner,
    devices: Sequence[torch.device],
    is_done: Callable[[object], bool] = lambda job: False,
    progress: bool = True,
    desc: str = "align",
) -> int:
    """Run ``work(aligner_copy, job)`` for every job not ``is_done``, spread over ``devices``.

    One worker thread per device holds its own copy of the aligner on that device. The first
    error stops the run and is re-raised. Returns the number of jobs run.
    """
    todo = [j for j in jobs if not is_done(j)]
    bar = _Progress(len(jobs), len(jobs) - len(todo), progress, desc)
    q: queue.Queue = queue.Queue()
    for j in todo:
        q.put(j)
    errors: list[BaseException] = []
    lock = threading.Lock()
    count = [0]

    def worker(model) -> None:
        while not errors:
            try:
                job = q.get_nowait()
            except queue.Empty:
                return
            try:
                work(model, job)
            except BaseException as e:  # noqa: B036 - handed to the main thread
                errors.append(e)
                return
            with lock:
                count[0] += 1
                bar.step()

    models = [aligner.to(devices[0])] + [copy.deepcopy(aligner).to(d) for d in devices[1:]]
    try:
        if len(models) == 1:
            worker(models[0])
        else:
            threads = [threading.Thread(target=worker, args=(m,), daemon=True) for m in models]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(0.05)
    finally:
        bar.close()
    if errors:
        raise errors[0]
    return count[0]
