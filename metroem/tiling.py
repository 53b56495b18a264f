"""Tiled inference: align images of any size chunk by chunk, with bounded memory.

The output grid is cut into chunks of ``chunk x chunk`` pixels (the last row/column may be
smaller). Each chunk is aligned on a window padded by ``pad`` pixels on every side (zeros = no
data outside the image); the padded border of the window's field is discarded. Chunk origins
and the window size are multiples of :meth:`PyramidAligner.size_multiple`, so every stage sees
the same coarse pixel grid in a window as in the whole image.

Only one window per device is in memory at a time: sources are read window by window
(:class:`NpySource` reads rows of an ``.npy`` file with ``pread``, :class:`VolumeSource` reads
a CloudVolume cutout), so peak memory depends on ``chunk + 2 pad``, not on the image size.

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

from metroem import fields
from metroem.errors import MetroemError

Tensor = torch.Tensor

__all__ = [
    "Chunk",
    "plan_chunks",
    "ArraySource",
    "NpySource",
    "NpyWriter",
    "VolumeSource",
    "align_chunk",
    "window_size",
    "warp_chunk",
    "align_tiled",
    "parse_devices",
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


# --- one chunk ----------------------------------------------------------------------------------


def _as_tensor(a: np.ndarray, device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)[None, None]


def window_size(chunk_size: int, pad: int, multiple: int) -> int:
    """Side of every window: ``chunk + 2 pad`` rounded up to the aligner's size multiple."""
    return math.ceil((chunk_size + 2 * pad) / multiple) * multiple


def align_chunk(
    aligner, src, tgt, chunk: Chunk, pad: int, chunk_size: int | None = None, **kwargs
) -> Tensor:
    """Field ``(1, 2, h, w)`` (CPU) of one chunk: align the padded window, keep the centre.

    Every window has the same size (:func:`window_size` of the nominal ``chunk_size``), so
    edge chunks see the same grid and the same amount of context as interior ones.
    """
    m = aligner.size_multiple() if hasattr(aligner, "size_multiple") else 1
    wh = ww = window_size(chunk_size or max(chunk.h, chunk.w), pad, m)
    y0, x0 = chunk.y0 - pad, chunk.x0 - pad
    dev = getattr(aligner, "device", torch.device("cpu"))
    s = _as_tensor(src.read(y0, x0, wh, ww), dev)
    t = _as_tensor(tgt.read(y0, x0, wh, ww), dev)
    with torch.no_grad():
        f = aligner(s, t, **kwargs)
    return f[..., pad : pad + chunk.h, pad : pad + chunk.w].float().cpu()


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


def align_tiled(aligner, src, tgt, chunk: int, pad: int, **kwargs) -> Tensor:
    """Whole field ``(1, 2, H, W)`` of two sources (or 2-D arrays), computed chunk by chunk."""
    src = src if hasattr(src, "read") else ArraySource(np.asarray(src))
    tgt = tgt if hasattr(tgt, "read") else ArraySource(np.asarray(tgt))
    if src.shape != tgt.shape:
        raise MetroemError(f"source {src.shape} and target {tgt.shape} differ in size")
    check_chunking(chunk, pad, aligner.size_multiple())
    h, w = src.shape
    out = torch.zeros(1, 2, h, w)
    for c in plan_chunks(h, w, chunk):
        out[..., c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] = align_chunk(
            aligner, src, tgt, c, pad, chunk, **kwargs
        )
    return out


# --- devices and the chunk runner ---------------------------------------------------------------


def parse_devices(spec: str) -> list[torch.device]:
    """``cpu`` | ``gpu`` (first GPU) | ``all`` (every GPU, else the CPU) | ``0,2`` (GPU ids)."""
    spec = str(spec).strip().lower()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cpu":
        return [torch.device("cpu")]
    if spec == "all":
        return [torch.device(f"cuda:{i}") for i in range(n)] or [torch.device("cpu")]
    if spec in ("gpu", "cuda"):
        ids = [0]
    else:
        try:
            ids = [int(p) for p in spec.replace("cuda:", "").split(",") if p.strip()]
        except ValueError:
            raise MetroemError(
                f"bad --device {spec!r}: use cpu, gpu, all or GPU ids like 0,2"
            ) from None
        if not ids:
            raise MetroemError("--device is empty: use cpu, gpu, all or GPU ids like 0,2")
    missing = [i for i in ids if i >= n or i < 0]
    if missing:
        have = f"GPUs 0..{n - 1}" if n else "no GPU"
        raise MetroemError(
            f"--device {spec}: GPU {missing[0]} is not available (this machine has {have}); "
            "use --device cpu"
        )
    return [torch.device(f"cuda:{i}") for i in ids]


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
