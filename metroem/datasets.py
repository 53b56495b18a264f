"""The h5 training-data schema (image pairs and fields) and the PyTorch reader over it.

This module is the only place that knows the file layout. Schema version 1:

Image pair file ``x{X}_y{Y}_z{Z}_MIP{m}[_{suffix}].h5``
    ``X, Y``: patch centre in MIP0 pixels; ``Z``: first source section; ``m``: MIP (any digits).
    * dataset ``img`` ``(N, 2, S, S)``, uint8 or float32 (attribute ``dtype``): ``[:, 0]`` is
      the source (section ``z``), ``[:, 1]`` the target (section ``z - 1``); layout
      ``(N, 2, H=y, W=x)``, attribute ``axis_order = "zyx"``. Raw values (``normalisation =
      "none"``), 0 means no data.
    * dataset ``translation`` ``(N, 2)`` int64: how far the source window of each pair was moved,
      (x, y) in MIP0 pixels (zeros unless cut with a field dataset, see docs/datasets.md).
    * attributes: ``kind="image"``, ``mip``, ``x_offset``, ``y_offset`` (MIP0 centre), ``z`` (source
      z of each pair), ``patch_size``, ``resolution`` (nm/voxel at ``mip``), ``source`` (volume),
      ``dtype``, ``normalisation``, ``axis_order``, ``field_dset`` (file whose translations were
      applied, or ""), ``defects``, ``defect_threshold``, ``metroem_version``, ``schema_version``.

Field file ``field_{stage}_x{X}_y{Y}_z{Z}_MIP{m}_{tag}.h5``
    * dataset ``field`` ``(N, 2, S, S)`` float32: pixels at MIP ``m``, metroem's convention
      (channel 0 = x = last axis, pull warping, see :mod:`metroem.fields`), with each pair's
      ``translation`` removed.
    * dataset ``translation`` ``(N, 2)`` int64: the removed translation, (x, y) in MIP0 pixels.
    * attributes: ``kind="field"``, ``mip``, ``x_offset``, ``y_offset``, ``z``, ``patch_size``,
      ``stage``, ``tag``, ``source``, ``src_mip``, ``field_units``, ``axis_order``,
      ``metroem_version``, ``schema_version``.

Both are chunked one pair per chunk, gzip (lossless) with a Fletcher-32 checksum, so corrupt
bytes are detected on read. Files written by upstream MetroEM (dataset ``img`` or ``main``, no
``axis_order`` attribute, arrays stored untransposed as (x, y)) are read as ``axis_order="xy"``
and transposed on the fly.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from metroem.atomic import FileLock, WriteGuard, atomic_path, remove_stale_temps
from metroem.errors import MetroemError

__all__ = [
    "SCHEMA_VERSION",
    "ImageName",
    "FieldName",
    "image_filename",
    "field_filename",
    "parse_image_filename",
    "parse_field_filename",
    "H5Data",
    "DatasetWriter",
    "open_writer",
    "write_image_dataset",
    "write_field_dataset",
    "read_image_dataset",
    "read_field_dataset",
    "check_output_free",
    "DatasetSummary",
    "list_datasets",
    "PairDataset",
]

SCHEMA_VERSION = 1
IMAGE_KEYS = ("img", "main")  # ours first; "main" is an older upstream name
FIELD_KEY = "field"
RECUT_IMAGE = "re-cut it with metroem-download-image"
RECUT_FIELD = "re-cut it with metroem-download-field"

_IMAGE_RE = re.compile(r"^x(-?\d+)_y(-?\d+)_z(-?\d+)_MIP(\d+)(?:_(.+))?\.h5$")
_FIELD_RE = re.compile(r"^field_(\d+)_x(-?\d+)_y(-?\d+)_z(-?\d+)_MIP(\d+)_(.+)\.h5$")


# ----------------------------------------------------------------------------- file names


@dataclass(frozen=True)
class ImageName:
    x: int
    y: int
    z: int
    mip: int
    suffix: str | None = None


@dataclass(frozen=True)
class FieldName:
    stage: int
    x: int
    y: int
    z: int
    mip: int
    tag: str


def _check_tag(tag: str, what: str) -> str:
    if not tag or "/" in tag or os.sep in tag or tag != tag.strip():
        raise MetroemError(f"{what} {tag!r} cannot be part of a file name; use letters/digits/_-")
    return tag


def image_filename(x: int, y: int, z: int, mip: int, suffix: str | None = None) -> str:
    """``x{X}_y{Y}_z{Z}_MIP{m}[_{suffix}].h5`` (X, Y: MIP0 centre; Z: first source z)."""
    tail = "" if suffix is None else "_" + _check_tag(suffix, "suffix")
    return f"x{int(x)}_y{int(y)}_z{int(z)}_MIP{int(mip)}{tail}.h5"


def field_filename(stage: int, x: int, y: int, z: int, mip: int, tag: str) -> str:
    """``field_{stage}_x{X}_y{Y}_z{Z}_MIP{m}_{tag}.h5``."""
    tag = _check_tag(tag, "tag")
    return f"field_{int(stage)}_x{int(x)}_y{int(y)}_z{int(z)}_MIP{int(mip)}_{tag}.h5"


def parse_image_filename(name: str) -> ImageName | None:
    """Parse an image pair file name (basename or path); None if it is not one."""
    m = _IMAGE_RE.match(os.path.basename(name))
    if m is None:
        return None
    x, y, z, mip, suffix = m.groups()
    return ImageName(int(x), int(y), int(z), int(mip), suffix)


def parse_field_filename(name: str) -> FieldName | None:
    """Parse a field file name (basename or path); None if it is not one."""
    m = _FIELD_RE.match(os.path.basename(name))
    if m is None:
        return None
    stage, x, y, z, mip, tag = m.groups()
    return FieldName(int(stage), int(x), int(y), int(z), int(mip), tag)


# ----------------------------------------------------------------------------- writing


def check_output_free(path: str, overwrite: bool) -> None:
    """Raise unless ``path`` may be written (absent, or ``overwrite``)."""
    if os.path.exists(path) and not overwrite:
        raise MetroemError(f"{path} already exists; pass --overwrite to replace it")


def _h5py():
    import h5py

    return h5py


class DatasetWriter:
    """Fills a dataset being written by :func:`open_writer`, one pair at a time."""

    def __init__(self, data, translation, path: str, guard: WriteGuard | None = None):
        self._data = data
        self._translation = translation
        self._guard = guard
        self.path = path
        self.n = data.shape[0]
        self._written = np.zeros(self.n, dtype=bool)

    def put(self, i: int, item: np.ndarray, translation: Sequence[int] = (0, 0)) -> None:
        """Store pair ``i``: ``item`` ``(2, S, S)`` (layout (c, y, x)) and its translation."""
        item = np.asarray(item)
        if item.shape != self._data.shape[1:]:
            raise MetroemError(
                f"pair {i} has shape {item.shape}, {self.path} expects {self._data.shape[1:]}"
            )
        if np.issubdtype(item.dtype, np.floating) and not np.isfinite(item).all():
            raise MetroemError(f"pair {i} for {self.path} contains NaN or inf; fix the source data")
        self._data[i] = item.astype(self._data.dtype, copy=False)
        self._translation[i] = np.asarray(translation, dtype=np.int64)
        self._written[i] = True
        if self._guard is not None:
            self._guard.check()  # a full disk stops the cut now, not after the last pair

    def missing(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self._written)]


def _base_attrs(kind: str, attrs: dict, n: int, size: int, dtype) -> dict:
    from metroem import __version__

    required = ("mip", "x_offset", "y_offset", "z")
    absent = [k for k in required if k not in attrs]
    if absent:
        raise ValueError(f"{kind} dataset attributes missing {absent}")
    if len(attrs["z"]) != n:
        raise ValueError(f"attribute z has {len(attrs['z'])} entries for {n} pairs")
    out = {
        "kind": kind,
        "axis_order": "zyx",
        "patch_size": size,
        "dtype": np.dtype(dtype).name,
        "source": "",
        "metroem_version": __version__,
        "schema_version": SCHEMA_VERSION,
    }
    if kind == "image":
        out.update(normalisation="none", field_dset="", defects="", defect_threshold=0.0)
    out.update(attrs)
    out["z"] = np.asarray(attrs["z"], dtype=np.int64)
    return out


@contextlib.contextmanager
def open_writer(
    path: str,
    kind: str,
    n: int,
    size: int,
    attrs: dict,
    dtype=np.float32,
    overwrite: bool = False,
) -> Iterator[DatasetWriter]:
    """Create an image (``kind="image"``) or field dataset file atomically and yield its writer.

    The file appears under ``path`` only if the block finishes and every pair was ``put``;
    otherwise nothing is left behind. A lock file beside ``path`` stops a second writer.
    """
    if kind not in ("image", "field"):
        raise ValueError(f"kind must be 'image' or 'field', got {kind!r}")
    dtype = np.dtype(dtype)
    if kind == "field" and dtype != np.float32:
        raise ValueError("fields are stored as float32")
    if dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError(f"dataset dtype must be float32 or uint8, got {dtype}")
    path = os.path.abspath(os.path.expanduser(path))
    full_attrs = _base_attrs(kind, attrs, n, size, dtype)
    check_output_free(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h5py = _h5py()
    with FileLock(path), atomic_path(path) as tmp:
        check_output_free(path, overwrite)  # again, now that we hold the lock
        remove_stale_temps(path)  # left by a writer that was killed (we hold its lock now)
        # HDF5 writes through a WriteGuard: a full disk never fails a write inside HDF5 (it
        # cannot recover from that); the error is raised here instead and the file removed.
        # libver v110: object headers (attributes included) carry checksums as well as data.
        with WriteGuard(tmp) as out, h5py.File(out, "w", libver=("v110", "latest")) as f:
            data = f.create_dataset(
                "img" if kind == "image" else FIELD_KEY,
                shape=(n, 2, size, size),
                dtype=dtype,
                chunks=(1, 2, size, size),
                compression="gzip",
                compression_opts=4,
                shuffle=True,
                fletcher32=True,
            )
            translation = f.create_dataset(
                "translation", data=np.zeros((n, 2), dtype=np.int64), chunks=(n, 2),
                fletcher32=True,
            )
            for key, value in full_attrs.items():
                f.attrs[key] = value
            writer = DatasetWriter(data, translation, path, out)
            yield writer
            if writer.missing():
                raise RuntimeError(f"{path}: pairs {writer.missing()} were never written")


def _write_all(path, kind, array, attrs, translation, overwrite) -> str:
    array = np.asarray(array)
    if array.ndim != 4 or array.shape[1] != 2 or array.shape[2] != array.shape[3]:
        raise MetroemError(f"{kind} data must have shape (N, 2, S, S), got {array.shape}")
    n, size = array.shape[0], array.shape[2]
    translation = np.zeros((n, 2), np.int64) if translation is None else np.asarray(translation)
    if translation.shape != (n, 2):
        raise MetroemError(f"translation must have shape ({n}, 2), got {translation.shape}")
    dtype = np.uint8 if array.dtype == np.uint8 else np.float32
    with open_writer(path, kind, n, size, attrs, dtype=dtype, overwrite=overwrite) as w:
        for i in range(n):
            w.put(i, array[i], translation[i])
    return os.path.abspath(os.path.expanduser(path))


def write_image_dataset(
    path: str,
    pairs: np.ndarray,
    attrs: dict,
    overwrite: bool = False,
    translation: np.ndarray | None = None,
) -> str:
    """Write image pairs ``(N, 2, S, S)`` (uint8 kept, anything else stored float32).

    ``attrs`` needs ``mip``, ``x_offset``, ``y_offset``, ``z``; other schema attributes get
    defaults. ``translation`` ``(N, 2)`` MIP0 px, zeros if omitted. Returns the path.
    """
    return _write_all(path, "image", pairs, attrs, translation, overwrite)


def write_field_dataset(
    path: str,
    field_data: np.ndarray,
    translation: np.ndarray,
    attrs: dict,
    overwrite: bool = False,
) -> str:
    """Write fields ``(N, 2, S, S)`` float32 (pixels at ``attrs["mip"]``) and their removed
    translations ``(N, 2)`` in MIP0 px. Returns the path."""
    data = np.asarray(field_data, np.float32)
    return _write_all(path, "field", data, attrs, translation, overwrite)


# ----------------------------------------------------------------------------- reading


@dataclass
class H5Data:
    """A dataset file read into memory. ``data`` is ``(N, 2, S, S)`` in (y, x) layout, or None
    when read with ``load_data=False`` (``shape`` is always set)."""

    path: str
    data: np.ndarray | None
    translation: np.ndarray  # (N, 2) int64, (x, y) MIP0 px
    attrs: dict = field(default_factory=dict)
    shape: tuple[int, int, int, int] = (0, 2, 0, 0)

    @property
    def z(self) -> list[int]:
        return [int(v) for v in self.attrs["z"]]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _open(path: str, recut: str):
    """Open an h5 file for reading or raise a MetroemError naming it."""
    if os.path.isdir(path):
        raise MetroemError(f"{path} is a folder, not an h5 file; move it out of the dataset folder")
    if not os.path.isfile(path):
        raise MetroemError(f"dataset file {path} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise MetroemError(f"{path} cannot be read (permission denied); fix its permissions")
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise MetroemError(
            f"{path} is not a readable h5 file (truncated or corrupt: {_one_line(e)}); "
            f"delete it and {recut}"
        ) from e


@dataclass(frozen=True)
class _Layout:
    key: str  # dataset name
    axis_order: str  # "zyx" (ours) or "xy" (upstream, transposed on read)
    n: int
    size: int


def _layout(f, path: str, kind: str) -> _Layout:
    h5py = _h5py()
    recut = RECUT_IMAGE if kind == "image" else RECUT_FIELD
    keys = IMAGE_KEYS if kind == "image" else (FIELD_KEY,)
    key = next((k for k in keys if isinstance(f.get(k), h5py.Dataset)), None)
    if key is None:
        found = sorted(f.keys())
        raise MetroemError(
            f"{path} is not a metroem {kind} dataset (no {' or '.join(keys)} dataset, found "
            f"{found}); {recut}"
        )
    ds = f[key]
    shape = ds.shape
    if len(shape) != 4 or shape[1] != 2 or shape[2] != shape[3] or shape[0] < 1:
        raise MetroemError(
            f"{path}: dataset {key!r} has shape {shape}, expected (N, 2, S, S) with N >= 1; {recut}"
        )
    if not (np.issubdtype(ds.dtype, np.number) and not np.issubdtype(ds.dtype, np.complexfloating)):
        raise MetroemError(f"{path}: dataset {key!r} has dtype {ds.dtype}; {recut}")
    order = f.attrs.get("axis_order")
    order = "xy" if order is None else (order.decode() if isinstance(order, bytes) else str(order))
    if order not in ("zyx", "xy"):
        raise MetroemError(f"{path}: unknown axis_order {order!r}; {recut}")
    if kind == "field" and order != "zyx":
        raise MetroemError(f"{path} is not a metroem field dataset (no axis_order); {recut}")
    return _Layout(key, order, int(shape[0]), int(shape[2]))


def _to_zyx(arr: np.ndarray, layout: _Layout) -> np.ndarray:
    """Stored layout -> ours. Upstream image files are (x, y): swap the last two axes."""
    if layout.axis_order == "xy":
        return np.ascontiguousarray(np.swapaxes(arr, -1, -2))
    return arr


def _read_array(ds, sel, path: str, recut: str) -> np.ndarray:
    try:
        arr = ds[sel]
    except OSError as e:  # failed checksum / inflate / short read
        raise MetroemError(
            f"{path} is corrupt (reading failed: {_one_line(e)}); delete it and {recut}"
        ) from e
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise MetroemError(f"{path} contains NaN or inf values; delete it and {recut}")
    return arr


def _attrs_of(f, path: str, layout: _Layout, kind: str) -> dict:
    attrs = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        attrs[k] = v
    if layout.axis_order == "xy":  # upstream: fill from the file name
        name = parse_image_filename(path)
        attrs.setdefault("kind", kind)
        attrs.setdefault("axis_order", "xy")
        attrs.setdefault("normalisation", "unknown")
        if name is not None:
            attrs.setdefault("mip", name.mip)
            attrs.setdefault("x_offset", name.x)
            attrs.setdefault("y_offset", name.y)
            attrs.setdefault("z", np.arange(name.z, name.z + layout.n))
    if "z" in attrs:
        z = np.asarray(attrs["z"], dtype=np.int64).reshape(-1)
        if len(z) != layout.n:
            raise MetroemError(
                f"{path}: attribute z lists {len(z)} sections for {layout.n} pairs; "
                f"{RECUT_IMAGE if kind == 'image' else RECUT_FIELD}"
            )
        attrs["z"] = z
    return attrs


def _translation_of(f, path: str, layout: _Layout, recut: str) -> np.ndarray:
    if "translation" not in f:
        if layout.axis_order == "xy":
            return np.zeros((layout.n, 2), np.int64)
        raise MetroemError(f"{path} has no translation dataset; {recut}")
    t = _read_array(f["translation"], (), path, recut)
    if t.shape != (layout.n, 2):
        raise MetroemError(
            f"{path}: translation has shape {t.shape}, expected ({layout.n}, 2); {recut}"
        )
    return t.astype(np.int64)


def _read(path: str, kind: str, load_data: bool) -> H5Data:
    path = os.path.abspath(os.path.expanduser(path))
    recut = RECUT_IMAGE if kind == "image" else RECUT_FIELD
    with _open(path, recut) as f:
        try:
            layout = _layout(f, path, kind)
            data = None
            if load_data:
                data = _to_zyx(_read_array(f[layout.key], (), path, recut), layout)
            translation = _translation_of(f, path, layout, recut)
            attrs = _attrs_of(f, path, layout, kind)
        except (OSError, KeyError, RuntimeError, TypeError, ValueError) as e:
            raise MetroemError(f"{path} is corrupt ({_one_line(e)}); delete it and {recut}") from e
    shape = (layout.n, 2, layout.size, layout.size)
    return H5Data(path=path, data=data, translation=translation, attrs=attrs, shape=shape)


def read_image_dataset(path: str, load_data: bool = True) -> H5Data:
    """Read and validate an image pair file (ours or upstream). ``data`` keeps its dtype.

    ``load_data=False`` reads only attributes and translations (cheap, for checks).
    """
    return _read(path, "image", load_data)


def read_field_dataset(path: str, load_data: bool = True) -> H5Data:
    """Read and validate a field file; ``data`` is float32 pixels at ``attrs["mip"]``."""
    out = _read(path, "field", load_data)
    for key in ("mip", "x_offset", "y_offset", "z"):
        if key not in out.attrs:
            raise MetroemError(f"{out.path}: attribute {key!r} is missing; {RECUT_FIELD}")
    if out.data is not None:
        out.data = out.data.astype(np.float32, copy=False)
    return out


# ----------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class DatasetSummary:
    """One dataset file of a folder, as :func:`list_datasets` reports it."""

    path: str
    kind: str  # "image" or "field"
    mip: int
    x: int
    y: int
    z_start: int
    n: int
    size: int
    dtype: str
    suffix: str | None = None  # image files
    stage: int | None = None  # field files
    tag: str | None = None  # field files


def _files(folder: str) -> list[str]:
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise MetroemError(f"dataset folder {folder} does not exist; check the path")
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if not n.startswith(".")]


def _probe(path: str, kind: str) -> tuple[_Layout, dict, np.ndarray, str]:
    """Open a file, validate its layout, read attrs + translation; close it again."""
    recut = RECUT_IMAGE if kind == "image" else RECUT_FIELD
    with _open(path, recut) as f:
        try:
            layout = _layout(f, path, kind)
            attrs = _attrs_of(f, path, layout, kind)
            translation = _translation_of(f, path, layout, recut)
            dtype = str(f[layout.key].dtype)
        except (OSError, KeyError, RuntimeError, TypeError, ValueError) as e:
            raise MetroemError(f"{path} is corrupt ({_one_line(e)}); delete it and {recut}") from e
    return layout, attrs, translation, dtype


def list_datasets(folder: str) -> list[DatasetSummary]:
    """Summarise every image and field dataset file in ``folder`` (sorted by file name).

    Files whose names follow neither pattern are ignored; a file with a dataset name that cannot
    be read raises :class:`MetroemError`.
    """
    out = []
    for path in _files(folder):
        img, fld = parse_image_filename(path), parse_field_filename(path)
        if img is None and fld is None:
            continue
        kind = "image" if img is not None else "field"
        layout, _, _, dtype = _probe(path, kind)
        name = img if img is not None else fld
        out.append(
            DatasetSummary(
                path=path, kind=kind, mip=name.mip, x=name.x, y=name.y, z_start=name.z,
                n=layout.n, size=layout.size, dtype=dtype,
                suffix=img.suffix if img is not None else None,
                stage=fld.stage if fld is not None else None,
                tag=fld.tag if fld is not None else None,
            )
        )
    return out


@dataclass
class _Entry:
    path: str
    layout: _Layout
    z: np.ndarray
    field_path: str | None = None
    field_layout: _Layout | None = None
    translation: np.ndarray | None = None


def _match_field(
    img_path: str, name: ImageName, fields_by_key: dict, stage: int, tag: str | None
) -> str:
    candidates = fields_by_key.get((name.x, name.y, name.z, name.mip), [])
    if tag is not None:
        candidates = [c for c in candidates if c[1].tag == tag]
    if not candidates:
        want = field_filename(stage, name.x, name.y, name.z, name.mip, tag or "<tag>")
        raise MetroemError(
            f"no field dataset for {os.path.basename(img_path)} (expected {want} beside it); "
            "cut it with metroem-download-field or drop field_stage"
        )
    if len(candidates) > 1:
        tags = sorted(c[1].tag for c in candidates)
        raise MetroemError(
            f"several stage-{stage} field datasets match {os.path.basename(img_path)} "
            f"(tags {tags}); pass field_tag to pick one"
        )
    return candidates[0][0]


class PairDataset(torch.utils.data.Dataset):
    """Image pairs (and optionally fields) of one MIP from a dataset folder.

    Files are ordered by (z, y, x, suffix). Item ``i`` is ``{"src": (1, S, S) float32, "tgt":
    (1, S, S) float32, "field": (2, S, S) float32 (only with ``field_stage``), "index": global
    pair index, "z": source z, "file": image file path, "pair": index within that file,
    "translation": (2,) int64 source-window translation in MIP0 px}``. Images keep raw values
    (0 = no data).
    Files are opened lazily, once per process (so DataLoader workers never share a handle
    inherited through fork).
    ``indices`` restricts the dataset to those global pair indices (e.g. a train/val split).
    """

    def __init__(
        self,
        folder: str,
        mip: int,
        field_stage: int | None = None,
        field_tag: str | None = None,
        indices: Sequence[int] | None = None,
        suffix: str | None | bool = False,
    ):
        """``suffix``: only image files with this suffix (None: only plain files; False: all)."""
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.mip = int(mip)
        self.field_stage = field_stage
        paths = _files(self.folder)
        images = [(p, parse_image_filename(p)) for p in paths]
        images = [(p, n) for p, n in images if n is not None]
        chosen = sorted(
            (
                (p, n)
                for p, n in images
                if n.mip == self.mip and (suffix is False or n.suffix == suffix)
            ),
            key=lambda pn: (pn[1].z, pn[1].y, pn[1].x, pn[1].suffix or ""),
        )
        if not chosen:
            mips = sorted({n.mip for _, n in images})
            have = f"it has MIPs {mips}" if mips else "it has no image files x*_y*_z*_MIP*.h5"
            raise MetroemError(
                f"no image datasets at MIP {self.mip} in {self.folder} ({have}); "
                "pick one of those or cut this MIP with metroem-download-image"
            )
        fields_by_key: dict = {}
        if field_stage is not None:
            for p in paths:
                fn = parse_field_filename(p)
                if fn is not None and fn.stage == int(field_stage):
                    fields_by_key.setdefault((fn.x, fn.y, fn.z, fn.mip), []).append((p, fn))
        self._entries: list[_Entry] = []
        for path, name in chosen:
            layout, attrs, translation, _ = _probe(path, "image")
            entry = _Entry(path, layout, np.asarray(attrs.get("z", np.arange(layout.n))))
            entry.translation = np.asarray(translation, np.int64)
            if field_stage is not None:
                fpath = _match_field(path, name, fields_by_key, int(field_stage), field_tag)
                self._check_pair(entry, translation, fpath)
            self._entries.append(entry)
        self._starts = np.cumsum([0] + [e.layout.n for e in self._entries]).tolist()
        total = self._starts[-1]
        if indices is None:
            self.indices = None
        else:
            self.indices = [int(i) for i in indices]
            bad = [i for i in self.indices if not 0 <= i < total]
            if bad:
                raise MetroemError(f"indices {bad[:5]} out of range: the dataset has {total} pairs")
        self._pid: int | None = None
        self._handles: dict = {}

    def _check_pair(self, entry: _Entry, translation: np.ndarray, fpath: str) -> None:
        flayout, fattrs, ftrans, _ = _probe(fpath, "field")
        img, fld = os.path.basename(entry.path), os.path.basename(fpath)
        if (flayout.n, flayout.size) != (entry.layout.n, entry.layout.size):
            raise MetroemError(
                f"{fld} has {flayout.n} fields of {flayout.size}px but {img} has "
                f"{entry.layout.n} pairs of {entry.layout.size}px; re-cut the field with the "
                "image's z range and patch size"
            )
        if "z" in fattrs and not np.array_equal(fattrs["z"], entry.z):
            raise MetroemError(f"{fld} and {img} cover different z; re-cut one to match")
        if not np.array_equal(ftrans, translation):
            raise MetroemError(
                f"{img} was cut with source translations {translation.tolist()} but {fld} "
                f"removed {ftrans.tolist()}; re-cut the image with --field_dset {fpath}"
            )
        entry.field_path, entry.field_layout = fpath, flayout

    def __len__(self) -> int:
        return self._starts[-1] if self.indices is None else len(self.indices)

    def first_pairs(self) -> list[int]:
        """The global index of the first pair of every file (all files, ignoring ``indices``)."""
        return [s for s, e in zip(self._starts, self._entries, strict=False) if e.layout.n > 0]

    def image_files(self) -> list[str]:
        """The image files this dataset reads, in pair order."""
        return [e.path for e in self._entries]

    def _handle(self, path: str):
        pid = os.getpid()
        if self._pid != pid:  # new process (DataLoader worker): never reuse a parent's handle
            self._handles = {}
            self._pid = pid
        h = self._handles.get(path)
        if h is None:
            h = _open(path, RECUT_IMAGE)
            self._handles[path] = h
        return h

    def _locate(self, i: int) -> tuple[_Entry, int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        i = i % len(self)
        g = i if self.indices is None else self.indices[i]
        k = bisect.bisect_right(self._starts, g) - 1
        return self._entries[k], g - self._starts[k], g

    def __getitem__(self, i: int) -> dict:
        entry, j, g = self._locate(int(i))
        pair = _read_array(self._handle(entry.path)[entry.layout.key], j, entry.path, RECUT_IMAGE)
        pair = torch.from_numpy(_to_zyx(pair, entry.layout).astype(np.float32))
        item = {
            "src": pair[0:1],
            "tgt": pair[1:2],
            "index": g,
            "z": int(entry.z[j]),
            "file": entry.path,
            "pair": j,
            "translation": torch.from_numpy(entry.translation[j].copy()),
        }
        if entry.field_path is not None:
            f = _read_array(
                self._handle(entry.field_path)[FIELD_KEY], j, entry.field_path, RECUT_FIELD
            )
            item["field"] = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
        return item

    def close(self) -> None:
        """Close the handles this process opened."""
        if self._pid == os.getpid():
            for h in self._handles.values():
                with contextlib.suppress(Exception):
                    h.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_pid"] = None
        return state
