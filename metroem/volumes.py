"""CloudVolume I/O: the only module that knows CloudVolume's ``(x, y, z, c)`` axis order.

Everything else in metroem sees tensors ``(N, C, H, W)`` where N indexes z, H is y and W is x.
Paths may be ``file://`` (the embedded default), ``gs://`` or ``s3://``; all go through the same
code. Bounds are given in the volume's own voxel coordinates at the requested MIP unless a
function says MIP0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metroem.errors import MetroemError

Tensor = torch.Tensor

# Importing cloudvolume writes ~/.cloudvolume; keep that out of read-only homes.
os.environ.setdefault("CLOUD_VOLUME_DIR", os.path.join(os.path.expanduser("~"), ".cloudvolume"))


def normalize_path(path: str) -> str:
    """Accept plain local paths too: ``/a/b`` -> ``file:///a/b``."""
    if "://" in path:
        return path
    return "file://" + os.path.abspath(os.path.expanduser(path))


def _cloudvolume():
    from cloudvolume import CloudVolume

    return CloudVolume


@dataclass(frozen=True)
class VolumeInfo:
    """What metroem needs to know about a layer."""

    path: str
    mips: tuple[int, ...]
    dtype: str
    num_channels: int
    resolution: dict[int, tuple[float, float, float]]  # nm per voxel, per MIP
    offset: dict[int, tuple[int, int, int]]  # voxel offset (x, y, z), per MIP
    size: dict[int, tuple[int, int, int]]  # voxel extent (x, y, z), per MIP


_OPEN: dict = {}  # (path, mip, options) -> CloudVolume; remote info files are fetched once
_OPEN_MAX = 64


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def forget(path: str | None = None) -> None:
    """Drop cached open volumes (all, or those of ``path``), e.g. after re-creating a layer."""
    if path is None:
        _OPEN.clear()
        return
    path = normalize_path(path)
    for key in [k for k in _OPEN if k[0] == path]:
        del _OPEN[key]


def open_volume(path: str, mip: int = 0, fill_missing: bool = True, **kwargs):
    """Open a CloudVolume at ``mip`` with metroem's defaults (quiet, missing chunks read as 0).

    Opened volumes are cached per (path, MIP, options) so a remote info file is read once.
    """
    path = normalize_path(path)
    if path.startswith("file://"):
        local = path[len("file://") :]
        if not os.path.exists(os.path.join(local, "info")):
            _OPEN.pop(path, None)
            raise MetroemError(
                f"no CloudVolume at {path}: {local}/info does not exist; check the path (a "
                "folder of section images? import it with `metroem ingest`)"
            )
    key = (path, int(mip), bool(fill_missing), tuple(sorted(kwargs.items())))
    vol = _OPEN.get(key)
    if vol is None:
        vol = _open_uncached(path, int(mip), fill_missing, **kwargs)
        if len(_OPEN) >= _OPEN_MAX:
            _OPEN.pop(next(iter(_OPEN)))
        _OPEN[key] = vol
    return vol


def _open_uncached(path: str, mip: int, fill_missing: bool, **kwargs):
    CloudVolume = _cloudvolume()
    try:
        info_vol = CloudVolume(path, mip=0, progress=False, fill_missing=fill_missing, **kwargs)
    except Exception as e:  # cloudvolume raises many types for a bad path
        raise MetroemError(
            f"cannot open CloudVolume {path}: {_one_line(e)}; check the path and that its info "
            "file is a readable file"
        ) from e
    available = [i for i in range(len(info_vol.info["scales"]))]
    if mip not in available:
        raise MetroemError(
            f"volume {path} has no MIP {mip} (it has MIPs {available[0]}..{available[-1]}); "
            "pick one of those or write the missing MIP"
        )
    if mip == 0:
        return info_vol
    return CloudVolume(path, mip=mip, progress=False, fill_missing=fill_missing, **kwargs)


def volume_info(path: str) -> VolumeInfo:
    """Read the info file of a layer."""
    vol = open_volume(path)
    scales = vol.info["scales"]
    return VolumeInfo(
        path=normalize_path(path),
        mips=tuple(range(len(scales))),
        dtype=str(vol.info["data_type"]),
        num_channels=int(vol.info["num_channels"]),
        resolution={i: tuple(float(v) for v in s["resolution"]) for i, s in enumerate(scales)},
        offset={i: tuple(int(v) for v in s["voxel_offset"]) for i, s in enumerate(scales)},
        size={i: tuple(int(v) for v in s["size"]) for i, s in enumerate(scales)},
    )


