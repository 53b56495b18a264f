"""``metroem align``: align two images, or a CloudVolume z range, chunk by chunk.

Files (PNG/TIF/npy, any size; ``.npy`` is read window by window, PNG/TIF are loaded whole)::

    metroem align --pyramid_path models/demo --src s.png --tgt t.png --field_out field.npy \\
        --image_out out.png

A CloudVolume z range as an aligned stack: section ``--z_start - 1`` is the fixed reference
(copied to the outputs), each later section is aligned onto the aligned sections before it and
rendered once from its raw pixels (:mod:`metroem.stack`; ``--predecessors 3`` outvotes a bad
pair); progress is one line per section with an ETA::

    metroem align --pyramid_path models/demo --src_path file:///data/vol/image --z_start 1 \\
        --z_end 10 --field_path file:///data/vol/field --image_path file:///data/vol/aligned

``--pairwise`` (each section onto raw z-1), ``--tgt_z`` or ``--tgt_path`` give fields between
pairs instead.

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
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from metroem import (
    cliargs,
    defects,
    detrend,
    fields,
    images,
    modules,
    pretrained,
    regularize,
    stack,
    tiling,
    volumes,
)
from metroem.aligner import PyramidAligner, load_aligner, smoothing_settings
from metroem.atomic import atomic_path, atomic_write_bytes
from metroem.devices import parse_devices
from metroem.errors import MetroemError, cli_errors

__all__ = ["align_files", "align_volume", "read_image", "main"]

log = logging.getLogger(__name__)
_GATE = ",".join(f"{v:g}" for v in regularize.GATE)  # in --help

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


def _as_aligner(pyramid, checkpoint_name, stages, device, mip, refine, refine_options,
                smoothing_nm=None, resolution_nm=None, translation_init=None,
                smoothing_gate=None):
    if isinstance(pyramid, PyramidAligner):
        aligner = pyramid
        if mip is not None:
            aligner.input_mip = int(mip)
        if refine:
            aligner.refine, aligner.refine_options = True, dict(refine_options or {})
        if smoothing_nm:
            if resolution_nm is None:
                raise MetroemError("--smoothing_nm needs the pixel size of the images: pass "
                                   "--resolution_nm (nm per pixel at MIP 0)")
            gate = regularize.GATE if smoothing_gate is None else smoothing_gate
            for key, value in smoothing_settings(smoothing_nm, resolution_nm,
                                                 aligner.input_mip, gate).items():
                setattr(aligner, key, value)
        if translation_init is not None:
            aligner.translation_init = bool(translation_init)
        return aligner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained stages warn once per module; fine here
        return load_aligner(pyramid, checkpoint_name, stages, device, mip, refine,
                            refine_options, smoothing_nm=smoothing_nm,
                            resolution_nm=resolution_nm, translation_init=translation_init,
                            smoothing_gate=smoothing_gate)


def layer_resolution_nm(info: volumes.VolumeInfo) -> float:
    """The size in nm of a MIP 0 pixel of a layer (from its finest stored MIP)."""
    return info.resolution[min(info.mips)][0] / 2 ** min(info.mips)


def _pyramid_nm(pyramid) -> float | None:
    """The pyramid's MIP 0 pixel size (``pyramid.json``), None when it does not say."""
    if isinstance(pyramid, PyramidAligner):
        return None
    return modules.pyramid_settings(pyramid).get("resolution_nm") or None


def mip_offset(pyramid, layer_nm: float) -> int:
    """How many MIPs a layer's pixels are coarser than the pyramid's: layer MIP k is the
    pyramid's MIP k + offset, the nearest power of two between the layer's MIP 0 pixel size and
    the pyramid's (``pyramid.json`` ``resolution_nm``; ``pyramid`` a folder). 0 when the
    pyramid does not say (or is an aligner object): then layer MIPs are the pyramid's."""
    pyramid_nm = _pyramid_nm(pyramid)
    if pyramid_nm is None or not layer_nm > 0:
        return 0
    return round(math.log2(layer_nm / pyramid_nm))


def pyramid_input(pyramid, data_nm: float | None, mip: int | None,
                  stages: list[int] | None) -> tuple[int | None, list[int] | None, int]:
    """``(pyramid MIP, stages, offset)`` for images at MIP ``mip`` (None: the default) of data
    whose MIP 0 pixels are ``data_nm`` (None: the pyramid's): see :func:`data_aligner`. The
    pyramid MIP is None for the aligner's default, the stages None for all of them."""
    offset = 0 if data_nm is None else mip_offset(pyramid, data_nm)
    mods = modules.discover(pyramid) if offset else []
    if mip is not None:
        pyramid_mip = mip + offset
        if pyramid_mip < 0:
            raise MetroemError(
                f"MIP {mip} of these images has {data_nm * 2 ** mip:g} nm pixels, finer than "
                f"the pyramid's MIP 0; pass --mip {-offset} or coarser")
    elif offset:
        finest = min(m.mip for m in mods if stages is None or m.stage in stages)
        pyramid_mip = max(finest, offset)  # the data's MIP 0 at the finest
    else:
        pyramid_mip = None
    if offset and stages is None:  # stages finer than the data's pixels would see upsampled
        # images (and tiles cannot run them): they are left out
        stages = [m.stage for m in mods if m.mip >= pyramid_mip] or None
    return pyramid_mip, stages, offset


def volume_aligner(pyramid, info: volumes.VolumeInfo, mip: int | None, checkpoint_name,
                   stages, device, refine=False, refine_options=None, smoothing_nm=None,
                   translation_init=None, smoothing_gate=None) -> tuple[PyramidAligner, int]:
    """The aligner for a CloudVolume layer and the layer MIP it reads: :func:`data_aligner`
    with the layer's own MIP 0 pixel size."""
    return data_aligner(pyramid, layer_resolution_nm(info), mip, checkpoint_name, stages, device,
                        refine, refine_options, smoothing_nm, translation_init, smoothing_gate)


def data_aligner(pyramid, data_nm: float | None, mip: int | None, checkpoint_name, stages,
                 device, refine=False, refine_options=None, smoothing_nm=None,
                 translation_init=None, smoothing_gate=None) -> tuple[PyramidAligner, int]:
    """The aligner for images at MIP ``mip`` of data whose MIP 0 pixels are ``data_nm``, and
    that MIP (by default the one matching the pyramid's finest stage).

    A pyramid that knows its pixel size (``pyramid.json``) runs on data of another pixel size
    at the matching MIP: a 10 nm layer's MIP 0 is MIP 1 (8 nm) of a 4 nm pyramid
    (:func:`mip_offset`), run by the stages at that MIP or coarser unless ``stages`` names
    them; every length (``smoothing_nm``) uses the data's own pixel size. Without ``data_nm``
    (image files without ``--resolution_nm``) the data's MIPs are the pyramid's."""
    if not isinstance(pyramid, PyramidAligner):
        pyramid = pretrained.resolve(pyramid)  # once: a shipped pyramid's name, or a folder
    pyramid_mip, stages, offset = pyramid_input(pyramid, data_nm, mip, stages)
    aligner = _as_aligner(pyramid, checkpoint_name, stages, device, pyramid_mip, refine,
                          refine_options, smoothing_nm,
                          None if data_nm is None else data_nm / 2**offset, translation_init,
                          smoothing_gate)
    data_mip = aligner.input_mip - offset
    if offset:
        log.info("MIP %d of the images (%g nm pixels) runs as the pyramid's MIP %d (%g nm "
                 "pixels)", data_mip, data_nm * 2**data_mip, aligner.input_mip,
                 _pyramid_nm(pyramid) * 2**aligner.input_mip)
    return aligner, data_mip


