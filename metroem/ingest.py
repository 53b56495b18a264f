"""Import a folder of section images into a local precomputed CloudVolume (``metroem ingest``).

Most labs start from a stack of TIFF/PNG sections, not a CloudVolume. This writes them, in name
order, as sections z = 0, 1, ... of an image layer with every MIP filled (masked box average,
0 = no data), ready for ``download_image.py``. ``exclude`` drops sections by their index in the
folder (e.g. sections held out for evaluation), and the rest are renumbered consecutively.

The layer is written under a temporary name and renamed into place, so a crash leaves nothing
that looks like a finished volume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from metroem import volumes
from metroem.atomic import replace_dir, temp_name
from metroem.demo import read_sections, section_files
from metroem.errors import MetroemError, cli_errors

MANIFEST = "ingest.json"


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
) -> dict:
    """Write the images of ``sections_dir`` as a uint8 layer at ``out_path``; returns its manifest.

    The image size is cropped (centred) down to a multiple of ``2 ** (num_mips - 1)`` so every
    MIP has whole pixels. The manifest (also written as ``ingest.json`` in the layer) maps each
    z to the file it came from.
    """
    if num_mips < 1:
        raise MetroemError(f"--num_mips must be >= 1, got {num_mips}")
    if "://" in out_path and not out_path.startswith("file://"):
        raise MetroemError(f"ingest writes local volumes only; got {out_path!r} (use a folder)")
    out = Path(out_path.removeprefix("file://"))
    out = out.expanduser().resolve()
    if (out / "info").exists() and not overwrite:
        raise MetroemError(f"a volume already exists at {out}; pass --overwrite to replace it")
    paths = section_files(sections_dir)
    files = [p.name for p in paths]
    bad = [i for i in exclude if not 0 <= i < len(files)]
    if bad:
        raise MetroemError(f"--exclude {bad[0]} is not a section index (0..{len(files) - 1})")
    keep = [i for i in range(len(files)) if i not in set(exclude)]
    if not keep:
        raise MetroemError("--exclude removes every section; nothing to ingest")
    stack = read_sections([paths[i] for i in keep])  # only the kept sections are decoded
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
        "sections": {z: files[i] for z, i in enumerate(keep)},
        "excluded": {i: files[i] for i in sorted(set(exclude))},
    }
    try:
        path = volumes.normalize_path(str(tmp))
        volumes.create_volume(path, (ww, hh, len(keep)), num_mips, resolution=resolution,
                              chunk_xy=chunk_xy)
        for z in range(len(keep)):
            volumes.write_all_mips(path, 0, 0, z, stack[z : z + 1, :, y0 : y0 + hh, x0 : x0 + ww])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        volumes.forget(volumes.normalize_path(str(tmp)))
        volumes.forget(volumes.normalize_path(str(out)))
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metroem ingest", description=__doc__.splitlines()[0])
    p.add_argument("sections_dir", help="folder of section images (PNG/TIFF/JPEG, name order)")
    p.add_argument("out", help="folder of the new local precomputed layer")
    p.add_argument("--num_mips", type=int, default=4, help="MIPs 0..N-1 to write (default 4)")
    p.add_argument("--resolution", type=float, nargs=3, default=(4.0, 4.0, 40.0),
                   metavar=("X", "Y", "Z"), help="MIP0 voxel size in nm (default 4 4 40)")
    p.add_argument("--exclude", default="",
                   help="section indices to leave out, e.g. 0,1,14-15 (held-out sections)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing volume")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    m = ingest_images(a.sections_dir, a.out, a.num_mips, a.resolution,
                      parse_index_list(a.exclude), overwrite=a.overwrite)
    w, h = m["size"]
    print(f"wrote {len(m['sections'])} sections of {w}x{h} px, MIPs 0..{a.num_mips - 1}, "
          f"to file://{Path(a.out).expanduser().resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