def create_volume(
    path: str,
    size_xyz: Sequence[int],
    num_mips: int,
    dtype: str = "uint8",
    num_channels: int = 1,
    resolution: Sequence[float] = (4, 4, 40),
    offset_xyz: Sequence[int] = (0, 0, 0),
    chunk_xy: int = 256,
    overwrite: bool = False,
) -> None:
    """Create a precomputed layer with MIPs ``0..num_mips-1`` (info only; write data after).

    ``size_xyz`` and ``offset_xyz`` are at MIP0. Chunks are ``chunk_xy x chunk_xy x 1`` so any
    section can be written alone. Image layers use uint8/float32, field layers float32 with 2
    channels (x, y displacement in pixels of each MIP).
    """
    path = normalize_path(path)
    CloudVolume = _cloudvolume()
    if path.startswith("file://"):
        local = path[len("file://") :]
        if os.path.exists(os.path.join(local, "info")) and not overwrite:
            raise MetroemError(f"a volume already exists at {path}; pass --overwrite to replace it")
    info = CloudVolume.create_new_info(
        num_channels=num_channels,
        layer_type="image",
        data_type=dtype,
        encoding="raw",
        resolution=list(resolution),
        voxel_offset=list(offset_xyz),
        volume_size=list(size_xyz),
        chunk_size=[chunk_xy, chunk_xy, 1],
        max_mip=num_mips - 1,
    )
    vol = CloudVolume(path, info=info, progress=False)
    vol.commit_info()
    forget(path)


def _bbox(vol, x0: int, y0: int, z0: int, width: int, height: int, nz: int):
    return np.s_[x0 : x0 + width, y0 : y0 + height, z0 : z0 + nz]


def read(
    path: str,
    mip: int,
    x0: int,
    y0: int,
    z0: int,
    width: int,
    height: int | None = None,
    nz: int = 1,
    bounded: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Read a cutout ``[x0, x0+width) x [y0, y0+height) x [z0, z0+nz)`` at ``mip``.

    Coordinates are voxels at ``mip``. Returns ``(nz, C, height, width)``; never-written chunks
    and (with ``bounded=False``) regions outside the volume read as 0.
    """
    height = width if height is None else height
    vol = open_volume(path, mip=mip, bounded=bounded)
    if bounded:
        _check_inside(vol, mip, x0, y0, z0, width, height, nz)
    arr = np.asarray(vol[_bbox(vol, x0, y0, z0, width, height, nz)])  # (x, y, z, c)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 3, 1, 0)))  # (z, c, y, x)
    return t if dtype is None else t.to(dtype)


def _check_inside(vol, mip, x0, y0, z0, width, height, nz):
    lo = np.array(vol.voxel_offset)
    hi = lo + np.array(vol.volume_size)
    want_lo = np.array([x0, y0, z0])
    want_hi = want_lo + np.array([width, height, nz])
    if (want_lo < lo).any() or (want_hi > hi).any():
        raise MetroemError(
            f"cutout x[{x0},{x0 + width}) y[{y0},{y0 + height}) z[{z0},{z0 + nz}) at MIP {mip} "
            f"is outside volume bounds x[{lo[0]},{hi[0]}) y[{lo[1]},{hi[1]}) z[{lo[2]},{hi[2]}); "
            "move the offsets or shrink the patch"
        )


def write(path: str, mip: int, x0: int, y0: int, z0: int, data: Tensor | np.ndarray) -> None:
    """Write ``data`` ``(nz, C, H, W)`` at voxel ``(x0, y0, z0)`` of ``mip``.

    Writes need not be chunk-aligned; the data is cast to the layer's dtype (rounded and
    clipped for integer layers).
    """
    vol = open_volume(path, mip=mip, non_aligned_writes=True)
    arr = data.detach().cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
    if arr.ndim != 4:
        raise MetroemError(f"write expects (nz, C, H, W), got shape {arr.shape}")
    if arr.shape[1] != vol.num_channels:
        raise MetroemError(f"layer {path} has {vol.num_channels} channels, data has {arr.shape[1]}")
    dt = np.dtype(vol.dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        arr = np.clip(np.rint(arr), info.min, info.max)
    arr = arr.astype(dt).transpose(3, 2, 0, 1)  # (x, y, z, c)
    nz, h, w = arr.shape[2], arr.shape[1], arr.shape[0]
    vol[_bbox(vol, x0, y0, z0, w, h, nz)] = np.ascontiguousarray(arr)


def write_all_mips(
    path: str,
    x0: int,
    y0: int,
    z0: int,
    data: Tensor,
    is_field: bool = False,
    num_mips: int | None = None,
) -> None:
    """Write MIP0 ``data`` and every coarser MIP of the layer (CloudVolume won't downsample).

    ``x0, y0`` are MIP0 voxels and must be multiples of 2^(num_mips-1). Fields are downsampled
    with value scaling (pixels of each MIP); images with the masked box average (0 = no data).
    """
    from metroem import fields

    info = volume_info(path)
    num_mips = len(info.mips) if num_mips is None else num_mips
    k = 2 ** (num_mips - 1)
    if x0 % k or y0 % k:
        raise MetroemError(
            f"offset ({x0}, {y0}) must be a multiple of {k} to write {num_mips} MIPs"
        )
    x = data if isinstance(data, Tensor) else torch.from_numpy(np.asarray(data))
    for mip in range(num_mips):
        if mip > 0:
            x = fields.downsample_field(x, 1) if is_field else fields.downsample_image(x, 1)
        write(path, mip, x0 >> mip, y0 >> mip, z0, x)