def _gate_arg(gate):
    """A smoothing gate as JSON can carry it (a stack job's options)."""
    return list(gate) if isinstance(gate, tuple) else gate


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

    def mark(self, key: str, payload: str = "") -> None:
        # A file created after the chunk's data was written: a killed process leaves either
        # no marker or a complete chunk (the page cache survives the process). ``payload`` is
        # what the chunk measured (a stack section's similarity sums), read back on resume.
        if payload:  # all of it or nothing: it is read back
            atomic_write_bytes(self.path(key), payload.encode())
            return
        with open(self.path(key), "w"):
            pass

    def payload(self, key: str) -> str:
        """What :meth:`mark` stored for ``key`` ("" for none)."""
        with open(self.path(key)) as f:
            return f.read()


TILING = "stages-v1"  # in the job signature: a run of another tiling cannot be resumed
FILES_WORK = 2  # align_files' work folder layout, in its job signature (1: before tiled_field)


def _option_signature(aligner) -> dict:
    """The whole-image options in a job signature (a resumed run must use the same)."""
    gate = getattr(aligner, "smoothing_gate", None)
    if getattr(aligner, "smoothing_px", 0.0) and gate is not None:  # runs before gates: none
        return {"smoothing_px": float(aligner.smoothing_px),
                "smoothing_gate": f"{gate[0]:g},{gate[1]:g}@{aligner.gate_window_px:g}px",
                "translation_init": bool(getattr(aligner, "translation_init", False))}
    return {"smoothing_px": float(getattr(aligner, "smoothing_px", 0.0)),
            "translation_init": bool(getattr(aligner, "translation_init", False))}


def _pad_signature(tiler: tiling.StageTiler) -> str:
    return ",".join(str(p.pad) for p in tiler.plans)


class _PairMarks:
    """Chunk markers of one pair's :func:`metroem.tiling.tiled_field` run: coarse stage ``k``'s
    beside its cache (``<folder>/stage<k>_done/``), the output passes' in ``markers`` as
    ``<prefix><pass><index>``."""

    def __init__(self, folder: str, markers: _Markers, prefix: str):
        self.folder, self.markers, self.prefix = folder, markers, prefix
        self.stages: dict[str, _Markers] = {}

    def _at(self, name: str, c: tiling.Chunk) -> tuple[_Markers, str]:
        if name.startswith("stage"):
            if name not in self.stages:
                self.stages[name] = _Markers(os.path.join(self.folder, f"{name}_done"))
            return self.stages[name], str(c.index)
        return self.markers, f"{self.prefix}{name}{c.index}"

    def done(self, name: str, c: tiling.Chunk) -> bool:
        m, key = self._at(name, c)
        return m.done(key)

    def mark(self, name: str, c: tiling.Chunk) -> None:
        m, key = self._at(name, c)
        m.mark(key)


def _pair_field(tiler: tiling.StageTiler, aligner, devices, src, tgt, folder: str,
                markers: _Markers, prefix: str, progress: bool, label: str = "", start=None):
    """:func:`metroem.tiling.tiled_field` of one section pair, resumable: every pass's field in
    an ``.npy`` cache in ``folder``, every chunk marked (:class:`_PairMarks`). Returns the store
    of the finished field and the number of chunks its last pass ran."""
    os.makedirs(folder, exist_ok=True)

    def stores(name: str):
        path = os.path.join(folder, f"{name}.npy")
        return tiler.store(name, path, create=not os.path.exists(path))

    return tiling.tiled_field(tiler, aligner, src, tgt, devices, stores=stores,
                              marks=_PairMarks(folder, markers, prefix), start=start,
                              progress=progress, label=label)


def _pieces_field(tiler: tiling.StageTiler, aligner, devices, src, tgt, folder: str,
                  markers: _Markers, prefix: str, progress: bool, label: str, start,
                  pieces: defects.PieceMap):
    """:func:`_pair_field` of a source its defects cut into ``pieces``: each piece onto the
    whole target, then onto its share of it, combined per pixel (:mod:`metroem.defects`)."""
    ks = range(1, pieces.count + 1)

    def one(k: int, target, step: str):
        return _pair_field(tiler, aligner, devices, defects.PieceSource(src, pieces, k), target,
                           os.path.join(folder, f"piece{k}{step}"), markers,
                           f"{prefix}p{k}{step}_", progress, f"{label}piece {k}{step} ",
                           start)[0]

    first = [one(k, tgt, "a") for k in ks]
    second = [one(k, defects.ShareSource(tgt, pieces, k, first), "b") for k in ks]
    path = os.path.join(folder, "pieces.npy")
    out = tiler.store("pieces", path, create=not os.path.exists(path))

    def combine(model, c: tiling.Chunk) -> None:
        out.write(c.y0, c.x0, defects.combined_window(pieces, second, c.y0, c.x0, c.h, c.w))
        markers.mark(f"{prefix}pieces{c.index}")

    ran = tiling.run_chunks(tiler.output_chunks(), combine, aligner, devices,
                            is_done=lambda c: markers.done(f"{prefix}pieces{c.index}"),
                            progress=progress, desc=f"{label}pieces combined")
    return out, ran


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
    refine: bool = False,
    refine_options: dict | None = None,
    smoothing_nm: float | None = None,
    resolution_nm: float | None = None,
    translation_init: bool | None = None,
    smoothing_gate: tuple[float, float] | str | None = None,
    src_mask: str | None = None,
    tgt_mask: str | None = None,
    mask_threshold: float = 0.0,
    split_defects: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Align image file ``src`` to ``tgt``; write the field (``.npy``) and/or aligned image.

    ``pyramid`` is a pyramid folder or a :class:`PyramidAligner`. ``smoothing_nm`` (with
    ``resolution_nm``, nm per MIP0 pixel), ``smoothing_gate`` and ``translation_init`` are the
    aligner's options
    (:func:`metroem.aligner.load_aligner`), run tile by tile. ``src_mask`` / ``tgt_mask`` are
    defect mask images of the same size (values above ``mask_threshold`` are defects: no data,
    and with ``split_defects`` a source they cut apart is aligned piece by piece,
    :mod:`metroem.defects`). Returns a summary dict.
    """
    outputs = [p for p in (field_out, image_out) if p]
    if not outputs:
        raise MetroemError("nothing to write: pass --field_out and/or --image_out")
    if field_out and not field_out.lower().endswith(".npy"):
        raise MetroemError(f"--field_out {field_out} must end in .npy")
    if image_out and not image_out.lower().endswith((".npy", *IMAGE_SUFFIXES)):
        raise MetroemError(f"--image_out {image_out} must end in .png, .tif or .npy")
    named = {"--src": src, "--tgt": tgt, "--src_mask": src_mask, "--tgt_mask": tgt_mask}
    for flag, p in (("--field_out", field_out), ("--image_out", image_out)):
        if not p:
            continue
        same = [f for f, q in named.items() if q and os.path.abspath(q) == os.path.abspath(p)]
        if same:
            raise MetroemError(f"{flag} {p} is also {same[0]}; write the output to a new file "
                               "(an input is never written to)")
        named[flag] = p
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
    s = _masked_file(s, src, src_mask, mask_threshold)
    t = _masked_file(t, tgt, tgt_mask, mask_threshold)
    devices = parse_devices(device)
    aligner, _ = data_aligner(pyramid, resolution_nm, mip, checkpoint_name, stages, devices[0],
                              refine, refine_options, smoothing_nm, translation_init,
                              smoothing_gate)
    h, w = s.shape
    tiler = tiling.StageTiler(aligner, h, w, chunk, pad)
    os.makedirs(work, exist_ok=True)
    _check_or_write_job(work, _job_signature(
        src=os.path.abspath(src), tgt=os.path.abspath(tgt), size=f"{w}x{h}", chunk=chunk,
        pad=_pad_signature(tiler), tiling=TILING,
        pyramid=pyramid if isinstance(pyramid, (str, os.PathLike)) else "object",
        checkpoint=checkpoint_name, stages=stages, mip=aligner.input_mip, refine=refine,
        refine_options=json.dumps(refine_options or {}, sort_keys=True),
        field_out=bool(field_out), image_out=bool(image_out), work=FILES_WORK,
        src_mask=os.path.abspath(src_mask) if src_mask else None,
        tgt_mask=os.path.abspath(tgt_mask) if tgt_mask else None,
        mask_threshold=mask_threshold, split_defects=split_defects,
        **_option_signature(aligner)))
    markers = _Markers(os.path.join(work, "done"))
    split = src_mask and _can_split(aligner, split_defects)
    pieces = defects.piece_map(s, h, w) if split else None
    args = (tiler, aligner, devices, s, t, work, markers, "", progress, "", None)
    if pieces is not None and pieces.count >= 2:
        field, ran = _pieces_field(*args, pieces)
    else:
        field, ran = _pair_field(*args)
    chunks = tiler.output_chunks()
    if image_out:
        fresh = not os.path.exists(os.path.join(work, "image.npy"))
        iw = tiling.NpyWriter(os.path.join(work, "image.npy"), (h, w), s.dtype, fresh)

        def image_fn(model, c: tiling.Chunk) -> None:
            img = tiling.warp_chunk(s, field.read(c.y0, c.x0, c.h, c.w), c)[0].numpy()
            if np.issubdtype(iw.dtype, np.integer):
                info = np.iinfo(iw.dtype)
                img = np.clip(np.rint(img), info.min, info.max)
            iw.write(c.y0, c.x0, img.astype(iw.dtype))
            markers.mark(f"image{c.index}")

        ran = tiling.run_chunks(chunks, image_fn, aligner, devices,
                                is_done=lambda c: markers.done(f"image{c.index}"),
                                progress=progress, desc="aligned image")
    if field_out:
        os.replace(field.path, field_out)
    if image_out:
        tmp = os.path.join(work, "image.npy")
        if image_out.lower().endswith(".npy"):
            os.replace(tmp, image_out)
        else:  # PNG/TIF encoders need the whole image in memory once
            _save_image(np.asarray(np.load(tmp, mmap_mode="r")), image_out)
    shutil.rmtree(work, ignore_errors=True)
    return {"skipped": False, "chunks_run": ran, "chunks": len(chunks), "outputs": outputs}


def _can_split(aligner, split: bool) -> bool:
    """``split``, unless the pyramid's stages are not no-data-aware: their fields where a piece
    has no data are arbitrary, and so would be the pieces' shares (logged)."""
    if split and not getattr(aligner, "nodata_aware", False):
        log.warning("this pyramid's stages are not no-data-aware (spec nodata_aware), so "
                    "sections its defects cut apart are aligned in one piece")
        return False
    return split


