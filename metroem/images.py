"""Reading section image files (PNG/TIFF/JPEG/BMP): one file as a 2-D array, the same way
everywhere, and a folder of them in z order.

``metroem ingest`` and ``metroem align`` read section files through :func:`read_grey`, so they
agree on what a section is:

* grey levels are kept as stored: uint8, uint16 (16-bit PNG/TIFF) or float (float TIFF);
* a colour image is accepted only when it is grey stored as colour (R = G = B, and any alpha
  channel fully opaque); a real colour image or one with transparency is refused, because
  turning it grey would silently throw information away;
* a file that is not an image, or is truncated, is a one-line :class:`MetroemError` naming it.

:func:`section_files` lists a folder's section images in natural name order (``2`` before
``10``: what ``metroem ingest`` numbers z by); :func:`load_sections` reads them as one 8-bit
stack for the demo volume and the benchmarks (colour converted to grey, 0 raised to 1).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from metroem.errors import MetroemError

__all__ = [
    "TIFF_SUFFIXES",
    "IMAGE_SUFFIXES",
    "natural_key",
    "read_grey",
    "to_grey",
    "section_files",
    "read_sections",
    "load_sections",
]

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")  # of a sections folder


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _read_raw(path: str) -> np.ndarray:
    """The pixel array of an image file as stored (no conversion but palette expansion)."""
    if path.lower().endswith(TIFF_SUFFIXES):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "PA"):  # palette indices mean nothing as grey levels
            im = im.convert("RGBA")
        elif im.mode == "1":
            im = im.convert("L")
        im.load()
        return np.asarray(im)


def to_grey(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as one 2-D section: drops a constant alpha and identical colour channels.

    Raises MetroemError for real colour, transparency, several pages and other shapes.
    """
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # grey + alpha, RGB + alpha
        alpha = arr[..., -1]
        opaque = np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else 1.0
        if not np.all(alpha == opaque):
            raise MetroemError(
                f"{name} has transparent pixels (an alpha channel); save the section without "
                "transparency (0 = no data marks missing tissue)"
            )
        arr = arr[..., :-1]
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1])
                and np.array_equal(arr[..., 0], arr[..., 2])):
            raise MetroemError(
                f"{name} is a colour image (its R, G and B differ); sections must be greyscale: "
                "convert it to grey first (metroem does not guess how)"
            )
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise MetroemError(
            f"{name} is not one greyscale section (array shape {arr.shape}); save one section "
            "per file, as a 2-D grey image"
        )
    if arr.dtype == bool:
        raise MetroemError(f"{name} is a 1-bit (black and white) image, not an EM section")
    if np.iscomplexobj(arr) or arr.dtype.kind not in "uif":
        raise MetroemError(f"{name} has pixel type {arr.dtype}; use 8/16-bit or float images")
    return arr


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """The section in image file ``path`` as a 2-D array of its stored type (see module doc)."""
    path = str(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise MetroemError(f"image {path} does not exist; check the path")
    try:
        arr = _read_raw(path)
    except MemoryError:
        raise
    except Exception as e:  # PIL and tifffile raise many types for a bad file
        raise MetroemError(
            f"cannot read {path} as an image ({type(e).__name__}: {_first_line(e)}); it may be "
            "truncated or not an image: re-export it or move it out of the folder"
        ) from e
    return to_grey(arr, name)


def natural_key(name: str) -> tuple:
    """Sort key comparing the numbers in ``name`` as numbers: ``2.png`` before ``10.png``."""
    parts = re.split(r"(\d+)", name.casefold())
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in parts if p)


# --- a folder of sections ----------------------------------------------------------------


def section_files(sections_dir: str | os.PathLike) -> list[Path]:
    """The section images of a folder (PNG/TIF/...) in natural name order (``2`` before ``10``)."""
    folder = Path(sections_dir)
    if not folder.is_dir():
        raise MetroemError(f"sections folder {folder} does not exist; pass a folder of images")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise MetroemError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_sections(files: list[Path]) -> torch.Tensor:
    """Images ``files`` as ``(Z, 1, H, W)`` uint8, values >= 1 (all must have one size).

    Colour images are converted to grey; 0 is raised to 1 because 0 means "no data".
    """
    from PIL import Image

    arrays = []
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L"))
        if arrays and a.shape != arrays[0].shape:
            raise MetroemError(
                f"{p.name} is {a.shape[1]}x{a.shape[0]} but {files[0].name} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all sections must have one size"
            )
        arrays.append(a)
    stack = torch.from_numpy(np.stack(arrays)[:, None].copy())
    return stack.clamp_min(1)


def load_sections(sections_dir: str | os.PathLike, num_sections: int | None = None) -> torch.Tensor:
    """The first ``num_sections`` (default all) images of a folder, see :func:`read_sections`."""
    files = section_files(sections_dir)
    if num_sections is not None:
        files = files[:num_sections]
        if not files:
            raise MetroemError(f"num_sections must be >= 1 to read images from {sections_dir}")
    return read_sections(files)
