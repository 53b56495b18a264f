"""Import a folder of section images into a local precomputed CloudVolume (``metroem ingest``).

Most labs start from a stack of TIFF/PNG sections, not a CloudVolume. This writes them as
sections z = 0, 1, ... of an image layer with every MIP filled (masked box average, 0 = no data),
ready for ``download_image.py``.

* Order: z follows the number in each file name, compared as a number (``2.png`` before
  ``10.png``; the last run of digits counts). A name without a number, two files with the same
  number, or a folder mixing image types (``.png`` and ``.tif``) is refused: the order would be
  a guess. The first and last name -> z mappings are printed.
* Grey levels: kept by default (``--dtype auto``): 8-bit sections make a uint8 layer, 16-bit ones
  uint16, float ones float32. ``--dtype uint8`` rescales to 1..255 from the data's own percentile
  range (``--percentiles``). 0 means "no data", so integer values of 0 become 1.
* Colour: only grey stored as colour (R = G = B) is accepted, as by ``metroem align``.

``exclude`` drops sections by their index in that order (e.g. sections held out for evaluation),
and the rest are renumbered consecutively. The layer is written under a temporary name and
renamed into place, so a crash leaves nothing that looks like a finished volume.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metroem import cliargs, volumes
from metroem.atomic import replace_dir, temp_name
from metroem.errors import MetroemError, cli_errors
from metroem.images import read_grey, section_files

MANIFEST = "ingest.json"
DTYPES = ("auto", "uint8", "uint16", "float32")
# Suffixes that are one kind of file: a folder must hold one kind only.
KINDS = {".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG",
         ".bmp": "BMP"}
DEFAULT_PERCENTILES = (0.5, 99.5)
_SAMPLE = 4_000_000  # pixels sampled for the percentile range


def section_number(name: str) -> int | None:
    """The section number in a file name: its last run of digits (None when there is none)."""
    found = re.findall(r"\d+", Path(name).stem)
    return int(found[-1]) if found else None


def order_sections(sections_dir: str) -> list[Path]:
    """The section files of a folder in z order (by the number in each name), checked.

    Refuses a folder mixing image types, a name without a number and two names with one
    number: each would make the z order a guess.
    """
    paths = section_files(sections_dir)
    kinds: dict[str, str] = {}
    for p in paths:
        kinds.setdefault(KINDS.get(p.suffix.lower(), p.suffix.lower()), p.name)
    if len(kinds) > 1:
        shown = ", ".join(f"{k} ({n})" for k, n in kinds.items())
        raise MetroemError(
            f"{sections_dir} mixes image types: {shown}; keep one kind of section image in the "
            "folder (move the others out)"
        )
    seen: dict[int, str] = {}
    for p in paths:
        n = section_number(p.name)
        if n is None:
            raise MetroemError(
                f"{p.name} in {sections_dir} has no number in its name, so its z is unknown; "
                "name every section with its number (e.g. section_012.png) or move it out"
            )
        if n in seen:
            raise MetroemError(
                f"{seen[n]} and {p.name} both carry section number {n}; the z order is "
                "ambiguous: rename or move one of them"
            )
        seen[n] = p.name
    return sorted(paths, key=lambda p: section_number(p.name))


def read_stack(paths: Sequence[Path]) -> np.ndarray:
    """The sections ``(Z, H, W)`` in their stored type; all must share one size and type."""
    arrays: list[np.ndarray] = []
    for p in paths:
        a = read_grey(p)
        if arrays and a.shape != arrays[0].shape:
            raise MetroemError(
                f"{p.name} is {a.shape[1]}x{a.shape[0]} but {paths[0].name} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all sections must have one size"
            )
        if arrays and a.dtype != arrays[0].dtype:
            raise MetroemError(
                f"{p.name} has {a.dtype} pixels but {paths[0].name} has {arrays[0].dtype}; "
                "export every section with one bit depth"
            )
        arrays.append(a)
    return np.stack(arrays)


def _natural_dtype(dtype: np.dtype) -> str:
    if dtype == np.uint8:
        return "uint8"
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        return "uint16"
    return "float32"


def _percentile_range(stack: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    flat = stack.reshape(-1)
    step = max(1, flat.size // _SAMPLE)
    sample = flat[::step].astype(np.float64)
    sample = sample[np.isfinite(sample) & (sample != 0)]  # 0 = no data
    if sample.size == 0:
        raise MetroemError("every pixel of the sections is 0 (no data); nothing to ingest")
    lo, hi = (float(v) for v in np.percentile(sample, list(percentiles)))
    return lo, hi


def convert_levels(stack: np.ndarray, dtype: str = "auto",
                   percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> tuple[np.ndarray, str]:
    """``(stack as the layer's dtype, one line saying what happened to the grey levels)``.

    ``auto`` keeps the stored type (uint8, uint16 or float32). Going to a narrower integer type
    rescales linearly from the data's ``percentiles`` range to 1..max (clipped); anything else
    is exact. 0 stays "no data": integer sections have their 0 raised to 1.
    """
    if dtype not in DTYPES:
        raise MetroemError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    lo_p, hi_p = (float(v) for v in percentiles)
    if not 0 <= lo_p < hi_p <= 100:
        raise MetroemError(f"--percentiles {lo_p:g} {hi_p:g}: need 0 <= LOW < HIGH <= 100")
    if stack.dtype.kind == "f" and not np.isfinite(stack).all():
        raise MetroemError("the sections contain NaN or inf pixels; fix or mask them (0 = no "
                           "data) and run again")
    source = _natural_dtype(stack.dtype)
    target = source if dtype == "auto" else dtype
    vmin, vmax = stack.min(), stack.max()
    exact = target == "float32" or target == source or (source, target) == ("uint8", "uint16")
    if exact and target != "float32" and (vmin < 0 or vmax > np.iinfo(target).max):
        exact = False  # e.g. int16 with negative values: rescale
    if exact:
        out = stack.astype(target)
        note = f"grey levels kept: {target} layer ({stack.dtype} sections, values {vmin}..{vmax})"
    else:
        lo, hi = _percentile_range(stack, (lo_p, hi_p))
        top = np.iinfo(target).max
        scaled = (stack.astype(np.float64) - lo) / max(hi - lo, 1e-12) * (top - 1) + 1
        out = np.clip(np.rint(scaled), 1, top).astype(target)
        note = (f"grey levels rescaled: {stack.dtype} sections -> {target} layer, "
                f"{lo_p:g}-{hi_p:g} percentile range [{lo:g}, {hi:g}] -> [1, {top}] "
                "(--dtype auto keeps them)")
    if out.dtype.kind in "ui":
        out = np.maximum(out, 1)  # a black pixel is data: 0 would mean "no data"
    return out, note


def parse_index_list(text: str | None) -> list[int]:
    """``"0,1,14-15"`` -> ``[0, 1, 14, 15]`` (a clear error for anything else)."""
    if not text:
        return []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise MetroemError(
                f"bad section list {text!r}; use comma-separated indices or ranges, e.g. 0,1,14-15"
            ) from None
    return sorted(set(out))


def ingest_images(
    sections_dir: str,
    out_path: str,
    num_mips: int = 4,
    resolution: Sequence[float] = (4.0, 4.0, 40.0),
    exclude: Sequence[int] = (),
    chunk_xy: int = 256,
    overwrite: bool = False,
    dtype: str = "auto",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict:
    """Write the images of ``sections_dir`` as a layer at ``out_path``; returns its manifest.

    Sections are ordered by :func:`order_sections` and their grey levels converted by
    :func:`convert_levels` (``dtype``, ``percentiles``). The image size is cropped (centred)
    down to a multiple of ``2 ** (num_mips - 1)`` so every MIP has whole pixels. The manifest
    (also written as ``ingest.json`` in the layer) maps each z to the file it came from and
    says what happened to the grey levels (``levels``).
    """
    if num_mips < 1:
        raise MetroemError(f"--num_mips must be >= 1, got {num_mips}")
    if "://" in out_path and not out_path.startswith("file://"):
        raise MetroemError(f"ingest writes local volumes only; got {out_path!r} (use a folder)")
    out = Path(out_path.removeprefix("file://"))
    out = out.expanduser().resolve()
    if (out / "info").exists() and not overwrite:
        raise MetroemError(f"a volume already exists at {out}; pass --overwrite to replace it")
    paths = order_sections(sections_dir)
    files = [p.name for p in paths]
    bad = [i for i in exclude if not 0 <= i < len(files)]
    if bad:
        raise MetroemError(f"--exclude {bad[0]} is not a section index (0..{len(files) - 1})")
    keep = [i for i in range(len(files)) if i not in set(exclude)]
    if not keep:
        raise MetroemError("--exclude removes every section; nothing to ingest")
    raw = read_stack([paths[i] for i in keep])  # only the kept sections are decoded
    stack, levels = convert_levels(raw, dtype, percentiles)
    del raw
    k = 2 ** (num_mips - 1)
    h, w = stack.shape[-2:]
    hh, ww = h // k * k, w // k * k
    if hh == 0 or ww == 0:
        raise MetroemError(f"images of {w}x{h} px are too small for {num_mips} MIPs")
    y0, x0 = (h - hh) // 2, (w - ww) // 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_name(str(out)))
    manifest = {
        "format": "metroem-ingest/1",
        "source": str(Path(sections_dir).resolve()),
        "size": [ww, hh],
        "crop_origin": [x0, y0],
        "num_mips": num_mips,
        "dtype": str(stack.dtype),
        "levels": levels,
        "sections": {z: files[i] for z, i in enumerate(keep)},
        "excluded": {i: files[i] for i in sorted(set(exclude))},
    }
    try:
        path = volumes.normalize_path(str(tmp))
        volumes.create_volume(path, (ww, hh, len(keep)), num_mips, dtype=str(stack.dtype),
                              resolution=resolution, chunk_xy=chunk_xy)
        for z in range(len(keep)):
            section = stack[z, y0 : y0 + hh, x0 : x0 + ww]
            data = torch.from_numpy(section.copy() if section.dtype == np.uint8
                                    else section.astype(np.float32))  # torch lacks uint16 ops
            volumes.write_all_mips(path, 0, 0, z, data[None, None])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        volumes.forget(volumes.normalize_path(str(tmp)))
        volumes.forget(volumes.normalize_path(str(out)))
    return manifest


def mapping_lines(sections: dict, show: int = 3) -> list[str]:
    """``z <- file`` lines for the first and last ``show`` sections (``...`` between)."""
    items = sorted((int(z), name) for z, name in sections.items())
    if len(items) > 2 * show + 1:
        items = [*items[:show], None, *items[-show:]]
    return ["  ..." if it is None else f"  z {it[0]:>4} <- {it[1]}" for it in items]


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(prog="metroem ingest", description=__doc__.splitlines()[0])
    p.add_argument("sections_dir",
                   help="folder of section images (PNG/TIFF/JPEG; z order = the number in "
                   "each name, compared as a number)")
    p.add_argument("out", help="folder of the new local precomputed layer")
    p.add_argument("--num_mips", type=int, default=4, help="MIPs 0..N-1 to write (default 4)")
    p.add_argument("--resolution", type=float, nargs=3, default=(4.0, 4.0, 40.0),
                   metavar=("X", "Y", "Z"), help="MIP0 voxel size in nm (default 4 4 40)")
    p.add_argument("--exclude", default="",
                   help="section indices to leave out, e.g. 0,1,14-15 (held-out sections)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="layer type: auto (default) keeps the sections' grey levels (uint8, "
                   "uint16 or float32); a narrower type rescales from --percentiles")
    p.add_argument("--percentiles", type=float, nargs=2, default=DEFAULT_PERCENTILES,
                   metavar=("LOW", "HIGH"),
                   help="percentile range mapped to 1..max when rescaling (default 0.5 99.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing volume")
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = cliargs.parse_args(build_parser(), argv)
    m = ingest_images(a.sections_dir, a.out, a.num_mips, a.resolution,
                      parse_index_list(a.exclude), overwrite=a.overwrite, dtype=a.dtype,
                      percentiles=a.percentiles)
    w, h = m["size"]
    # the command's output on stdout: what was written where, in which z order
    print("z order (by the number in each name):")
    print("\n".join(mapping_lines(m["sections"])))
    print(m["levels"])
    print(f"wrote {len(m['sections'])} sections of {w}x{h} px ({m['dtype']}), MIPs "
          f"0..{a.num_mips - 1}, to file://{Path(a.out).expanduser().resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