def _masked_file(img, path: str, mask_path: str | None, threshold: float):
    """Image source ``img`` of file ``path`` with the defects of mask file ``mask_path`` read
    as no data (a one-line error for a mask of another size)."""
    if not mask_path:
        return img
    if not os.path.exists(mask_path):
        raise MetroemError(f"defect mask {mask_path} does not exist; pass an existing mask "
                           "image (nonzero = defect)")
    mask = read_image(mask_path)
    if mask.shape != img.shape:
        raise MetroemError(f"defect mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but "
                           f"{path} is {img.shape[1]}x{img.shape[0]}; give a mask of the "
                           "image's size")
    return defects.MaskedSource(img, mask, threshold)


# --- CloudVolume --------------------------------------------------------------------------------


def _chunk_xy(path: str) -> int:
    vol = volumes.open_volume(path)
    return int(vol.info["scales"][0]["chunk_sizes"][0][0])


def _prepare_layer(path: str, like: volumes.VolumeInfo, chunk_xy: int, dtype: str, channels: int,
                   overwrite: bool, resume: bool) -> None:
    # (whether an existing output may be replaced or resumed into is _check_outputs' decision,
    # made before any layer is created)
    local = volumes.normalize_path(path)
    exists = _layer_exists(path)
    if exists and resume and not overwrite:
        info = volumes.volume_info(path)
        if info.size[0] != like.size[0] or info.num_channels != channels:
            raise MetroemError(f"--resume: {path} does not match the source layer's size")
        return
    if exists and overwrite:
        shutil.rmtree(os.path.join(local[len("file://"):], MARKER_DIR), ignore_errors=True)
    volumes.create_volume(path, like.size[0], len(like.mips), dtype, channels,
                          like.resolution[0], like.offset[0], chunk_xy, overwrite=True)


def _layer_key(path: str) -> str:
    return volumes.normalize_path(path).rstrip("/")


def _layer_exists(path: str) -> bool:
    local = volumes.normalize_path(path)
    return local.startswith("file://") and os.path.exists(
        os.path.join(local[len("file://"):], "info"))


def _check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None],
                   overwrite: bool, resume: bool, marker_dir: str) -> None:
    """Refuse, before any layer is created, outputs that are an input or each other, existing
    outputs without ``--overwrite`` / ``--resume``, and ``--resume`` into a layer no metroem
    run left (no chunk markers): a run never writes into data it did not make."""
    seen: dict[str, str] = {}
    for flag, path in inputs.items():
        if path:
            seen.setdefault(_layer_key(path), flag)
    for flag, path in outputs.items():
        if not path:
            continue
        key = _layer_key(path)
        if key in seen:
            raise MetroemError(f"{flag} {path} is also {seen[key]}; write the outputs to new "
                               "layers (an input is never written to)")
        seen[key] = flag
    existing = [p for p in outputs.values() if p and _layer_exists(p)]
    if not existing or overwrite:
        return
    if not resume:
        raise MetroemError(f"output layer {existing[0]} already exists; pass --overwrite to "
                           "replace it or --resume to continue an interrupted run into it")
    if not os.path.isdir(marker_dir):
        raise MetroemError(f"--resume: {existing[0]} holds no interrupted metroem run (no "
                           f"{marker_dir}); pass new output layers, or --overwrite to replace "
                           "it")


def _marker_dir(field_path: str | None, image_path: str | None, work_dir: str | None) -> str:
    if work_dir:
        return work_dir
    for p in (field_path, image_path):
        url = volumes.normalize_path(p) if p else ""
        if url.startswith("file://"):
            return os.path.join(url[len("file://"):], MARKER_DIR)
    raise MetroemError("remote outputs need --work_dir: a local folder for the chunk markers")


