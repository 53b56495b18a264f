"""Cut training data out of CloudVolumes into h5 datasets: ``download_image``, ``download_field``.

Geometry (see docs/datasets.md; the rules are :mod:`metroem.geometry`'s):

* ``x_offset, y_offset`` are MIP0 pixels and name the **centre** of the patch. They are snapped
  to the nearest multiple of ``2**M`` (M = the coarsest MIP involved), so the centre is a whole
  pixel boundary at every MIP and all patches of one call are concentric: a patch of ``S`` pixels
  at MIP ``m`` spans ``[cx/2^m - S/2, cx/2^m + S/2)`` (S must be even).
* Pair ``i`` is source = section ``z_start + i`` and target = section ``z_start + i - 1``; the field
  of a pair is read from the field volume at the source section.
* ``download_field`` removes from every field its average translation, snapped to whole pixels
  at the coarsest MIP involved, and records it (x, y, MIP0 px). ``download_image --field_dset``
  moves each pair's source window by that translation so that
  ``src(p + f(p)) == src_moved(p + f(p) - t)``: the pair and the field stay consistent while the
  network only has to learn the residual.

Example (the upstream invocations work unchanged)::

    python download_field.py --dst_folder ~/data/ --z_start 8175 --z_end 8180 \
        --x_offset 200960 --y_offset 136448 --src_mip 8 --dst_mip 5 --patch_size 1536 \
        --suffix precomputed --cv_path gs://bucket/field
    python download_image.py --dst_folder ~/data --z_start 8175 --z_end 8180 \
        --x_offset 200960 --y_offset 136448 --mip 5 --patch_size 1536 --cv_path gs://bucket/img \
        --field_dset ~/data/field_0_x200960_y136448_z8175_MIP5_precomputed.h5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from metroem import cliargs, datasets, fields, volumes
from metroem.errors import MetroemError, cli_errors
from metroem.geometry import patch_origin, remove_translation, snap_centre, snap_to_multiple

Tensor = torch.Tensor

__all__ = [
    "DEFAULT_DEFECT_THRESHOLD",
    "download_image",
    "download_field",
    "download_image_main",
    "download_field_main",
]

DEFAULT_DEFECT_THRESHOLD = 0.0  # defect value above this blanks the image pixel (0 = no data)


def _check_inside(info: volumes.VolumeInfo, mip: int, x0: int, y0: int, size: int, what: str):
    (ox, oy, _), (sx, sy, _) = info.offset[mip], info.size[mip]
    if x0 < ox or y0 < oy or x0 + size > ox + sx or y0 + size > oy + sy:
        raise MetroemError(
            f"{what} x[{x0},{x0 + size}) y[{y0},{y0 + size}) at MIP {mip} lies outside the "
            f"volume x[{ox},{ox + sx}) y[{oy},{oy + sy}); move --x_offset/--y_offset or shrink "
            "the patch"
        )


def _check_overlaps(
    info: volumes.VolumeInfo, mip: int, x0: int, y0: int, size: int, what: str
) -> None:
    (ox, oy, _), (sx, sy, _) = info.offset[mip], info.size[mip]
    if x0 + size <= ox or x0 >= ox + sx or y0 + size <= oy or y0 >= oy + sy:
        raise MetroemError(
            f"{what} x[{x0},{x0 + size}) y[{y0},{y0 + size}) at MIP {mip} does not overlap the "
            f"volume x[{ox},{ox + sx}) y[{oy},{oy + sy}); the field's translation is too large "
            "for this window"
        )


def _check_z(info: volumes.VolumeInfo, lo: int, hi: int, z_start: int, z_end: int, what: str):
    vz0, vzn = info.offset[0][2], info.size[0][2]
    if z_end <= z_start:
        raise MetroemError(f"empty z range [{z_start}, {z_end}); --z_end must exceed --z_start")
    if lo < vz0 or hi > vz0 + vzn:
        raise MetroemError(
            f"{what} needs sections [{lo}, {hi}) but {info.path} has z [{vz0}, {vz0 + vzn}); "
            "pick --z_start/--z_end inside it"
        )


def _check_mip(info: volumes.VolumeInfo, mip: int, flag: str) -> None:
    if mip not in info.mips:
        raise MetroemError(
            f"{info.path} has no MIP {mip} (it has MIPs {info.mips[0]}..{info.mips[-1]}); "
            f"change {flag}"
        )


def _check_size(size: int, flag: str) -> None:
    if size <= 0 or size % 2:
        raise MetroemError(f"{flag} {size} must be a positive even number of pixels")


# ----------------------------------------------------------------------------- helpers


def _map_ordered(fn: Callable, items: Sequence, parallel: int) -> Iterator:
    """``map(fn, items)`` in order, on a thread pool when ``parallel > 1``."""
    if parallel <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pair", file=sys.stderr, disable=not enabled)


def _expand(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _prepare_folder(dst_folder: str) -> str:
    """The absolute output folder, checked (not created) up front: it is or can become a
    writable folder, so a bad --dst_folder fails before any data is read."""
    folder = _expand(dst_folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise MetroemError(f"--dst_folder {folder} exists and is not a folder; pick another path")
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise MetroemError(
            f"cannot create --dst_folder {folder}: {existing} is a file, not a folder; pick "
            "another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MetroemError(
            f"cannot write in {existing} (permission denied); pick a writable --dst_folder"
        )
    return folder


def _finite(arr: Tensor | np.ndarray, what: str) -> None:
    a = arr.numpy() if isinstance(arr, torch.Tensor) else arr
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise MetroemError(f"{what} contains NaN or inf; fix the volume or pick other sections")


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _ImagePlan:
    mip: int
    size: int
    x0: int  # target window origin at this MIP
    y0: int
    shift: np.ndarray  # (N, 2) source window shift, pixels at this MIP
    path: str


def _field_translation(
    field_dset: str, zs: list[int], mips: list[int], sizes: list[int], cx: int, cy: int
) -> np.ndarray:
    """Validate ``field_dset`` against the requested cut; return its (N, 2) MIP0 translations."""
    fd = datasets.read_field_dataset(field_dset, load_data=False)  # attrs + translations
    name = os.path.basename(fd.path)
    if fd.z != zs:
        raise MetroemError(
            f"field dataset {name} covers z {fd.z} but this cut has z {zs}; use the same "
            "--z_start/--z_end as for download_field"
        )
    fmip = int(fd.attrs["mip"])
    if fmip not in mips:
        raise MetroemError(
            f"field dataset {name} is at MIP {fmip} but --mips is {mips}; include MIP {fmip}"
        )
    fsize = fd.shape[-1]
    if sizes[mips.index(fmip)] != fsize:
        raise MetroemError(
            f"field dataset {name} has {fsize}px patches but the MIP {fmip} patch is "
            f"{sizes[mips.index(fmip)]}px; use --patch_size {fsize}"
        )
    fx, fy = int(fd.attrs["x_offset"]), int(fd.attrs["y_offset"])
    if (fx, fy) != (cx, cy):
        raise MetroemError(
            f"field dataset {name} is centred at ({fx}, {fy}) but the offsets snap to "
            f"({cx}, {cy}); pass --x_offset {fx} --y_offset {fy}"
        )
    return fd.translation


def download_image(
    cv_path: str,
    dst_folder: str,
    z_start: int,
    z_end: int,
    x_offset: int,
    y_offset: int,
    mips: Sequence[int],
    patch_sizes: Sequence[int],
    field_dset: str | None = None,
    suffix: str | None = None,
    parallel: int = 1,
    cv_path_defects: str | None = None,
    defect_threshold: float = DEFAULT_DEFECT_THRESHOLD,
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Cut image pairs (source z, target z-1 for z in [z_start, z_end)) into one file per MIP.

    ``x_offset, y_offset``: patch centre in MIP0 pixels (snapped to ``2**max(mips)``).
    ``patch_sizes``: one per MIP, or one for all. ``field_dset``: a field file whose per-pair
    translations move the source windows. Pixels where ``cv_path_defects`` exceeds
    ``defect_threshold`` become 0. Everything is validated before any data is read; the files
    appear together only when all are complete. Returns the file paths, in ``mips`` order.
    """
    mips = [int(m) for m in mips]
    sizes = [int(s) for s in patch_sizes]
    if not mips:
        raise MetroemError("no --mips given; pass at least one MIP")
    if len(set(mips)) != len(mips) or min(mips) < 0:
        raise MetroemError(f"--mips {mips} must be distinct non-negative MIPs")
    if len(sizes) == 1:
        sizes = sizes * len(mips)
    if len(sizes) != len(mips):
        raise MetroemError(
            f"{len(patch_sizes)} patch sizes for {len(mips)} MIPs; give one --patch_sizes value "
            "or one per MIP"
        )
    for s in sizes:
        _check_size(s, "--patch_sizes")
    if parallel < 1:
        raise MetroemError(f"--parallel {parallel} must be at least 1")
    folder = _prepare_folder(dst_folder)
    info = volumes.volume_info(cv_path)
    if info.num_channels != 1:
        raise MetroemError(f"{info.path} has {info.num_channels} channels; images need 1")
    for m in mips:
        _check_mip(info, m, "--mips")
    _check_z(info, z_start - 1, z_end, z_start, z_end, "source z and target z-1")
    zs = list(range(z_start, z_end))
    cx, cy = snap_centre(x_offset, y_offset, max(mips))
    translation = np.zeros((len(zs), 2), np.int64)
    if field_dset is not None:
        field_dset = _expand(field_dset)
        translation = _field_translation(field_dset, zs, mips, sizes, cx, cy)

    plans = []
    for m, s in zip(mips, sizes, strict=True):
        x0, y0 = patch_origin(cx, cy, m, s)
        shift = (snap_to_multiple(translation.astype(np.float64), 2**m) // 2**m).astype(np.int64)
        _check_inside(info, m, x0, y0, s, "target patch")
        for z, (dx, dy) in zip(zs, shift, strict=True):
            # A window moved by a field's translation may run past the volume's edge (that part
            # reads as 0 = no data), but it must still overlap the volume.
            _check_overlaps(info, m, x0 + int(dx), y0 + int(dy), s, f"source patch of z={z}")
        path = os.path.join(folder, datasets.image_filename(cx, cy, z_start, m, suffix))
        datasets.check_output_free(path, overwrite)
        plans.append(_ImagePlan(m, s, x0, y0, shift, path))
    if cv_path_defects is not None:
        dinfo = volumes.volume_info(cv_path_defects)
        for m in mips:
            _check_mip(dinfo, m, "--mips (defect volume)")
    store_dtype = np.uint8 if info.dtype == "uint8" else np.float32

    def cut(i: int) -> list[np.ndarray]:
        z = zs[i]
        out = []
        for p in plans:
            dx, dy = (int(v) for v in p.shift[i])
            windows = ((p.x0 + dx, p.y0 + dy, z), (p.x0, p.y0, z - 1))  # source, target
            pair = []
            for x0, y0, zz in windows:
                img = volumes.read(info.path, p.mip, x0, y0, zz, p.size)[0, 0]
                _finite(img, f"{info.path} at z={zz}, MIP {p.mip}")
                if cv_path_defects is not None:
                    defects = volumes.read(cv_path_defects, p.mip, x0, y0, zz, p.size)[0, 0]
                    img = torch.where(defects.float() > defect_threshold, 0, img)
                pair.append(img.numpy())
            out.append(np.stack(pair))
        return out

    with contextlib.ExitStack() as stack:
        writers = []
        for p in plans:
            attrs = {
                "mip": p.mip,
                "x_offset": cx,
                "y_offset": cy,
                "z": zs,
                "resolution": np.asarray(info.resolution[p.mip], np.float64),
                "source": info.path,
                "source_dtype": info.dtype,
                "field_dset": field_dset or "",
                "defects": volumes.normalize_path(cv_path_defects) if cv_path_defects else "",
                "defect_threshold": float(defect_threshold),
            }
            writers.append(
                stack.enter_context(
                    datasets.open_writer(
                        p.path, "image", len(zs), p.size, attrs, store_dtype, overwrite
                    )
                )
            )
        bar = stack.enter_context(_progress(len(zs), "download_image", progress))
        for i, cut_pairs in enumerate(_map_ordered(cut, range(len(zs)), parallel)):
            for p, w, pair in zip(plans, writers, cut_pairs, strict=True):
                w.put(i, pair, p.shift[i] * 2**p.mip)
            bar.update(1)
    return [p.path for p in plans]


# ----------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class _Axis:
    """How to cut one axis of the field at src_mip so it covers the dst_mip patch."""

    read_lo: int  # first voxel read at src_mip (inside the volume)
    read_hi: int  # one past the last voxel read
    pad_lo: int  # replicated border voxels added before / after
    pad_hi: int
    crop: int  # first dst_mip pixel of the patch in the resampled array


def _field_axis(origin: int, size: int, src: int, dst: int, vlo: int, vhi: int, name: str):
    """Plan one axis: dst window ``[origin, origin+size)`` at dst, volume ``[vlo, vhi)`` at src."""
    if src <= dst:  # box-average down: exact window, no padding
        k = 2 ** (dst - src)
        lo, hi = origin * k, (origin + size) * k
        need_lo, need_hi, crop = lo, hi, 0
    else:  # bilinear up: one coarse voxel of context on each side for interpolation
        k = 2 ** (src - dst)
        need_lo, need_hi = origin // k, -(-(origin + size) // k)
        lo, hi = need_lo - 1, need_hi + 1
        crop = origin - lo * k
    if need_lo < vlo or need_hi > vhi:
        raise MetroemError(
            f"the field patch needs {name}[{need_lo},{need_hi}) at MIP {src} but the field "
            f"volume spans {name}[{vlo},{vhi}); move --x_offset/--y_offset or shrink --patch_size"
        )
    rlo, rhi = max(lo, vlo), min(hi, vhi)
    return _Axis(rlo, rhi, rlo - lo, hi - rhi, crop)


def _cut_field(
    path: str, z: int, src: int, dst: int, size: int, ax: _Axis, ay: _Axis, units: str
) -> Tensor:
    """Read one section's field at src, convert to pixels at dst, crop to the patch."""
    f = volumes.read(
        path, src, ax.read_lo, ay.read_lo, z, ax.read_hi - ax.read_lo, ay.read_hi - ay.read_lo,
        dtype=torch.float32,
    )
    _finite(f, f"field volume {path} at z={z}, MIP {src}")
    if units == "mip0":  # legacy volumes store MIP0 pixels at every MIP
        f = f / 2**src
    if ax.pad_lo or ax.pad_hi or ay.pad_lo or ay.pad_hi:
        f = F.pad(f, (ax.pad_lo, ax.pad_hi, ay.pad_lo, ay.pad_hi), mode="replicate")
    f = fields.resample_field(f, src, dst)
    return f[:, :, ay.crop : ay.crop + size, ax.crop : ax.crop + size]


def download_field(
    cv_path: str,
    dst_folder: str,
    z_start: int,
    z_end: int,
    x_offset: int,
    y_offset: int,
    src_mip: int,
    dst_mip: int,
    patch_size: int,
    suffix: str,
    stage: int = 0,
    field_units: str = "mip",
    parallel: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Cut the fields of sections [z_start, z_end) into ``field_{stage}_..._MIP{dst}_{suffix}.h5``.

    The field volume is read at ``src_mip`` over the physical window of a ``patch_size`` patch
    at ``dst_mip`` centred on MIP0 ``(x_offset, y_offset)`` (snapped to ``2**max(src, dst)``),
    converted to pixels (``field_units="mip0"``: the volume stores MIP0 pixels), resampled to
    ``dst_mip``, and stripped of its average translation (snapped to ``2**max(src, dst)`` MIP0
    pixels), which is stored per pair. Returns the file path.
    """
    if suffix is None or not str(suffix):
        raise MetroemError("--suffix is required for field datasets (e.g. --suffix precomputed)")
    if field_units not in ("mip", "mip0"):
        raise MetroemError(f"--field_units {field_units!r} must be 'mip' or 'mip0'")
    if stage < 0:
        raise MetroemError(f"--stage {stage} must be a non-negative integer")
    if src_mip < 0 or dst_mip < 0:
        raise MetroemError(f"--src_mip {src_mip} and --dst_mip {dst_mip} must be non-negative")
    if parallel < 1:
        raise MetroemError(f"--parallel {parallel} must be at least 1")
    _check_size(patch_size, "--patch_size")
    folder = _prepare_folder(dst_folder)
    info = volumes.volume_info(cv_path)
    if info.num_channels != 2:
        raise MetroemError(
            f"{info.path} has {info.num_channels} channel(s); a field volume has 2 (x, y)"
        )
    _check_mip(info, src_mip, "--src_mip")
    _check_z(info, z_start, z_end, z_start, z_end, "the field")
    zs = list(range(z_start, z_end))
    coarsest = max(src_mip, dst_mip)
    cx, cy = snap_centre(x_offset, y_offset, coarsest)
    x0, y0 = patch_origin(cx, cy, dst_mip, patch_size)
    (vx, vy, _), (sx, sy, _) = info.offset[src_mip], info.size[src_mip]
    ax = _field_axis(x0, patch_size, src_mip, dst_mip, vx, vx + sx, "x")
    ay = _field_axis(y0, patch_size, src_mip, dst_mip, vy, vy + sy, "y")
    name = datasets.field_filename(stage, cx, cy, z_start, dst_mip, suffix)
    path = os.path.join(folder, name)
    datasets.check_output_free(path, overwrite)

    def cut(i: int) -> tuple[np.ndarray, np.ndarray]:
        f = _cut_field(info.path, zs[i], src_mip, dst_mip, patch_size, ax, ay, field_units)
        f, t = remove_translation(f, dst_mip, coarsest)
        return f[0].numpy(), t[0].numpy()

    attrs = {
        "mip": dst_mip,
        "x_offset": cx,
        "y_offset": cy,
        "z": zs,
        "stage": int(stage),
        "tag": suffix,
        "source": info.path,
        "src_mip": int(src_mip),
        "field_units": field_units,
        "resolution": np.asarray(info.resolution[0], np.float64) * [2**dst_mip, 2**dst_mip, 1],
    }
    with (
        datasets.open_writer(path, "field", len(zs), patch_size, attrs, np.float32, overwrite) as w,
        _progress(len(zs), "download_field", progress) as bar,
    ):
        for i, (f, t) in enumerate(_map_ordered(cut, range(len(zs)), parallel)):
            w.put(i, f, t)
            bar.update(1)
    return path


# ----------------------------------------------------------------------------- CLIs


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cv_path", required=True, help="CloudVolume (gs://, s3://, file://, folder)")
    p.add_argument("--dst_folder", required=True, help="folder for the h5 file(s) (created)")
    p.add_argument("--z_start", type=int, required=True, help="first source section")
    p.add_argument("--z_end", type=int, required=True, help="one past the last source section")
    p.add_argument("--x_offset", type=int, required=True, help="patch centre x, MIP0 pixels")
    p.add_argument("--y_offset", type=int, required=True, help="patch centre y, MIP0 pixels")
    cliargs.add_common(p)


def build_image_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="download_image",
        description="Cut source/target image pairs (z, z-1) from a CloudVolume into h5 files, "
        "one per MIP.",
        epilog="example: download_image.py --dst_folder ~/data --z_start 8175 --z_end 8180 "
        "--x_offset 200960 --y_offset 136448 --mip 3 5 --patch_size 1536 1536 --cv_path gs://b/img",
    )
    _common(p)
    p.add_argument(
        "--mips", "--mip", dest="mips", type=int, nargs="+", required=True,
        help="MIP(s) to cut, one file each",
    )
    p.add_argument(
        "--patch_sizes", "--patch_size", dest="patch_sizes", type=int, nargs="+", required=True,
        help="pixels per side at each MIP (one value applies to all MIPs)",
    )
    p.add_argument("--field_dset", help="field h5 file whose translations move the source")
    p.add_argument("--suffix", help="appended to the file name: x.._MIPm_<suffix>.h5")
    p.add_argument("--parallel", type=int, default=1, help="threads reading sections")
    p.add_argument("--cv_path_defects", help="defect mask volume; defect pixels become 0")
    p.add_argument("--defect_threshold", type=float, default=DEFAULT_DEFECT_THRESHOLD,
                   help="image pixels whose defect value is above this become 0 (no data; "
                   f"default {DEFAULT_DEFECT_THRESHOLD:g})")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    return p


def build_field_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="download_field",
        description="Cut a field volume into an h5 field dataset at --dst_mip, with each pair's "
        "average translation removed and recorded.",
        epilog="example: download_field.py --dst_folder ~/data/ --z_start 8175 --z_end 8180 "
        "--x_offset 200960 --y_offset 136448 --src_mip 8 --dst_mip 5 --patch_size 1536 "
        "--suffix precomputed --cv_path gs://b/field",
    )
    _common(p)
    p.add_argument("--src_mip", type=int, required=True, help="MIP to read the field volume at")
    p.add_argument("--dst_mip", type=int, required=True, help="MIP of the stored field")
    p.add_argument("--patch_size", type=int, required=True, help="pixels per side at --dst_mip")
    p.add_argument("--suffix", required=True, help="tag in the file name, e.g. precomputed")
    p.add_argument("--stage", type=int, default=0, help="pyramid stage the field feeds")
    p.add_argument(
        "--field_units", choices=("mip", "mip0"), default="mip",
        help="units of the volume: pixels of each MIP (metroem) or MIP0 pixels (legacy)",
    )
    p.add_argument("--parallel", type=int, default=1, help="threads reading sections")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


@cli_errors
def download_image_main(argv: Iterable[str] | None = None) -> list[str]:
    """``metroem-download-image`` / ``python download_image.py``."""
    a = cliargs.parse_args(build_image_parser(), argv)
    paths = download_image(
        a.cv_path, a.dst_folder, a.z_start, a.z_end, a.x_offset, a.y_offset, a.mips,
        a.patch_sizes, field_dset=a.field_dset, suffix=a.suffix, parallel=a.parallel,
        cv_path_defects=a.cv_path_defects, defect_threshold=a.defect_threshold,
        overwrite=a.overwrite, progress=True,
    )
    for p in paths:  # the command's output: the files written, one a line on stdout
        print(p)
    return paths


@cli_errors
def download_field_main(argv: Iterable[str] | None = None) -> str:
    """``metroem-download-field`` / ``python download_field.py``."""
    a = cliargs.parse_args(build_field_parser(), argv)
    path = download_field(
        a.cv_path, a.dst_folder, a.z_start, a.z_end, a.x_offset, a.y_offset, a.src_mip,
        a.dst_mip, a.patch_size, a.suffix, stage=a.stage, field_units=a.field_units,
        parallel=a.parallel, overwrite=a.overwrite, progress=True,
    )
    print(path)
    return path
