"""``metroem align``: align two images, or a CloudVolume z range, chunk by chunk.

Files (PNG/TIF/npy, any size; ``.npy`` is read window by window, PNG/TIF are loaded whole)::

    metroem align models/demo --src s.png --tgt t.png --field_out field.npy --image_out out.png

CloudVolume (each section z aligned to z-1, or to ``--tgt_z`` / the same z of ``--tgt_path``)::

    metroem align models/demo --src_path file:///data/vol/image --z_start 1 --z_end 10 \\
        --field_path file:///data/vol/field --image_path file:///data/vol/aligned

The field output holds pull fields in pixels of each MIP, ``(2, H, W)`` float32 for files
(channel 0 = x); the aligned image is the source warped by it. The pyramid runs one stage at a
time (:class:`metroem.tiling.StageTiler`), each stage tiled at its own MIP into ``--chunk``
chunks with ``--pad`` pixels of context per side at that MIP (default: per stage, from its net),
so the field equals the whole-image field. Chunks are spread over the ``--device``s; a marker
file is written after each chunk's data (coarse stages keep ``.npy`` caches beside their
markers), so ``--resume`` continues an interrupted run. Existing outputs are never replaced
without ``--overwrite``. See docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from metroem import fields, images, regularize, threads, tiling, volumes
from metroem.aligner import PyramidAligner, load_aligner
from metroem.atomic import atomic_path, atomic_write_bytes
from metroem.errors import MetroemError, cli_errors

__all__ = ["align_files", "align_volume", "read_image", "main"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MARKER_DIR = "_metroem_align"


# --- inputs -------------------------------------------------------------------------------------


def read_image(path: str):
    """A window source for an image file: ``.npy`` (read lazily) or PNG/TIF (loaded whole)."""
    if not os.path.isfile(path):
        raise MetroemError(f"image {path} does not exist; check the path")
    low = path.lower()
    if low.endswith(".npy"):
        src = tiling.NpySource(path)
        if src.channels != 1:
            raise MetroemError(f"{path} has {src.channels} channels; give one grayscale section")
        return src
    if not low.endswith(IMAGE_SUFFIXES):
        raise MetroemError(f"{path}: unsupported image type; use .png, .tif or .npy")
    return tiling.ArraySource(images.read_grey(path))  # the same reading as metroem ingest


def _as_aligner(pyramid, checkpoint_name, stages, device, mip, finetune, finetune_options,
                smoothing_nm=None, resolution_nm=None, translation_init=False):
    if isinstance(pyramid, PyramidAligner):
        aligner = pyramid
        if mip is not None:
            aligner.input_mip = int(mip)
        if finetune:
            aligner.finetune, aligner.finetune_options = True, dict(finetune_options or {})
        if smoothing_nm:
            aligner.smoothing_px = _smoothing_px(smoothing_nm, resolution_nm, aligner.input_mip)
        if translation_init:
            aligner.translation_init = True
        return aligner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained stages warn once per module; fine here
        return load_aligner(pyramid, checkpoint_name, stages, device, mip, finetune,
                            finetune_options, smoothing_nm=smoothing_nm,
                            resolution_nm=resolution_nm, translation_init=translation_init)


def _smoothing_px(smoothing_nm: float, resolution_nm: float | None, mip: int) -> float:
    if resolution_nm is None:
        raise MetroemError("--smoothing_nm needs the pixel size of the images: pass "
                           "--resolution_nm (nm per pixel at MIP 0)")
    return regularize.sigma_px(smoothing_nm, resolution_nm, mip)


def _job_signature(**items) -> dict:
    return {k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
            for k, v in items.items()}


def _check_or_write_job(work: str, sig: dict) -> None:
    path = os.path.join(work, "job.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(sig) if old.get(k) != sig.get(k))
        if diff:
            raise MetroemError(
                f"--resume: the interrupted run in {work} used other settings ({', '.join(diff)});"
                " repeat them or pass --overwrite to start over"
            )
        return
    atomic_write_bytes(path, (json.dumps(sig, indent=2) + "\n").encode())


class _Markers:
    """One empty file per finished chunk, written after the chunk's data."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".done")

    def done(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def mark(self, key: str) -> None:
        # An empty file created after the chunk's data was written: a killed process leaves
        # either no marker or a complete chunk (the page cache survives the process).
        with open(self.path(key), "wb"):
            pass


TILING = "stages-v1"  # in the job signature: a run of another tiling cannot be resumed


def _option_signature(aligner) -> dict:
    """The whole-image options in a job signature (a resumed run must use the same)."""
    return {"smoothing_px": float(getattr(aligner, "smoothing_px", 0.0)),
            "translation_init": bool(getattr(aligner, "translation_init", False))}


def _pad_signature(tiler: tiling.StageTiler) -> str:
    return ",".join(str(p.pad) for p in tiler.plans)


def _stage_desc(tiler: tiling.StageTiler, k: int) -> str:
    p = tiler.plans[k]
    return f"stage {k}/{len(tiler.plans) - 1} (MIP {p.mip})"


def _run_coarse_stages(tiler: tiling.StageTiler, aligner, devices, src, tgt, folder: str,
                       progress: bool, label: str = ""):
    """Run every stage but the last over the whole region into ``.npy`` caches in ``folder``
    (one marker per chunk, so an interrupted run reuses finished chunks); returns the last
    coarse stage's store (for a one-stage pyramid: stage 0's start, see
    :meth:`metroem.tiling.StageTiler.initial_store`)."""
    prev = tiler.initial_store(src, tgt)
    for p in tiler.coarse:
        path = os.path.join(folder, f"stage{p.index}.npy")
        store = tiler.new_store(p.index, path, create=not os.path.exists(path))
        marks = _Markers(os.path.join(folder, f"stage{p.index}_done"))

        def work_fn(model, c, k=p.index, prev=prev, store=store, marks=marks) -> None:
            tiler.run_stage_chunk(model, k, c, src, tgt, prev, store)
            marks.mark(str(c.index))

        tiling.run_chunks(tiler.stage_chunks(p.index), work_fn, aligner, devices,
                          is_done=lambda c, marks=marks: marks.done(str(c.index)),
                          progress=progress, desc=label + _stage_desc(tiler, p.index))
        prev = store
    return prev


# --- files --------------------------------------------------------------------------------------


def _save_image(arr: np.ndarray, path: str) -> None:
    with atomic_path(path) as tmp:
        low = path.lower()
        if low.endswith(".npy"):
            with open(tmp, "wb") as f:
                np.save(f, arr)
        elif low.endswith((".tif", ".tiff")):
            import tifffile

            tifffile.imwrite(tmp, arr)
        else:
            from PIL import Image

            Image.fromarray(arr).save(tmp, format="PNG")


def align_files(
    pyramid,
    src: str,
    tgt: str,
    field_out: str | None = None,
    image_out: str | None = None,
    *,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    mip: int | None = None,
    chunk: int = 1024,
    pad: int | None = None,
    device: str = "cpu",
    finetune: bool = False,
    finetune_options: dict | None = None,
    smoothing_nm: float | None = None,
    resolution_nm: float | None = None,
    translation_init: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Align image file ``src`` to ``tgt``; write the field (``.npy``) and/or aligned image.

    ``pyramid`` is a pyramid folder or a :class:`PyramidAligner`. ``smoothing_nm`` (with
    ``resolution_nm``, nm per MIP0 pixel) and ``translation_init`` are the aligner's options
    (:func:`metroem.aligner.load_aligner`), run tile by tile. Returns a summary dict.
    """
    outputs = [p for p in (field_out, image_out) if p]
    if not outputs:
        raise MetroemError("nothing to write: pass --field_out and/or --image_out")
    if field_out and not field_out.lower().endswith(".npy"):
        raise MetroemError(f"--field_out {field_out} must end in .npy")
    if image_out and not image_out.lower().endswith((".npy", *IMAGE_SUFFIXES)):
        raise MetroemError(f"--image_out {image_out} must end in .png, .tif or .npy")
    first = os.path.abspath(outputs[0])
    work = os.path.join(os.path.dirname(first), f".{os.path.basename(first)}.partial")
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not overwrite:
        if resume and not os.path.exists(work):
            return {"skipped": True, "chunks_run": 0, "outputs": outputs}
        raise MetroemError(f"{existing[0]} already exists; pass --overwrite to replace it")
    if os.path.exists(work) and not (resume or overwrite):
        raise MetroemError(
            f"an interrupted run left {work}; pass --resume to continue it or --overwrite to "
            "start over"
        )
    if overwrite and os.path.exists(work):
        shutil.rmtree(work)
    s, t = read_image(src), read_image(tgt)
    if image_out and image_out.lower().endswith(".png") and s.dtype not in (np.uint8, np.uint16):
        raise MetroemError(f"--image_out {image_out}: PNG holds 8/16-bit images, {src} is "
                           f"{s.dtype}; write .tif or .npy instead")
    if s.shape != t.shape:
        raise MetroemError(f"{src} is {s.shape[1]}x{s.shape[0]} but {tgt} is "
                           f"{t.shape[1]}x{t.shape[0]}; give sections of one size")
    devices = tiling.parse_devices(device)
    aligner = _as_aligner(pyramid, checkpoint_name, stages, devices[0], mip, finetune,
                          finetune_options, smoothing_nm, resolution_nm, translation_init)
    h, w = s.shape
    tiler = tiling.StageTiler(aligner, h, w, chunk, pad)
    os.makedirs(work, exist_ok=True)
    _check_or_write_job(work, _job_signature(
        src=os.path.abspath(src), tgt=os.path.abspath(tgt), size=f"{w}x{h}", chunk=chunk,
        pad=_pad_signature(tiler), tiling=TILING,
        pyramid=pyramid if isinstance(pyramid, (str, os.PathLike)) else "object",
        checkpoint=checkpoint_name, stages=stages, mip=aligner.input_mip, finetune=finetune,
        finetune_options=json.dumps(finetune_options or {}, sort_keys=True),
        field_out=bool(field_out), image_out=bool(image_out), **_option_signature(aligner)))
    fresh = not os.path.exists(os.path.join(work, "field.npy"))
    fw = tiling.NpyWriter(os.path.join(work, "field.npy"), (2, h, w), np.float32, fresh)
    raw = None  # with smoothing, the pyramid's field goes here first and is smoothed after
    if tiler.smoothing_px > 0:
        path = os.path.join(work, "field_raw.npy")
        raw = tiling.NpyFieldStore(path, h, w, create=not os.path.exists(path))
    iw = None
    if image_out:
        fresh = not os.path.exists(os.path.join(work, "image.npy"))
        iw = tiling.NpyWriter(os.path.join(work, "image.npy"), (h, w), s.dtype, fresh)
    markers = _Markers(os.path.join(work, "done"))
    chunks = tiler.output_chunks()
    todo = [c for c in chunks if not markers.done(str(c.index))]
    prev = _run_coarse_stages(tiler, aligner, devices, s, t, work, progress) if todo else None

    def raw_fn(model, c: tiling.Chunk) -> None:
        raw.write(c.y0, c.x0, tiler.output_chunk(model, c, s, t, prev))
        markers.mark(f"raw{c.index}")

    def work_fn(model, c: tiling.Chunk) -> None:
        if raw is None:
            f = tiler.output_chunk(model, c, s, t, prev)
        else:
            f = tiler.smooth_chunk(c, raw.read, s, t)
        fw.write(c.y0, c.x0, f[0].numpy())
        if iw is not None:
            img = tiling.warp_chunk(s, f, c)[0].numpy()
            if np.issubdtype(iw.dtype, np.integer):
                info = np.iinfo(iw.dtype)
                img = np.clip(np.rint(img), info.min, info.max)
            iw.write(c.y0, c.x0, img.astype(iw.dtype))
        markers.mark(str(c.index))

    if raw is not None:
        tiling.run_chunks(todo, raw_fn, aligner, devices,
                          is_done=lambda c: markers.done(f"raw{c.index}"), progress=progress,
                          desc=_stage_desc(tiler, len(tiler.plans) - 1))
    ran = tiling.run_chunks(chunks, work_fn, aligner, devices,
                            is_done=lambda c: markers.done(str(c.index)), progress=progress,
                            desc=_stage_desc(tiler, len(tiler.plans) - 1) if raw is None
                            else f"smoothing ({tiler.smoothing_px:g} px)")
    if field_out:
        os.replace(os.path.join(work, "field.npy"), field_out)
    if image_out:
        tmp = os.path.join(work, "image.npy")
        if image_out.lower().endswith(".npy"):
            os.replace(tmp, image_out)
        else:  # PNG/TIF encoders need the whole image in memory once
            _save_image(np.asarray(np.load(tmp, mmap_mode="r")), image_out)
    shutil.rmtree(work, ignore_errors=True)
    return {"skipped": False, "chunks_run": ran, "chunks": len(chunks), "outputs": outputs}


# --- CloudVolume --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VolJob:
    z: int
    chunk: tiling.Chunk

    @property
    def key(self) -> str:
        return f"z{self.z}_{self.chunk.index}"


def _chunk_xy(path: str) -> int:
    vol = volumes.open_volume(path)
    return int(vol.info["scales"][0]["chunk_sizes"][0][0])


def _prepare_layer(path: str, like: volumes.VolumeInfo, chunk_xy: int, dtype: str, channels: int,
                   overwrite: bool, resume: bool) -> None:
    local = volumes.normalize_path(path)
    exists = local.startswith("file://") and os.path.exists(
        os.path.join(local[len("file://"):], "info"))
    if exists and not (overwrite or resume):
        raise MetroemError(
            f"output layer {path} already exists; pass --overwrite to replace it or --resume to "
            "continue an interrupted run into it"
        )
    if exists and resume and not overwrite:
        info = volumes.volume_info(path)
        if info.size[0] != like.size[0] or info.num_channels != channels:
            raise MetroemError(f"--resume: {path} does not match the source layer's size")
        return
    if exists and overwrite:
        shutil.rmtree(os.path.join(local[len("file://"):], MARKER_DIR), ignore_errors=True)
    volumes.create_volume(path, like.size[0], len(like.mips), dtype, channels,
                          like.resolution[0], like.offset[0], chunk_xy, overwrite=True)


def _marker_dir(field_path: str | None, image_path: str | None, work_dir: str | None) -> str:
    if work_dir:
        return work_dir
    for p in (field_path, image_path):
        url = volumes.normalize_path(p) if p else ""
        if url.startswith("file://"):
            return os.path.join(url[len("file://"):], MARKER_DIR)
    raise MetroemError("remote outputs need --work_dir: a local folder for the chunk markers")


def _z_hint(z: int, tz: int, src: tuple[int, int], tgt: tuple[int, int], tgt_z: int | None,
            other_layer: bool) -> str:
    """How to fix a z range that leaves the layers: name the flag that is wrong."""
    if z >= src[1]:
        return f"end at --z_end {src[1]} (one past the last section)"
    if z < src[0]:
        return f"start at --z_start {src[0] + (0 if other_layer or tgt_z is not None else 1)}"
    if tgt_z is not None:
        return f"pick a --tgt_z in [{tgt[0]}, {tgt[1]})"
    if other_layer:
        return f"--tgt_path has z [{tgt[0]}, {tgt[1]}); pick --z_start/--z_end inside it"
    return f"start at --z_start {src[0] + 1} to align each section to the previous one"


def align_volume(
    pyramid,
    src_path: str,
    z_start: int,
    z_end: int,
    field_path: str | None = None,
    image_path: str | None = None,
    *,
    tgt_path: str | None = None,
    tgt_z: int | None = None,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    mip: int | None = None,
    chunk: int = 1024,
    pad: int | None = None,
    device: str = "cpu",
    finetune: bool = False,
    finetune_options: dict | None = None,
    smoothing_nm: float | None = None,
    translation_init: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    work_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Align sections ``z_start <= z < z_end`` of ``src_path`` at ``mip``; write field / image.

    Each section is aligned to section z-1 of the same layer, or to ``tgt_z`` (fixed), or to
    section z of ``tgt_path``. Output layers get the source layer's bounds, resolution and MIPs;
    MIP ``mip`` and every coarser MIP are written (finer MIPs are left empty).
    ``smoothing_nm`` uses the layer's own MIP0 resolution.
    """
    if not (field_path or image_path):
        raise MetroemError("nothing to write: pass --field_path and/or --image_path")
    if z_end <= z_start:
        raise MetroemError(f"empty z range [{z_start}, {z_end}); pass --z_end > --z_start")
    info = volumes.volume_info(src_path)
    tgt_path = tgt_path or src_path
    tinfo = volumes.volume_info(tgt_path)
    z_lo, z_hi = info.offset[0][2], info.offset[0][2] + info.size[0][2]
    tz_lo, tz_hi = tinfo.offset[0][2], tinfo.offset[0][2] + tinfo.size[0][2]
    pairs = []
    for z in range(z_start, z_end):
        tz = tgt_z if tgt_z is not None else (z if tgt_path != src_path else z - 1)
        if not (z_lo <= z < z_hi) or not (tz_lo <= tz < tz_hi):
            raise MetroemError(
                f"section {z} (target {tz}) is outside the layers' z range [{z_lo}, {z_hi}); "
                + _z_hint(z, tz, (z_lo, z_hi), (tz_lo, tz_hi), tgt_z, tgt_path != src_path)
            )
        pairs.append((z, tz))
    devices = tiling.parse_devices(device)
    aligner = _as_aligner(pyramid, checkpoint_name, stages, devices[0], mip, finetune,
                          finetune_options, smoothing_nm, info.resolution[min(info.mips)][0]
                          / 2 ** min(info.mips), translation_init)
    mip = aligner.input_mip
    if mip not in info.mips:
        raise MetroemError(f"{src_path} has no MIP {mip}; it has MIPs {list(info.mips)}")
    top = max(info.mips)
    h, w = info.size[mip][1], info.size[mip][0]
    tiler = tiling.StageTiler(aligner, h, w, chunk, pad)
    if chunk % 2 ** (top - mip):
        raise MetroemError(f"--chunk {chunk} must be a multiple of {2 ** (top - mip)} to write "
                           f"MIPs {mip}..{top}")
    cxy = _chunk_xy(src_path)
    if field_path:
        _prepare_layer(field_path, info, cxy, "float32", 2, overwrite, resume)
    if image_path:
        _prepare_layer(image_path, info, cxy, info.dtype, 1, overwrite, resume)
    markers = _Markers(_marker_dir(field_path, image_path, work_dir))
    _check_or_write_job(markers.folder, _job_signature(
        src=volumes.normalize_path(src_path), tgt=volumes.normalize_path(tgt_path), tgt_z=tgt_z,
        mip=mip, chunk=chunk, pad=_pad_signature(tiler), tiling=TILING,
        checkpoint=checkpoint_name, stages=stages, finetune=finetune,
        finetune_options=json.dumps(finetune_options or {}, sort_keys=True),
        **_option_signature(aligner)))
    write_lock = threading.Lock()  # coarse MIPs share storage chunks: read-modify-write

    def write_mips(path: str, z: int, c: tiling.Chunk, data: torch.Tensor, is_field: bool):
        for m in range(mip, top + 1):
            if m > mip:
                data = fields.downsample_field(data, 1) if is_field else \
                    fields.downsample_image(data, 1)
            k = 2 ** (m - mip)
            ox, oy = info.offset[m][0], info.offset[m][1]
            volumes.write(path, m, ox + c.x0 // k, oy + c.y0 // k, z, data)

    ran = total = 0
    for z, tz in pairs:
        jobs = [_VolJob(z, c) for c in tiler.output_chunks()]
        total += len(jobs)
        if all(markers.done(j.key) for j in jobs):
            continue
        src = tiling.VolumeSource(src_path, mip, z)
        tgt = tiling.VolumeSource(tgt_path, mip, tz)
        cache = os.path.join(markers.folder, "stages", f"z{z}")
        os.makedirs(cache, exist_ok=True)
        prev = _run_coarse_stages(tiler, aligner, devices, src, tgt, cache, progress,
                                  label=f"z {z} ")

        raw = None  # with smoothing: the pyramid's field of this section, smoothed after
        if tiler.smoothing_px > 0:
            path = os.path.join(cache, "field_raw.npy")
            raw = tiling.NpyFieldStore(path, h, w, create=not os.path.exists(path))

            def raw_fn(model, job: _VolJob, src=src, tgt=tgt, prev=prev, raw=raw) -> None:
                raw.write(job.chunk.y0, job.chunk.x0,
                          tiler.output_chunk(model, job.chunk, src, tgt, prev))
                markers.mark("raw_" + job.key)

            tiling.run_chunks(jobs, raw_fn, aligner, devices,
                              is_done=lambda j: markers.done("raw_" + j.key)
                              or markers.done(j.key),
                              progress=progress,
                              desc=f"z {z} " + _stage_desc(tiler, len(tiler.plans) - 1))

        def work_fn(model, job: _VolJob, src=src, tgt=tgt, prev=prev, raw=raw) -> None:
            if raw is None:
                f = tiler.output_chunk(model, job.chunk, src, tgt, prev)
            else:
                f = tiler.smooth_chunk(job.chunk, raw.read, src, tgt)
            img = tiling.warp_chunk(src, f, job.chunk) if image_path else None
            with write_lock:
                if field_path:
                    write_mips(field_path, job.z, job.chunk, f, True)
                if img is not None:
                    write_mips(image_path, job.z, job.chunk, img, False)
            markers.mark(job.key)

        ran += tiling.run_chunks(jobs, work_fn, aligner, devices,
                                 is_done=lambda j: markers.done(j.key), progress=progress,
                                 desc=f"z {z} " + _stage_desc(tiler, len(tiler.plans) - 1))
        shutil.rmtree(cache, ignore_errors=True)  # the section is done: drop its stage caches
    for p in (field_path, image_path):
        if p:
            volumes.forget(p)
    return {"chunks_run": ran, "chunks": total, "sections": [z for z, _ in pairs]}


# --- command line -------------------------------------------------------------------------------

EPILOG = """examples:
  metroem align models/demo --src s.png --tgt t.png --field_out f.npy --image_out aligned.png
  metroem align models/demo --src_path file:///data/vol/image --z_start 1 --z_end 10 \\
      --field_path file:///data/vol/field --image_path file:///data/vol/aligned \\
      --chunk 2048 --device all
  (add --resume to continue an interrupted run, --finetune to refine each field online)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metroem align", description=__doc__.splitlines()[0].split(": ", 1)[1], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pyramid", help="pyramid folder (module folders <STAGE>_mip<MIP>in_<SUFFIX>)")
    f = p.add_argument_group("image files")
    f.add_argument("--src", help="source image (.png, .tif, .npy)")
    f.add_argument("--tgt", help="target image, same size")
    f.add_argument("--field_out", help="output field .npy, (2, H, W) float32 pixels")
    f.add_argument("--image_out", help="output aligned source (.png, .tif, .npy)")
    v = p.add_argument_group("CloudVolume")
    v.add_argument("--src_path", help="source image layer")
    v.add_argument("--z_start", type=int, help="first source section")
    v.add_argument("--z_end", type=int, help="one past the last source section")
    v.add_argument("--tgt_path", help="target layer (default: the source layer, section z-1)")
    v.add_argument("--tgt_z", type=int, help="align every section to this target section")
    v.add_argument("--field_path", help="output field layer")
    v.add_argument("--image_path", help="output aligned image layer")
    v.add_argument("--work_dir", help="folder for chunk markers (default: in the output layer)")
    m = p.add_argument_group("model and tiling")
    m.add_argument("--checkpoint_name",
                   help="checkpoint of every stage, or one per stage: a,b,c (default: the "
                   "stages' shared default; differing or unfinished defaults are refused)")
    m.add_argument("--stages", type=int, nargs="+", help="stage numbers to run (default: all)")
    m.add_argument("--mip", type=int, help="MIP of the images (default: finest stage's MIP)")
    m.add_argument("--chunk", type=int, default=1024, help="chunk side in pixels (default 1024)")
    m.add_argument("--pad", type=int, default=None,
                   help="context per side in pixels of each stage's MIP (default: per stage, "
                   "from its network; 320 for the demo nets)")
    m.add_argument("--device", default="cpu", help="cpu | gpu | all | GPU ids like 0,2")
    m.add_argument("--smoothing_nm", type=float, default=None,
                   help="keep only the part of the field that is affine over about this length "
                   "(nm): sections' smooth distortion stays, tissue is not bent onto its "
                   "neighbour (metroem.regularize; default: the pyramid's pyramid.json, else "
                   "off; 0 = off; README has the measured trade-off)")
    m.add_argument("--resolution_nm", type=float, default=None,
                   help="nm per MIP0 pixel of image files, for --smoothing_nm (default: the "
                   "pyramid's pyramid.json; volumes: read from the layer)")
    m.add_argument("--translation_init", action="store_true",
                   help="start from one global translation found by phase correlation (drift "
                   "larger than the coarse stage's search window)")
    m.add_argument("--finetune", action="store_true", help="refine each field online")
    m.add_argument("--finetune_iterations", type=int, default=60, help="steps per level")
    m.add_argument("--finetune_lr", type=float, default=0.3, help="px per step (cosine decay)")
    m.add_argument("--finetune_smoothness", type=float, default=3.0, help="smoothness weight")
    o = p.add_argument_group("outputs")
    o.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    threads.add_argument(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    threads.apply(a.threads, announce=True)
    common = dict(
        checkpoint_name=a.checkpoint_name, stages=a.stages, mip=a.mip, chunk=a.chunk,
        pad=a.pad, device=a.device, finetune=a.finetune,
        finetune_options={"iterations": a.finetune_iterations, "lr": a.finetune_lr,
                          "smoothness": a.finetune_smoothness} if a.finetune else None,
        overwrite=a.overwrite, resume=a.resume, progress=not a.no_progress,
        smoothing_nm=a.smoothing_nm, translation_init=a.translation_init,
    )
    if a.src or a.tgt:
        if not (a.src and a.tgt):
            raise MetroemError("pass both --src and --tgt")
        out = align_files(a.pyramid, a.src, a.tgt, a.field_out, a.image_out,
                          resolution_nm=a.resolution_nm, **common)
    elif a.src_path:
        if a.z_start is None or a.z_end is None:
            raise MetroemError("pass --z_start and --z_end with --src_path")
        if a.resolution_nm is not None:
            raise MetroemError("--resolution_nm is for image files; a layer has its own")
        out = align_volume(a.pyramid, a.src_path, a.z_start, a.z_end, a.field_path,
                           a.image_path, tgt_path=a.tgt_path, tgt_z=a.tgt_z,
                           work_dir=a.work_dir, **common)
    else:
        raise MetroemError("pass --src/--tgt image files or --src_path with a z range")
    print(f"done: {out['chunks_run']} chunk(s) aligned" +
          (" (outputs already complete)" if out.get("skipped") else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