def _z_ranges(info: volumes.VolumeInfo, tinfo: volumes.VolumeInfo, z_start: int, z_end: int,
              tgt_z: int | None, same_layer: bool, stack: bool) -> list[tuple[int, int]]:
    """``(z, target z)`` of every section; a one-line error for sections the layers lack."""
    z_lo, z_hi = info.offset[0][2], info.offset[0][2] + info.size[0][2]
    tz_lo, tz_hi = tinfo.offset[0][2], tinfo.offset[0][2] + tinfo.size[0][2]
    if z_start < z_lo or z_end > z_hi:
        if z_end > z_hi:
            raise MetroemError(f"--z_end {z_end} is past the layer's last section {z_hi - 1} "
                               f"(z range [{z_lo}, {z_hi})); pass --z_end {z_hi} or less")
        raise MetroemError(f"--z_start {z_start} is before the layer's first section {z_lo} "
                           f"(z range [{z_lo}, {z_hi})); start at --z_start {z_lo + 1}")
    if (stack or same_layer and tgt_z is None) and z_start - 1 < z_lo:
        what = "the stack's fixed reference" if stack else "the first section's target"
        raise MetroemError(
            f"section {z_start - 1} ({what}, --z_start - 1) is outside the layer's z range "
            f"[{z_lo}, {z_hi}); start at --z_start {z_lo + 1}"
        )
    pairs = []
    for z in range(z_start, z_end):
        tz = z - 1 if stack else (tgt_z if tgt_z is not None else (z - 1 if same_layer else z))
        if not tz_lo <= tz < tz_hi:
            raise MetroemError(f"target section {tz} is outside the target layer's z range "
                               f"[{tz_lo}, {tz_hi}); pick --tgt_z inside it")
        pairs.append((z, tz))
    return pairs


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
    pairwise: bool = False,
    predecessors: int = 1,
    block_size: int | None = None,
    queue: str | None = None,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    mip: int | None = None,
    chunk: int = 1024,
    pad: int | None = None,
    device: str = "cpu",
    refine: bool = False,
    refine_options: dict | None = None,
    smoothing_nm: float | None = None,
    translation_init: bool | None = None,
    smoothing_gate: tuple[float, float] | str | None = None,
    mask_path: str | None = None,
    mask_mip: int | None = None,
    mask_threshold: float = 0.0,
    split_defects: bool = True,
    misaligned_ratio: float = stack.MISALIGNED_RATIO,
    runaway_stop: int = stack.RUNAWAY_STOP,
    detrend_sections: float | None = None,
    overwrite: bool = False,
    resume: bool = False,
    work_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Align sections ``z_start <= z < z_end`` of ``src_path`` at ``mip``; write field / image.

    By default the range is aligned as a stack (:mod:`metroem.stack`): section ``z_start - 1``
    is the fixed reference, copied to the outputs; each section is aligned onto the *aligned*
    sections before it (``predecessors`` of them, fields combined by their median), starting
    from the previous section's field, and rendered once from its raw pixels. The field layer
    holds every section's whole field. Both output layers are needed.

    ``block_size`` aligns the stack in blocks of that many sections, stitched after
    (:mod:`metroem.workers`); with ``queue`` (a python-task-queue URL) the block tasks are only
    enqueued for ``metroem worker`` processes.

    ``pairwise=True``, ``tgt_z`` or ``tgt_path`` align pairs instead: each section onto raw
    section z-1 of the same layer, or onto ``tgt_z`` (fixed), or onto section z of
    ``tgt_path``. Output layers get the source layer's bounds, resolution and MIPs; MIP ``mip``
    and every coarser MIP are written (finer MIPs are left empty). ``smoothing_nm`` uses the
    layer's own MIP0 resolution; ``smoothing_gate`` as for
    :func:`metroem.aligner.load_aligner`.

    ``mask_path`` is a defect mask layer of the source layer (folds, cracks; read at
    ``mask_mip``, default ``mip``; values above ``mask_threshold`` are defects): its pixels are
    no data, they stay empty in the aligned image, and with ``split_defects`` a section its
    defects cut apart is aligned piece by piece, so the field may jump across a fold
    (:mod:`metroem.defects`).

    Stacks: a section whose correlation with its target is under ``misaligned_ratio`` times
    the stack's recent level is not a target for later sections, and ``runaway_stop`` such
    sections in a row stop the run (:class:`metroem.stack.MisalignmentGuard`; queued blocks
    only flag).

    ``detrend_sections`` (sigma in sections) removes the trend of the aligned stack's
    placement along z (:mod:`metroem.detrend`; for sections placed independently, as in ssTEM):
    the serial alignment goes to layers in the work folder first, and the output layers get
    its fields with the trend taken out, each section rendered once from its raw pixels.
    """
    stack_mode = not pairwise and tgt_path is None and tgt_z is None
    if not (field_path or image_path):
        raise MetroemError("nothing to write: pass --field_path and/or --image_path")
    if stack_mode and not (field_path and image_path):
        raise MetroemError(
            "aligning a stack needs both --field_path and --image_path (each section is aligned "
            "onto the aligned one before it); pass both, or --pairwise for fields between raw "
            "neighbours"
        )
    if predecessors < 1 or (predecessors > 1 and not stack_mode):
        raise MetroemError("--predecessors must be >= 1 and is for stacks (not --pairwise, "
                           "--tgt_z or --tgt_path)")
    stack.MisalignmentGuard(misaligned_ratio, runaway_stop)  # a bad setting: one line, now
    detrend_sections = detrend.check_sigma(detrend_sections)
    if detrend_sections is not None and not stack_mode:
        raise MetroemError("--detrend_sections is for stacks (not --pairwise, --tgt_z or "
                           "--tgt_path)")
    if z_end <= z_start:
        raise MetroemError(f"empty z range [{z_start}, {z_end}); pass --z_end > --z_start")
    if (block_size is not None or queue) and not stack_mode:
        raise MetroemError("--block_size and --queue are for stacks (not --pairwise, --tgt_z "
                           "or --tgt_path)")
    if queue and block_size is None:
        raise MetroemError("--queue needs --block_size: the stack is split into blocks of "
                           "that many sections, one task each")
    if block_size is not None and block_size < 1:
        raise MetroemError(f"--block_size must be >= 1, got {block_size}")
    if block_size is not None and not isinstance(pyramid, (str, os.PathLike)):
        raise MetroemError("--block_size needs the pyramid as a folder (workers load it)")
    if queue:
        from metroem import workers

        workers._queue(queue)  # an unreachable queue fails before anything is written
    _check_outputs({"--src_path": src_path, "--tgt_path": tgt_path, "--mask_path": mask_path},
                   {"--field_path": field_path, "--image_path": image_path}, overwrite, resume,
                   _marker_dir(field_path, image_path, work_dir))
    info = volumes.volume_info(src_path)
    same_layer = tgt_path is None or volumes.normalize_path(tgt_path) == info.path
    tgt_path = tgt_path or src_path
    pairs = _z_ranges(info, volumes.volume_info(tgt_path), z_start, z_end, tgt_z, same_layer,
                      stack_mode)
    devices = parse_devices(device)
    aligner, mip = volume_aligner(pyramid, info, mip, checkpoint_name, stages, devices[0],
                                  refine, refine_options, smoothing_nm, translation_init,
                                  smoothing_gate)
    if stack_mode and not getattr(aligner, "smoothing_px", 0.0) and z_end - z_start > 1:
        log.warning("aligning a stack without --smoothing_nm: an unsmoothed field bends each "
                    "section's tissue onto the one before, and over many sections the stack "
                    "shears and shrinks (benchmarks/results/stack.md, long stack); pass "
                    "--smoothing_nm (e.g. 640; docs/inference.md)")
    if mip not in info.mips:
        raise MetroemError(f"{src_path} has no MIP {mip}; it has MIPs {list(info.mips)}")
    mask = None
    if mask_path:
        zs = sorted({z for pair in pairs for z in pair} if same_layer or stack_mode
                    else {z for z, _ in pairs})
        split_defects = _can_split(aligner, split_defects)
        mask = defects.MaskLayer(mask_path, mask_mip, mask_threshold, split_defects).resolved(
            info, mip, zs)
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
        mode="stack" if stack_mode else "pairs", predecessors=predecessors,
        block_size=block_size, misaligned_ratio=misaligned_ratio if stack_mode else None,
        reference=z_start - 1 if stack_mode else None, detrend_sections=detrend_sections,
        mip=mip, chunk=chunk, pad=_pad_signature(tiler), tiling=TILING,
        checkpoint=checkpoint_name, stages=stages, refine=refine,
        refine_options=json.dumps(refine_options or {}, sort_keys=True),
        mask=json.dumps(dataclasses.asdict(mask) if mask else None, sort_keys=True),
        **_option_signature(aligner)))
    out = _VolumeWriter(info, mip, top, field_path, image_path)
    run = _Run(aligner, tiler, devices, markers, out, progress, _Sections(src_path, mip, mask),
               misaligned_ratio, runaway_stop)
    if block_size is not None:
        return _align_blocks(markers.folder, pyramid, src_path, z_start, z_end,
                             field_path, image_path, block_size, predecessors, queue, chunk,
                             pad, device, progress,
                             dict(checkpoint_name=checkpoint_name, stages=stages, mip=mip,
                                  refine=refine, refine_options=refine_options,
                                  smoothing_nm=smoothing_nm,
                                  smoothing_gate=_gate_arg(smoothing_gate)),
                             dataclasses.asdict(mask) if mask else None, misaligned_ratio,
                             detrend_sections, (info, cxy))
    try:
        if stack_mode and detrend_sections is not None:
            ran, total = _align_stack_detrended(run, src_path, z_start - 1,
                                                [z for z, _ in pairs], predecessors,
                                                detrend_sections, cxy)
        elif stack_mode:
            ran, total, _ = _align_stack(run, src_path, z_start - 1, [z for z, _ in pairs],
                                         predecessors)
        else:
            ran, total = _align_pairs(run, src_path, tgt_path, pairs)
    finally:
        for p in (field_path, image_path):
            if p:
                volumes.forget(p)
    return {"chunks_run": ran, "chunks": total, "sections": [z for z, _ in pairs],
            "reference": z_start - 1 if stack_mode else None}


def _job_pyramid(pyramid) -> str:
    """How a stack job names its pyramid: a shipped pyramid's name as it is (each worker finds
    its own installed copy), a folder as an absolute path."""
    if not os.path.exists(str(pyramid)) and str(pyramid) in pretrained.REGISTRY:
        return str(pyramid)
    return os.path.abspath(str(pyramid))


def _align_blocks(folder, pyramid, src_path, z_start, z_end, field_path, image_path,
                  block_size, predecessors, queue, chunk, pad, device, progress,
                  aligner_options, mask=None,
                  misaligned_ratio: float = stack.MISALIGNED_RATIO,
                  detrend_sections: float | None = None, layout=None) -> dict:
    """A stack in blocks (:mod:`metroem.workers`): enqueued, or run here in task order;
    ``layout`` (source info, chunk size) makes the stitched work layers of a detrended one."""
    from metroem import workers

    job = workers.StackJob(
        folder=folder, pyramid=_job_pyramid(pyramid), src_path=src_path,
        z_start=z_start, z_end=z_end, field_path=field_path, image_path=image_path,
        block_size=block_size, predecessors=predecessors, aligner=aligner_options,
        chunk=chunk, pad=pad, device=device, queue=queue, mask=mask,
        misaligned_ratio=misaligned_ratio, detrend_sections=detrend_sections)
    if detrend_sections is not None:  # made here, once: workers only write into them
        info, cxy = layout
        _prepare_layer(job.stitched_layer("field"), info, cxy, "float32", 2, False, True)
        _prepare_layer(job.stitched_layer("image"), info, cxy, info.dtype, 1, False, True)
    job.save()
    n = len(job.blocks())
    if queue:
        k = workers.enqueue(job)
        return {"chunks_run": 0, "chunks": 0, "sections": list(range(z_start, z_end)),
                "reference": z_start - 1, "enqueued": k, "blocks": n}
    workers._Context._cache.pop(os.path.abspath(folder), None)  # this job's settings
    workers.run_local(job, progress)
    return {"chunks_run": None, "chunks": None, "sections": list(range(z_start, z_end)),
            "reference": z_start - 1, "blocks": n}


class _VolumeWriter:
    """Writes a chunk's field and/or image at the run's MIP and every coarser MIP."""

    def __init__(self, info: volumes.VolumeInfo, mip: int, top: int, field_path: str | None,
                 image_path: str | None):
        self.info, self.mip, self.top = info, mip, top
        self.field_path, self.image_path = field_path, image_path
        self.lock = threading.Lock()  # coarse MIPs share storage chunks: read-modify-write

    def _write(self, path: str, z: int, c: tiling.Chunk, data: torch.Tensor, is_field: bool):
        for m in range(self.mip, self.top + 1):
            if m > self.mip:
                data = fields.downsample_field(data, 1) if is_field else \
                    fields.downsample_image(data, 1)
            k = 2 ** (m - self.mip)
            ox, oy = self.info.offset[m][0], self.info.offset[m][1]
            volumes.write(path, m, ox + c.x0 // k, oy + c.y0 // k, z, data)

    def write(self, z: int, c: tiling.Chunk, field: torch.Tensor | None,
              image: torch.Tensor | None) -> None:
        with self.lock:
            if self.field_path and field is not None:
                self._write(self.field_path, z, c, field, True)
            if self.image_path and image is not None:
                self._write(self.image_path, z, c, image, False)


@dataclass
class _Sections:
    """How a volume run reads the sections of its source layer ``path`` at ``mip``: with the
    defects of ``mask`` (a resolved :class:`metroem.defects.MaskLayer`) read as no data."""

    path: str
    mip: int
    mask: defects.MaskLayer | None = None

    def _masked(self, path: str) -> bool:
        return self.mask is not None and volumes.normalize_path(path) == \
            volumes.normalize_path(self.path)

    def source(self, path: str, z: int):
        """Section ``z`` of layer ``path``; masked when ``path`` is the source layer."""
        sec = tiling.VolumeSource(path, self.mip, z)
        return self.mask.source(sec, self.mip, z) if self._masked(path) else sec

    def pieces(self, src, path: str, z: int, height: int, width: int):
        """The pieces its defects cut source section ``z`` into, or ``None``."""
        return self.mask.pieces(src, z, height, width) if self._masked(path) else None


@dataclass
class _Run:
    """What every section of a volume run shares."""

    aligner: PyramidAligner
    tiler: tiling.StageTiler
    devices: list
    markers: _Markers
    out: _VolumeWriter
    progress: bool
    sections: _Sections | None = None
    misaligned_ratio: float = stack.MISALIGNED_RATIO
    runaway_stop: int = stack.RUNAWAY_STOP
    _damaged: dict = dataclasses.field(default_factory=dict)

    def section(self, path: str, z: int):
        """Section ``z`` of ``path`` at the run's MIP (defects masked on the source layer)."""
        if self.sections is None:
            return tiling.VolumeSource(path, self.out.mip, z)
        return self.sections.source(path, z)

    def pieces(self, src, path: str, z: int):
        if self.sections is None:
            return None
        return self.sections.pieces(src, path, z, self.tiler.height, self.tiler.width)

    def damaged(self, z: int) -> bool:
        """Whether the source layer's section ``z`` has defects (a mask marks any pixel)."""
        if self.sections is None or self.sections.mask is None:
            return False
        if z not in self._damaged:
            self._damaged[z] = self.sections.mask.has_defects(z)
        return self._damaged[z]

    def chunks(self, fn, jobs, key: str, desc: str) -> int:
        """Run ``fn(model, chunk)`` on every chunk not marked ``key + index``; mark each (with
        what ``fn`` returns, a string, as the marker's payload)."""
        def work(model, c):
            self.markers.mark(f"{key}{c.index}", fn(model, c) or "")

        return tiling.run_chunks(jobs, work, self.aligner, self.devices,
                                 is_done=lambda c: self.markers.done(f"{key}{c.index}"),
                                 progress=self.progress, desc=desc)

    def cache(self, z: int) -> str:
        path = os.path.join(self.markers.folder, "stages", f"z{z}")
        os.makedirs(path, exist_ok=True)
        return path

    def pair_field(self, src, tgt, folder: str, label: str, start=None, pieces=None):
        """The pyramid's field of one section pair into an ``.npy`` store in ``folder``
        (smoothed when the aligner smooths; piece by piece when ``pieces`` is given); returns
        the store (resumable: chunk markers)."""
        key = os.path.relpath(folder, self.markers.folder).replace(os.sep, "_")
        args = (self.tiler, self.aligner, self.devices, src, tgt, folder, self.markers,
                key + "_", self.progress, label, start)
        store, _ = _pieces_field(*args, pieces) if pieces is not None else _pair_field(*args)
        return store


def _align_pairs(run: _Run, src_path: str, tgt_path: str, pairs) -> tuple[int, int]:
    """Each section onto its target section (raw): fields between pairs, no composition."""
    t = run.tiler
    ran = total = 0
    for z, tz in pairs:
        chunks = t.output_chunks()
        total += len(chunks)
        if all(run.markers.done(f"z{z}_{c.index}") for c in chunks):
            continue
        src = run.section(src_path, z)
        tgt = run.section(tgt_path, tz)
        store = run.pair_field(src, tgt, run.cache(z), f"z {z} ",
                               pieces=run.pieces(src, src_path, z))

        def final(model, c, src=src, store=store, z=z) -> None:
            f = store.read(c.y0, c.x0, c.h, c.w)
            img = tiling.warp_chunk(src, f, c) if run.out.image_path else None
            run.out.write(z, c, f, img)

        ran += run.chunks(final, chunks, f"z{z}_", f"z {z} writing")
        shutil.rmtree(run.cache(z), ignore_errors=True)  # done: drop its stage caches
    return ran, total


def _section_has_data(src, height: int, width: int) -> bool:
    """Whether a section (a source) holds any data, read in strips (stops at the first data)."""
    rows = max(1, 2**24 // max(1, width))
    return any(np.any(src.read(y, 0, min(rows, height - y), width))
               for y in range(0, height, rows))


def _align_stack(run: _Run, src_path: str, ref: int, zs: list[int], predecessors: int,
                 detrended: bool = False, whole_stack: bool = True
                 ) -> tuple[int, int, list[int]]:
    """Serial stack alignment (:mod:`metroem.stack`) over the layers, chunk by chunk; returns
    the chunks run, the chunks in all, and the sections without data or found misaligned.

    Each written chunk's marker holds the similarity sums of the aligned chunk and its nearest
    target, so the :class:`~metroem.stack.MisalignmentGuard` replays its verdicts on resume."""
    t, mip = run.tiler, run.out.mip
    chunks = t.output_chunks()
    ref_src = run.section(src_path, ref)
    zero = torch.zeros(1, 2, t.chunk, t.chunk)
    guard = stack.MisalignmentGuard(run.misaligned_ratio, run.runaway_stop)
    # the guard's cells must start at every chunk's origin to match the in-memory stack's
    guard_block = math.gcd(t.chunk, stack.GUARD_BLOCK)

    def copy_ref(model, c) -> str:
        img = tiling.read_resampled(ref_src, 0, c.y0, c.x0, c.h, c.w)
        run.out.write(ref, c, zero[..., : c.h, : c.w], img)
        return json.dumps({"a": _placement_sums(zero[..., : c.h, : c.w], img, c, t,
                                                run.out.info.dtype)})

    ran = run.chunks(copy_ref, chunks, f"z{ref}_", f"z {ref} reference")
    order = [ref] + zs
    has = {ref: _section_has_data(ref_src, t.height, t.width)}
    done_before = sum(all(run.markers.done(f"z{z}_{c.index}") for c in chunks) for z in zs)
    bar = stack.SectionProgress(len(zs), done_before, run.progress)
    for i, z in enumerate(zs, start=1):
        src = run.section(src_path, z)
        has[z] = _section_has_data(src, t.height, t.width)
        before = order[:i]
        targets = [before[j] for j in stack.predecessor_indices(
            len(before), [has[b] for b in before], predecessors,
            [run.damaged(b) or guard.is_flagged(b) for b in before])]
        if all(run.markers.done(f"z{z}_{c.index}") for c in chunks):
            if has[z] and targets:  # replay the verdict on this section
                guard.judge(z, stack.pearson(_marked_sums(run, z, chunks)), targets[0])
            continue
        previous = tiling.VolumeFieldStore(run.out.field_path, mip,
                                           targets[0] if targets else order[i - 1])
        if has[z] and targets:
            start = t.field_store(previous)
            pieces = run.pieces(src, src_path, z)
            stores = [run.pair_field(src, tiling.VolumeSource(run.out.image_path, mip, j),
                                     os.path.join(run.cache(z), f"onto{j}"),
                                     f"z {z} onto {j} ", start=start, pieces=pieces)
                      for j in targets]
            nearest = tiling.VolumeSource(run.out.image_path, mip, targets[0])
        else:  # no data here or before: the previous field carries on
            stores = [tiling.VolumeFieldStore(run.out.field_path, mip, order[i - 1])]
            nearest = None

        def final(model, c, src=src, stores=stores, z=z, nearest=nearest) -> str:
            f = stack.combine_fields([s.read(c.y0, c.x0, c.h, c.w) for s in stores])
            img = tiling.warp_chunk(src, f, c)
            run.out.write(z, c, f, img)
            payload = {"a": _placement_sums(f, img, c, t, run.out.info.dtype)}
            if nearest is not None:  # the guard's similarity sums
                target = tiling.read_resampled(nearest, 0, c.y0, c.x0, c.h, c.w)
                judged = tiling.warp_chunk(src, stack.block_mean_field(f, guard_block), c)
                sums = stack.similarity_sums(stack.as_stored(judged, run.out.info.dtype),
                                             target)
                payload["r"] = [float(v) for v in sums]
            return json.dumps(payload)

        ran += run.chunks(final, chunks, f"z{z}_", f"z {z} writing")
        shutil.rmtree(run.cache(z), ignore_errors=True)
        note = "" if has[z] else " (no data: previous field kept)"
        if has[z] and len(targets) > 1:
            note = f" (onto {', '.join(map(str, targets))}, median)"
        if has[z] and targets and before[-1] not in targets and run.damaged(before[-1]):
            note += f" (z {before[-1]} has defects: not a target)"
        if has[z] and targets:
            r = stack.pearson(_marked_sums(run, z, chunks))
            if guard.judge(z, r, targets[0]):
                note += f" (r {r:.3f} with z {targets[0]}: misaligned, not a target)"
        bar.step(z, note)
    skip = [z for z in order if not has[z] or guard.is_flagged(z)]
    if whole_stack:  # (a queued block's own drift says little about the stack's)
        _log_drift(order, _marked_placements(run, order, chunks, skip)[0], hint=not detrended)
    return ran, len(chunks) * (len(zs) + 1), skip


def _placement_sums(field, img, c: tiling.Chunk, tiler: tiling.StageTiler,
                    dtype) -> list[float]:
    """A written chunk's share of its section's placement fit (:mod:`metroem.detrend`): the
    field over the pixels where the image, as the layer of ``dtype`` stores it, has data."""
    sums = detrend.AffineSums(tiler.height, tiler.width)
    sums.add(field, stack.as_stored(img, dtype)[0, 0] != 0, c.y0, c.x0)
    return sums.to_list()


def _marked_payload(run: _Run, key: str) -> dict:
    """A chunk marker's payload: ``{"a": placement sums, "r": similarity sums}`` (a bare list
    is the similarity sums of a marker an older metroem wrote)."""
    text = run.markers.payload(key)
    if not text:
        return {}
    data = json.loads(text)
    return {"r": data} if isinstance(data, list) else data


def _marked_placements(run: _Run, order: list[int], chunks, skip) -> tuple[list, bool]:
    """Each section's placement (:class:`metroem.detrend.AffineSums`) from its chunk markers
    (``None`` for the sections in ``skip`` and those with too little data), and whether every
    marker held its share (markers written by an older metroem do not)."""
    out, complete = [], True
    for z in order:
        sums = detrend.AffineSums(run.tiler.height, run.tiler.width)
        for c in chunks:
            part = _marked_payload(run, f"z{z}_{c.index}").get("a")
            if part is None:
                complete = False
                sums = None
                break
            sums.merge(detrend.AffineSums.from_list(run.tiler.height, run.tiler.width, part))
        out.append(None if sums is None or z in skip else sums.placement())
    return out, complete


def _log_drift(order: list[int], placements: list, detrended: bool = False,
               hint: bool = True) -> dict | None:
    """Log how the aligned stack's placement moves along z (the slope of the placements'
    translation, px per section): the drift a serial aligner adds up, a result of the run
    (shown with or without the progress bar); ``hint``: name the option that takes it out."""
    pts = [(z, p[:2, 2]) for z, p in zip(order, placements, strict=True) if p is not None]
    if len(pts) < 3:
        return None
    z = np.array([q[0] for q in pts], dtype=np.float64)
    t = np.stack([q[1] for q in pts])
    slope = np.polyfit(z - z.mean(), t, 1)[0]  # (2,): x, y
    total = slope * (order[-1] - order[0])
    hint = "" if not hint or detrended or np.hypot(*slope) < 0.1 else (
        "; if the sections were placed one by one (ssTEM, ATUM), --detrend_sections 8 "
        "takes this out")
    log.info("the stack's placement moves by (%+.2f, %+.2f) px per section (%+.1f, %+.1f) "
             "px over z %d..%d%s%s", slope[0], slope[1], total[0], total[1], order[0],
             order[-1], " after detrending" if detrended else "", hint)
    return {"slope": slope.tolist(), "total": total.tolist()}


def _align_stack_detrended(run: _Run, src_path: str, ref: int, zs: list[int], predecessors: int,
                           sigma: float, chunk_xy: int) -> tuple[int, int]:
    """A serial stack into work layers, then its trend along z removed into the output
    layers (:mod:`metroem.detrend`): every section's field composed with its correction and
    rendered once from its raw pixels. Resumable at every step (chunk markers)."""
    final = run.out
    serial = {kind: "file://" + os.path.join(run.markers.folder, "serial", kind)
              for kind in ("field", "image")}
    _prepare_layer(serial["field"], final.info, chunk_xy, "float32", 2, False, True)
    _prepare_layer(serial["image"], final.info, chunk_xy, final.info.dtype, 1, False, True)
    run.out = _VolumeWriter(final.info, final.mip, final.mip, serial["field"], serial["image"])
    try:
        ran, total, skip = _align_stack(run, src_path, ref, zs, predecessors, detrended=True)
    finally:
        run.out = final
    t, mip = run.tiler, final.mip
    chunks = t.output_chunks()
    order = [ref] + zs

    def field_of(z: int):
        return tiling.VolumeFieldStore(serial["field"], mip, z)

    placements, complete = _marked_placements(run, order, chunks, skip)
    if not complete:
        raise MetroemError(f"the serial stack in {run.markers.folder} was aligned by an older "
                           "metroem (its markers lack the placements); start it over with "
                           "--overwrite")
    corrections = detrend.corrections(placements, sigma, 0, order,
                                      detrend.half_diagonal(t.height, t.width))
    bar = stack.SectionProgress(len(order), 0, run.progress)
    for z, corr in zip(order, corrections, strict=True):
        src = run.section(src_path, z)

        def write(model, c, z=z, corr=corr, src=src) -> None:
            _write_detrended(run.out, z, c, src, field_of(z).read, corr, t)

        ran += run.chunks(write, chunks, f"detrended_z{z}_", f"z {z} detrended")
        bar.step(z, " (detrended)")
    for p in serial.values():  # every section is written: the serial layers have served
        _drop_layer(p)
    _log_drift(order, [None if p is None else p @ c for p, c in
                       zip(placements, corrections, strict=True)], detrended=True)
    return ran, total + len(chunks) * len(order)


def _write_detrended(out: _VolumeWriter, z: int, c: tiling.Chunk, src, read_field,
                     correction, tiler: tiling.StageTiler) -> None:
    """One chunk of section ``z``: its field (``read_field``) composed with its detrending
    ``correction`` (:func:`metroem.detrend.corrections`), and the raw section warped by it."""
    g = detrend.correction_field(correction, c.y0, c.x0, c.h, c.w, tiler.height, tiler.width)
    f = tiling.compose_chunk(read_field, g, c)
    out.write(z, c, f, tiling.warp_chunk(src, f, c))


def _drop_layer(path: str) -> None:
    """Delete a local work layer (``file://``) that has served."""
    volumes.forget(path)
    shutil.rmtree(volumes.normalize_path(path)[len("file://"):], ignore_errors=True)


def _marked_sums(run: _Run, z: int, chunks) -> np.ndarray:
    """Section ``z``'s similarity sums, added up from its chunk markers (zeros where a marker
    holds none: a section written by an older metroem gets no verdict)."""
    total = np.zeros(6)
    for c in chunks:
        sums = _marked_payload(run, f"z{z}_{c.index}").get("r")
        if sums is not None:
            total += np.asarray(sums, dtype=np.float64)
    return total


# --- command line -------------------------------------------------------------------------------

EPILOG = """examples:
  metroem align --pyramid_path models/demo --src s.png --tgt t.png --field_out f.npy \\
      --image_out aligned.png
  metroem align --pyramid_path isbi --src_path file:///data/vol/image --z_start 1 --z_end 10 \\
      --field_path file:///data/vol/field --image_path file:///data/vol/aligned \\
      --chunk 2048 --device all          # a stack: z 0 is the fixed reference
  (add --resume to continue an interrupted run, --refine to refine each field online)
"""


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="metroem align", description=__doc__.splitlines()[0].split(": ", 1)[1], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cliargs.add_pyramid(p)
    f = p.add_argument_group("image files")
    f.add_argument("--src", help="source image (.png, .tif, .npy)")
    f.add_argument("--tgt", help="target image, same size")
    f.add_argument("--field_out", help="output field .npy, (2, H, W) float32 pixels")
    f.add_argument("--image_out", help="output aligned source (.png, .tif, .npy)")
    v = p.add_argument_group("CloudVolume")
    v.add_argument("--src_path", help="source image layer")
    v.add_argument("--z_start", type=int, help="first source section")
    v.add_argument("--z_end", type=int, help="one past the last source section")
    v.add_argument("--predecessors", type=int, default=1,
                   help="stack: align each section onto this many aligned sections before it "
                   "and take the median of the fields (default 1; 3 outvotes one bad pair)")
    v.add_argument("--block_size", type=int, default=None,
                   help="stack: align blocks of this many sections independently, then stitch "
                   "them (needed for --queue; results differ slightly from one serial run)")
    v.add_argument("--queue", default=None,
                   help="stack: only enqueue the block tasks on this python-task-queue URL "
                   "(fq:///path, sqs://name); run them with `metroem worker URL`")
    v.add_argument("--pairwise", action="store_true",
                   help="fields between raw neighbours (each section onto raw z-1) instead "
                   "of an aligned stack")
    v.add_argument("--tgt_path", help="pairs: align section z onto section z of this layer")
    v.add_argument("--tgt_z", type=int, help="pairs: align every section onto this section")
    v.add_argument("--field_path", help="output field layer")
    v.add_argument("--image_path", help="output aligned image layer")
    v.add_argument("--work_dir", help="folder for chunk markers (default: in the output layer)")
    m = p.add_argument_group("model and tiling")
    cliargs.add_checkpoint(m)
    m.add_argument("--stages", type=int, nargs="+", help="stage numbers to run (default: all)")
    m.add_argument("--mip", type=int,
                   help="MIP of the images or of the layer (default: the finest stage's; a "
                   "layer of another pixel size than the pyramid's runs at the pyramid's MIP of "
                   "its pixel size)")
    m.add_argument("--chunk", type=int, default=1024, help="chunk side in pixels (default 1024)")
    m.add_argument("--pad", type=int, default=None,
                   help="context per side in pixels of each stage's MIP (default: per stage, "
                   "from its network's reach: tiling.default_stage_pad)")
    cliargs.add_device(m, help="cpu | gpu | all | GPU ids like 0,2: chunks are spread over "
                       "the devices (default cpu)")
    m.add_argument("--smoothing_nm", type=float, default=None,
                   help="keep only the part of the field that is affine over about this length "
                   "(nm): sections' smooth distortion stays, tissue is not bent onto its "
                   "neighbour (metroem.regularize; default: the pyramid's pyramid.json, else "
                   "off; 0 = off; README has the measured trade-off)")
    m.add_argument("--smoothing_gate", default=None, metavar="LOW,HIGH|off",
                   help="with smoothing, keep the field as matched where the warped source "
                   "correlates with the target like a copy of the same section (local r >= "
                   "HIGH), smooth it where it shows other tissue (r <= LOW) (default: the "
                   f"pyramid's pyramid.json, else {_GATE}; off = smooth everywhere)")
    m.add_argument("--resolution_nm", type=float, default=None,
                   help="nm per MIP0 pixel of image files (default: the pyramid's "
                   "pyramid.json; volumes: read from the layer): sets the smoothing's pixels "
                   "and the pyramid MIP the images run at")
    start = m.add_mutually_exclusive_group()
    start.add_argument("--translation_init", action="store_const", const=True, default=None,
                       help="start each pair from one global translation found by phase "
                       "correlation (drift larger than the coarse stage's search window, or a "
                       "shading that misleads it; default: the pyramid's pyramid.json, else "
                       "off)")
    start.add_argument("--no_translation_init", dest="translation_init", action="store_const",
                       const=False, help="start each pair from no field, whatever the "
                       "pyramid's pyramid.json says")
    m.add_argument("--refine", action="store_true",
                   help="refine each field online on its pair (metroem.refine)")
    m.add_argument("--refine_steps", type=int, default=60, help="steps per level")
    m.add_argument("--refine_lr", type=float, default=0.3, help="px per step (cosine decay)")
    m.add_argument("--refine_smoothness_weight", type=float, default=3.0,
                   help="weight of the smoothness term")
    d = p.add_argument_group("defects (folds, cracks): masked pixels are no data")
    d.add_argument("--src_mask", help="files: defect mask image of --src, same size")
    d.add_argument("--tgt_mask", help="files: defect mask image of --tgt, same size")
    d.add_argument("--mask_path", help="layers: defect mask layer of --src_path")
    d.add_argument("--mask_mip", type=int, default=None,
                   help="MIP to read --mask_path at (default: the images' MIP; coarser is "
                   "repeated onto the images' pixels)")
    d.add_argument("--mask_threshold", type=float, default=0.0,
                   help="mask values above this are defects (default 0: any nonzero)")
    d.add_argument("--no_defect_split", action="store_true",
                   help="align a section its defects cut apart as one piece (default: piece "
                   "by piece, so the field may jump across a fold)")
    g = p.add_argument_group("stack checks: a section that correlates with its target far "
                             "below the stack's recent level is misaligned")
    g.add_argument("--misaligned_ratio", type=float, default=stack.MISALIGNED_RATIO,
                   help="misaligned below this fraction of the stack's recent correlation: "
                   "not a target for later sections (default %(default)s; 0 = off)")
    g.add_argument("--runaway_stop", type=int, default=stack.RUNAWAY_STOP,
                   help="stop after this many misaligned sections in a row, the stack before "
                   "them complete (default %(default)s; 0 = never)")
    g.add_argument("--detrend_sections", type=float, default=None, metavar="S",
                   help="stack: remove the trend of the aligned stack's placement along z "
                   "(Gaussian sigma, sections; e.g. 8) when the sections were placed one by "
                   "one (ssTEM, ATUM); not for block-face stacks, whose drift is real "
                   "(default: off)")
    o = p.add_argument_group("outputs")
    o.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (their info, the sections in the z range and "
                        "the run record; sections outside the range keep what they hold)")
    o.add_argument("--resume", action="store_true", help="continue an interrupted run")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = cliargs.parse_args(build_parser(), argv, announce_threads=True)
    common = dict(
        checkpoint_name=a.checkpoint_name, stages=a.stages, mip=a.mip, chunk=a.chunk,
        pad=a.pad, device=a.device, refine=a.refine,
        refine_options={"steps": a.refine_steps, "lr": a.refine_lr,
                        "smoothness_weight": a.refine_smoothness_weight} if a.refine else None,
        overwrite=a.overwrite, resume=a.resume, progress=not a.no_progress,
        smoothing_nm=a.smoothing_nm, translation_init=a.translation_init,
        smoothing_gate=regularize.checked_gate_arg(a.smoothing_gate),
        mask_threshold=a.mask_threshold, split_defects=not a.no_defect_split,
    )
    if a.src or a.tgt:
        if not (a.src and a.tgt):
            raise MetroemError("pass both --src and --tgt")
        if a.mask_path or a.mask_mip is not None:
            raise MetroemError("--mask_path and --mask_mip are for layers; image files take "
                               "--src_mask / --tgt_mask")
        out = align_files(a.pyramid_path, a.src, a.tgt, a.field_out, a.image_out,
                          resolution_nm=a.resolution_nm, src_mask=a.src_mask,
                          tgt_mask=a.tgt_mask, **common)
    elif a.src_path:
        if a.z_start is None or a.z_end is None:
            raise MetroemError("pass --z_start and --z_end with --src_path")
        if a.resolution_nm is not None:
            raise MetroemError("--resolution_nm is for image files; a layer has its own")
        if a.src_mask or a.tgt_mask:
            raise MetroemError("--src_mask and --tgt_mask are for image files; a layer takes "
                               "--mask_path")
        out = align_volume(a.pyramid_path, a.src_path, a.z_start, a.z_end, a.field_path,
                           a.image_path, tgt_path=a.tgt_path, tgt_z=a.tgt_z,
                           pairwise=a.pairwise, predecessors=a.predecessors,
                           block_size=a.block_size, queue=a.queue, mask_path=a.mask_path,
                           mask_mip=a.mask_mip, work_dir=a.work_dir,
                           misaligned_ratio=a.misaligned_ratio, runaway_stop=a.runaway_stop,
                           detrend_sections=a.detrend_sections, **common)
    else:
        raise MetroemError("pass --src/--tgt image files or --src_path with a z range")
    if out.get("enqueued") is not None:
        log.info("enqueued %d task(s) for %d block(s) on %s; run `metroem worker %s` on each "
                 "worker", out["enqueued"], out["blocks"], a.queue, a.queue)
    elif out.get("blocks"):
        log.info("done: %d section(s) aligned in %d block(s)", len(out["sections"]),
                 out["blocks"])
    else:
        log.info("done: %d chunk(s) aligned%s", out["chunks_run"],
                 " (outputs already complete)" if out.get("skipped") else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
