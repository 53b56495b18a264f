"""The bad-input catalogue: every class of bad input metroem's command-line tools must survive.

Each :class:`Case` prepares one bad input in a private work folder (from a small shared
:class:`World`: real file:// CloudVolumes of ISBI sections, h5 datasets, a tiny two-stage
pyramid), runs the real command (``download_image.py``, ``download_field.py``, ``train.py`` or
``python -m metroem.cli``) in a fresh interpreter and checks the contract of docs/reliability.md:

* the exit status is the expected one (2 for bad input);
* stderr ends with exactly one line starting ``error:`` that names the problem, and holds no
  ``Traceback``;
* nothing is lost (watched files are byte-identical before and after) and nothing is partial
  (no hidden ``.*.tmp-*`` or ``.*.lock`` file is left behind).

``tests/test_bad_input.py`` runs the table; ``benchmarks/bad_inputs.py`` writes it out as
``benchmarks/results/bad_inputs.{md,json}``. This module is the one list of cases: test
scaffolding, not part of the package. It runs the checkout's top-level scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import forked
import numpy as np

REPO = Path(__file__).resolve().parents[1]  # the checkout: this file is tests/
TOOLS = {
    "download_image": [str(REPO / "download_image.py")],
    "download_field": [str(REPO / "download_field.py")],
    "train": [str(REPO / "train.py")],
    "metroem": ["-m", "metroem.cli"],
}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SIZE, NZ, MIPS = 256, 6, (1, 0)  # the world's volume: 256 x 256 x 6 sections, pyramid MIPs
CENTRE = SIZE // 2


# --------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class World:
    """Shared, never-modified inputs; cases copy what they change into their own folder."""

    root: Path
    image: str  # file:// uint8 image volume, MIPs 0..2, z 0..5 (ISBI sections 0..5)
    field: str  # file:// float32 2-channel field volume, MIPs 0..2, z 0..5
    data: Path  # image datasets of z 1..5 at MIP 1 (128 px) and MIP 0 (256 px)
    pyramid: Path  # stages 0 (MIP 1) and 1 (MIP 0), tiny nets, no weights


def tiny_spec() -> dict:
    from metroem import nets

    return nets.default_spec(channels=[4, 8, 16], head_channels=8, local_radius=1,
                             global_radius=2)


def build_world(root: str | os.PathLike, sections: str | os.PathLike) -> World:
    """Build the shared inputs under ``root`` from the ISBI PNGs in ``sections`` (seconds)."""
    import torch
    from helpers import tiny_pyramid
    from PIL import Image

    from metroem import download, volumes

    root = Path(root)
    image, fld = volumes.normalize_path(str(root / "image")), volumes.normalize_path(
        str(root / "field")
    )
    volumes.create_volume(image, (SIZE, SIZE, NZ), 3, chunk_xy=128)
    volumes.create_volume(
        fld, (SIZE, SIZE, NZ), 3, dtype="float32", num_channels=2, chunk_xy=128
    )
    for z in range(NZ):
        sec = np.asarray(Image.open(Path(sections) / f"{z:02d}.png"))[:SIZE, :SIZE]
        volumes.write_all_mips(image, 0, 0, z, torch.from_numpy(sec.copy())[None, None])
        ramp = torch.linspace(-1.0, 1.0, SIZE)
        f = torch.stack([ramp[None, :].expand(SIZE, SIZE) + z,
                         0.5 * ramp[:, None].expand(SIZE, SIZE)])
        volumes.write_all_mips(fld, 0, 0, z, f[None].contiguous(), is_field=True)
    data = root / "data"
    download.download_image(image, str(data), 1, NZ, CENTRE, CENTRE, list(MIPS),
                            [SIZE >> m for m in MIPS], progress=False)
    pyramid = tiny_pyramid(root / "pyramid", tiny_spec(), MIPS)
    return World(root, image, fld, data, pyramid)


# --------------------------------------------------------------------------------- cases


@dataclass
class Prepared:
    """What a case's setup hands back: the command's arguments and what must not change."""

    argv: list[str]
    watch: list[Path] | None = None  # None: the whole work folder
    fsize_limit: int | None = None  # RLIMIT_FSIZE in bytes (a disk that fills up)
    env: dict[str, str] = field(default_factory=dict)
    cleanup: Callable[[], None] | None = None
    ignore: tuple[str, ...] = ("_runs",)  # run logs may be written by a run that fails midway


@dataclass(frozen=True)
class Case:
    name: str
    klass: str  # the class of bad input, in words
    tool: str  # key of TOOLS
    setup: Callable[[World, Path], Prepared]
    expect: str  # regex the error line must match (or the success check's summary)
    exit_code: int = 2
    post: Callable[[World, Path], list[str]] | None = None  # extra checks, problems found
    done: str = "finished"  # what a successful case reports


@dataclass
class Result:
    name: str
    klass: str
    tool: str
    command: str
    exit_code: int
    expected_exit: int
    message: str
    seconds: float
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


# --- helpers for setups -------------------------------------------------------------------


def _image_args(world: World, dst: Path, *extra: str, mip: int = 1, z=(1, 4)) -> list[str]:
    return ["--cv_path", world.image, "--dst_folder", str(dst), "--z_start", str(z[0]),
            "--z_end", str(z[1]), "--x_offset", str(CENTRE), "--y_offset", str(CENTRE),
            "--mip", str(mip), "--patch_size", "64", *extra]


def _field_args(cv: str, dst: Path, *extra: str, z=(1, 4), suffix: str = "t") -> list[str]:
    return ["--cv_path", cv, "--dst_folder", str(dst), "--z_start", str(z[0]), "--z_end",
            str(z[1]), "--x_offset", str(CENTRE), "--y_offset", str(CENTRE), "--src_mip", "1",
            "--dst_mip", "1", "--patch_size", "64", "--suffix", suffix, *extra]


def _copy_run(world: World, work: Path) -> tuple[Path, Path]:
    data, pyramid = work / "data", work / "pyramid"
    shutil.copytree(world.data, data)
    shutil.copytree(world.pyramid, pyramid)
    return data, pyramid


TINY = ["data.batch_size=2", "data.crop_size=64", "data.val_fraction=0.25",
        "schedule.warmup_steps=1", "train.steps=2", "train.log_every=1", "train.image_every=0",
        "train.val_every=0", "train.checkpoint_every=1", "augment.same_section.p=0.5"]


def _train_args(data: Path, pyramid: Path, *extra: str, checkpoint: str = "tiny",
                mode: str = "scratch") -> list[str]:
    out = ["--pyramid_path", str(pyramid), "--dataset_path", str(data), "--checkpoint_name",
           checkpoint, "--train_mode", mode, "--device", "cpu", "--no_redirect_stdout"]
    for o in TINY:
        out += ["--set", o]
    return out + list(extra)


def _train_case(edit: Callable[[World, Path, Path, Path], list[str] | None] | None = None,
                *extra: str, midway: bool = False) -> Callable[[World, Path], Prepared]:
    """A train.py setup: copy data + pyramid, apply ``edit`` (may return more arguments).

    ``midway``: the problem shows while training, after complete checkpoints may have been
    written; then only the datasets must stay untouched (temp files are checked everywhere).
    """

    def setup(world: World, work: Path) -> Prepared:
        data, pyramid = _copy_run(world, work)
        more = edit(world, work, data, pyramid) if edit else None
        argv = _train_args(data, pyramid, *extra, *(more or []))
        return Prepared(argv, watch=[data] if midway else None)

    return setup


def _h5(path: Path, datasets: dict[str, np.ndarray], attrs: dict | None = None) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def _image_attrs(n: int, size: int, mip: int) -> dict:
    return {"kind": "image", "axis_order": "zyx", "mip": mip, "x_offset": CENTRE,
            "y_offset": CENTRE, "z": np.arange(1, 1 + n), "patch_size": size}


def _replace_dataset(data: Path, mip: int, arrays: dict[str, np.ndarray], n: int = 5) -> None:
    """Swap the MIP ``mip`` image file for one holding ``arrays`` (a bad layout or values)."""
    from metroem import datasets as D

    name = D.image_filename(CENTRE, CENTRE, 1, mip)
    (data / name).unlink()
    _h5(data / name, arrays, _image_attrs(n, SIZE >> mip, mip))


def _unreadable(path: Path) -> str:
    """Make ``path`` (a file) unreadable: chmod 000, or (as root, who reads anyway) put a
    folder where the file is expected. Returns which mechanism was used."""
    if not IS_ROOT:
        path.chmod(0)
        return "chmod 000"
    path.unlink()
    path.mkdir()
    (path / "placeholder").write_text("a folder where a file is expected\n")
    return "a folder in place of the file"


def _field_dataset(world: World, dst: Path, z=(1, 4)) -> Path:
    from metroem import download

    return Path(download.download_field(world.field, str(dst), z[0], z[1], CENTRE, CENTRE, 1, 1,
                                        64, "t", progress=False))


def _nan_volume(work: Path, channels: int) -> str:
    import torch

    from metroem import volumes

    url = volumes.normalize_path(str(work / f"nan{channels}"))
    volumes.create_volume(url, (SIZE, SIZE, NZ), 3, dtype="float32", num_channels=channels,
                          chunk_xy=128)
    x = torch.rand(NZ, channels, SIZE >> 1, SIZE >> 1) * 100
    x[2, :, 20:40, 30:50] = float("nan")
    x[3, 0, 5, 5] = float("inf")
    volumes.write(url, 1, 0, 0, 0, x)
    return url


def _hold_lock(target: Path) -> tuple[subprocess.Popen, Callable[[], None]]:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom metroem.atomic import FileLock\n"
         f"with FileLock({str(target)!r}):\n    print('locked', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )
    line = holder.stdout.readline().strip()
    if line != "locked":
        holder.kill()
        raise RuntimeError(f"lock holder did not start: {line!r}")

    def cleanup():
        holder.kill()
        holder.wait()
        holder.stdout.close()

    return holder, cleanup


def _weights_finite(module_glob: str, name: str = "tiny"):
    def post(world: World, work: Path) -> list[str]:
        import torch

        paths = sorted(work.glob(f"pyramid/{module_glob}/model/{name}.state.pth.tar"))
        if not paths:
            return [f"no {name} weights were written"]
        problems = []
        for p in paths:
            state = torch.load(p, weights_only=True)
            bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                problems.append(f"{p.name}: non-finite weights {bad[:3]}")
        return problems

    return post


def _file_intact(rel: str, digest_file: str = ".before.sha1"):
    """Post-check: ``work/rel`` still has the hash recorded by the setup."""

    def post(world: World, work: Path) -> list[str]:
        path = work / rel
        if not path.is_file():
            return [f"{rel} is gone"]
        want = (work / digest_file).read_text().strip()
        return [] if _sha1(path) == want else [f"{rel} was changed"]

    return post


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# --- download_image -----------------------------------------------------------------------


def _di_missing(world, work):
    return Prepared(_image_args(world, work / "out")
                    [:1] + [str(work / "no_such_volume")] + _image_args(world, work / "out")[2:])


def _di_unreadable(world, work):
    vol = work / "vol"
    shutil.copytree(world.image[len("file://"):], vol)
    _unreadable(vol / "info")
    args = _image_args(world, work / "out")
    args[1] = str(vol)
    return Prepared(args)


def _di_dst_file(world, work):
    (work / "out").write_text("I am a file\n")
    return Prepared(_image_args(world, work / "out"))


def _di_dst_under_file(world, work):
    (work / "plain").write_text("I am a file\n")
    return Prepared(_image_args(world, work / "plain" / "out"))


def _di_z_outside(world, work):
    return Prepared(_image_args(world, work / "out", z=(4, 9)))


def _di_patch_outside(world, work):
    args = _image_args(world, work / "out")
    args[args.index("--x_offset") + 1] = "4096"
    return Prepared(args)


def _di_missing_mip(world, work):
    return Prepared(_image_args(world, work / "out", mip=7))


def _di_nan(world, work):
    args = _image_args(world, work / "out", z=(1, 5))
    args[1] = _nan_volume(work, 1)
    return Prepared(args)


def _di_field_mismatch(world, work):
    fd = _field_dataset(world, work / "fields", z=(2, 5))
    return Prepared(_image_args(world, work / "out", "--field_dset", str(fd)))


def _di_field_truncated(world, work):
    fd = _field_dataset(world, work / "fields")
    data = fd.read_bytes()
    fd.write_bytes(data[: len(data) // 3])
    return Prepared(_image_args(world, work / "out", "--field_dset", str(fd)))


def _di_field_foreign(world, work):
    (work / "fields").mkdir()
    fd = work / "fields" / "field_0_x128_y128_z1_MIP1_t.h5"
    _h5(fd, {"weights": np.ones((3, 3), np.float32)})
    return Prepared(_image_args(world, work / "out", "--field_dset", str(fd)))


def _di_existing(world, work):
    from metroem import download

    out = work / "out"
    (path,) = download.download_image(world.image, str(out), 2, 4, CENTRE, CENTRE, [1], [64],
                                      suffix=None, progress=False)
    # same name, different content: a rerun with other z must not replace it
    (work / ".before.sha1").write_text(_sha1(Path(path)))
    os.rename(path, out / "x128_y128_z1_MIP1.h5")
    return Prepared(_image_args(world, out))


def _di_locked(world, work):
    out = work / "out"
    out.mkdir()
    _, cleanup = _hold_lock(out / "x128_y128_z1_MIP1.h5")
    return Prepared(_image_args(world, out), cleanup=cleanup,
                    ignore=("_runs", ".x128_y128_z1_MIP1.h5.lock"))


def _di_bad_arg(world, work):
    args = _image_args(world, work / "out")
    args[args.index("--z_start") + 1] = "one"
    return Prepared(args)


def _di_disk_full(world, work):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing data\n")
    return Prepared(_image_args(world, out, mip=0, z=(1, 6)), fsize_limit=16 * 1024)


# --- download_field -----------------------------------------------------------------------


def _df_image_volume(world, work):
    return Prepared(_field_args(world.image, work / "out"))


def _df_nan(world, work):
    return Prepared(_field_args(_nan_volume(work, 2), work / "out", z=(1, 5)))


def _df_negative_stage(world, work):
    return Prepared(_field_args(world.field, work / "out", "--stage", "-1"))


# --- train.py -----------------------------------------------------------------------------


def _tr_missing_pyramid(world, work):
    data, _ = _copy_run(world, work)
    return Prepared(_train_args(data, work / "no_such_pyramid"))


def _tr_empty_pyramid(world, work):
    data, _ = _copy_run(world, work)
    (work / "empty").mkdir()
    return Prepared(_train_args(data, work / "empty"))


def _edit_misnamed(world, work, data, pyramid):
    shutil.copytree(pyramid / "1_mip0in_t", pyramid / "2_mip0_oops")


def _edit_duplicate(world, work, data, pyramid):
    shutil.copytree(pyramid / "1_mip0in_t", pyramid / "1_mip0in_other")


def _edit_empty_module(world, work, data, pyramid):
    (pyramid / "2_mip0in_empty").mkdir()


def _tr_empty_data(world, work):
    _, pyramid = _copy_run(world, work)
    (work / "empty").mkdir()
    return Prepared(_train_args(work / "empty", pyramid))


def _tr_data_is_file(world, work):
    _, pyramid = _copy_run(world, work)
    (work / "data.h5").write_bytes(b"not a folder")
    return Prepared(_train_args(work / "data.h5", pyramid))


def _edit_truncate(world, work, data, pyramid):
    p = data / "x128_y128_z1_MIP1.h5"
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _edit_corrupt_header(world, work, data, pyramid):
    p = data / "x128_y128_z1_MIP1.h5"
    b = bytearray(p.read_bytes())
    b[0:64] = bytes(range(64))
    p.write_bytes(bytes(b))


def _edit_corrupt_chunk(world, work, data, pyramid):
    p = data / "x128_y128_z1_MIP1.h5"
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid : mid + 256] = bytes(256)  # zeros inside compressed, checksummed chunks
    p.write_bytes(bytes(b))


def _edit_foreign(world, work, data, pyramid):
    _replace_dataset(data, 1, {"volume": np.zeros((4, 4), np.float32)})


def _edit_wrong_rank(world, work, data, pyramid):
    _replace_dataset(data, 1, {"img": np.ones((5, 128, 128), np.uint8),
                               "translation": np.zeros((5, 2), np.int64)})


def _edit_wrong_dtype(world, work, data, pyramid):
    _replace_dataset(data, 1, {"img": np.ones((5, 2, 128, 128), np.complex64),
                               "translation": np.zeros((5, 2), np.int64)})


def _edit_zero_pairs(world, work, data, pyramid):
    _replace_dataset(data, 1, {"img": np.ones((0, 2, 128, 128), np.uint8),
                               "translation": np.zeros((0, 2), np.int64)}, n=0)


def _edit_nan_pairs(world, work, data, pyramid):
    x = np.random.default_rng(0).random((5, 2, 128, 128)).astype(np.float32) + 0.5
    x[1:, :, 10:20, 10:20] = np.nan  # pair 0 clean: the preflight reads it (tissue size)
    _replace_dataset(data, 1, {"img": x, "translation": np.zeros((5, 2), np.int64)})


def _edit_unreadable(world, work, data, pyramid):
    _unreadable(data / "x128_y128_z1_MIP1.h5")


def _field_file(data: Path, arr: np.ndarray, n: int) -> None:
    attrs = {**_image_attrs(n, arr.shape[-1], 0), "kind": "field", "stage": 0, "tag": "tiny"}
    _h5(data / "field_0_x128_y128_z1_MIP0_tiny.h5",
        {"field": arr, "translation": np.zeros((n, 2), np.int64)}, attrs)


def _edit_field_shape(world, work, data, pyramid):
    _field_file(data, np.zeros((5, 3, 256, 256), np.float32), 5)
    return ["--train_stages", "1"]


def _edit_field_mismatch(world, work, data, pyramid):
    _field_file(data, np.zeros((3, 2, 256, 256), np.float32), 3)
    return ["--train_stages", "1"]


def _edit_bad_yaml(world, work, data, pyramid):
    (work / "params.yaml").write_text("train:\n  steps: [1, 2\n")
    return ["--train_mode", "custom", "--train_params_path", str(work / "params.yaml")]


def _edit_other_arch(world, work, data, pyramid):
    from metroem import modules, nets

    other = nets.build_model(nets.default_spec(channels=[4, 8], head_channels=4, local_radius=1))
    modules.save_weights(pyramid / "0_mip1in_t", "old", other.state_dict())
    return ["--checkpoint_name", "old", "--train_mode", "finetune", "--train_stages", "0"]


def _tr_disk_full(world, work):
    import torch

    from metroem import modules, nets

    data, pyramid = _copy_run(world, work)
    torch.manual_seed(0)
    w = modules.save_weights(pyramid / "0_mip1in_t", "old",
                             nets.build_model(tiny_spec()).state_dict())
    (work / ".before.sha1").write_text(_sha1(w))
    # Room for every smaller file the run writes (frozen code, logs), not for the weights.
    code = max(p.stat().st_size for p in (pyramid / "0_mip1in_t").rglob("*.py"))
    limit = code + 2048
    assert limit < w.stat().st_size, "the disk-full case needs weights larger than the code"
    argv = _train_args(data, pyramid, "--checkpoint_name", "old", "--train_mode", "finetune",
                       "--train_stages", "0", "--generate_field_stages", "--overwrite")
    return Prepared(argv, watch=[data], fsize_limit=limit)


def _edit_all_zero(world, work, data, pyramid):
    for mip in MIPS:
        s = SIZE >> mip
        _replace_dataset(data, mip, {"img": np.zeros((5, 2, s, s), np.uint8),
                                     "translation": np.zeros((5, 2), np.int64)})
    return ["--train_stages", "0", "--generate_field_stages"]


def _edit_corrupt_resume(world, work, data, pyramid):
    from metroem.training import checkpoint as ckpt

    p = ckpt.training_state_path(pyramid / "0_mip1in_t", "tiny")
    p.write_bytes(b"PK\x03\x04 half a zip file")
    return ["--resume", "--train_stages", "0"]


# --- metroem ------------------------------------------------------------------------------


def _m_demo_exists(world, work):
    out = work / "demo"
    out.mkdir()
    (out / "demo.json").write_text('{"format": "metroem-demo-volume/1"}\n')
    return Prepared(["demo-volume", str(out), "--num_sections", "2", "--size", "64"])


def _m_demo_not_empty(world, work):
    out = work / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own files\n")
    return Prepared(["demo-volume", str(out), "--num_sections", "2", "--size", "64"])


def _m_download_missing(world, work):
    return Prepared(["download-image", *_di_missing(world, work).argv])


# --- issue 15: no silent data loss ----------------------------------------------------------


def _sections(work: Path, names: list[str], size: int = 64) -> Path:
    """A folder of small grey section images named ``names`` (PNG or TIFF by suffix)."""
    from PIL import Image

    folder = work / "sections"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(1, 255, (size, size), dtype=np.uint8)).save(folder / name)
    return folder


def _ingest(folder: Path, work: Path, *extra: str) -> Prepared:
    return Prepared(["ingest", str(folder), str(work / "vol"), "--num_mips", "2", *extra])


def _in_same_number(world, work):
    return _ingest(_sections(work, ["s1.png", "s01.png", "s2.png"]), work)


def _in_no_number(world, work):
    return _ingest(_sections(work, ["s0.png", "s1.png", "overview.png"]), work)


def _in_mixed_types(world, work):
    return _ingest(_sections(work, ["s0.png", "s1.tif", "s2.png"]), work)


def _in_truncated(world, work):
    folder = _sections(work, ["s0.png", "s1.png", "s2.png"])
    (folder / "s1.png").write_bytes((folder / "s1.png").read_bytes()[:300])
    return _ingest(folder, work)


def _in_not_image(world, work):
    folder = _sections(work, ["s0.png", "s2.png"])
    (folder / "s1.png").write_text("section 1 was never exported\n")
    return _ingest(folder, work)


def _in_colour(world, work):
    from PIL import Image

    folder = _sections(work, ["s0.png", "s1.png"])
    rgb = np.random.default_rng(1).integers(1, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "s2.png")
    return _ingest(folder, work)


def _in_16bit(world, work):
    import tifffile

    folder = work / "sections"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for z in range(3):
        tifffile.imwrite(folder / f"{z}.tif", rng.integers(1000, 60000, (64, 64), np.uint16))
    return _ingest(folder, work)


def _in_16bit_kept(world, work) -> list[str]:
    import tifffile

    from metroem import volumes

    url = "file://" + str(work / "vol")
    info = volumes.volume_info(url)
    got = volumes.read(url, 0, 0, 0, 0, 64, 64, nz=3)[:, 0].numpy()
    want = np.stack([tifffile.imread(work / "sections" / f"{z}.tif") for z in range(3)])
    volumes.forget(url)
    if info.dtype != "uint16":
        return [f"the layer is {info.dtype}, not uint16"]
    return [] if np.array_equal(got, want) else ["grey levels changed"]


def _al_float_png(world, work):
    import tifffile

    a = np.random.default_rng(0).random((64, 64), dtype=np.float32) + 0.5
    for name in ("s.tif", "t.tif"):
        tifffile.imwrite(work / name, a)
    return Prepared(["align", "--pyramid_path", str(world.pyramid), "--src", str(work / "s.tif"),
                     "--tgt", str(work / "t.tif"), "--image_out", str(work / "out.png"),
                     "--no_progress"])


def _al_output_is_source(world, work):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("s.png", "t.png"):
        Image.fromarray(rng.integers(20, 230, (64, 64), dtype=np.uint8)).save(work / name)
    return Prepared(["align", "--pyramid_path", str(world.pyramid), "--src", str(work / "s.png"),
                     "--tgt", str(work / "t.png"), "--image_out", str(work / "s.png"),
                     "--overwrite", "--no_progress"])


def _al_z_end_past(world, work):
    return Prepared(["align", "--pyramid_path", str(world.pyramid), "--src_path", world.image,
                     "--z_start", "1", "--z_end", "9", "--field_path", str(work / "field"),
                     "--pairwise"])


def _st_args(world, work, *extra):
    return ["align", "--pyramid_path", str(world.pyramid), "--src_path", world.image,
            "--z_start", "1", "--z_end", "3", "--field_path", str(work / "field"), "--image_path",
            str(work / "aligned"), "--no_progress", *extra]


def _st_no_image(world, work):
    return Prepared(_st_args(world, work)[:-3] + ["--no_progress"])


def _st_no_reference(world, work):
    args = _st_args(world, work)
    args[args.index("--z_start") + 1] = "0"
    return Prepared(args)


def _st_bad_queue(world, work):
    (work / "plain").write_text("not a folder")
    return Prepared(_st_args(world, work, "--block_size", "1", "--queue",
                             f"fq://{work / 'plain' / 'q'}"))


def _st_missing_queue(world, work):
    return Prepared(["worker", f"fq://{work / 'no_queue'}"])


def _mask_layer(work: Path, size: int, nz: int, name: str | None = None) -> str:
    """An empty uint8 layer (info, no chunks) of ``size``^2 x ``nz`` sections, 3 MIPs."""
    from metroem import volumes

    url = volumes.normalize_path(str(work / (name or f"mask{size}x{nz}")))
    volumes.create_volume(url, (size, size, nz), 3, chunk_xy=64)
    volumes.forget(url)
    return url


def _st_missing_mask(world, work):
    return Prepared(_st_args(world, work, "--mask_path", str(work / "no_mask")))


def _st_mask_size(world, work):
    return Prepared(_st_args(world, work, "--mask_path", _mask_layer(work, SIZE // 2, NZ)))


def _st_mask_sections(world, work):
    return Prepared(_st_args(world, work, "--mask_path", _mask_layer(work, SIZE, 1)))


def _st_misaligned_ratio(world, work):
    return Prepared(_st_args(world, work, "--misaligned_ratio", "1.5"))


def _rg_args(work: Path, blocks: Path) -> list[str]:
    return ["registered", "--dst_folder", str(work / "data"), "--blocks", str(blocks),
            "--block_nm", "10", "--resolution_nm", "10", "--mips", "0", "--gaps", "1", "2",
            "--held_out", "2"]


def _st_output_is_source(world, work):
    """The aligned image layer named as the source layer, with --overwrite: the raw sections
    (outside the work folder, watched too) must not be touched."""
    args = _st_args(world, work, "--overwrite")
    args[args.index("--image_path") + 1] = world.image
    return Prepared(args, watch=[work, Path(world.image[len("file://"):])])


def _existing_layer(work: Path, name: str) -> None:
    _mask_layer(work, SIZE, NZ, name)


def _st_resume_foreign(world, work):
    """--resume into a layer no metroem run made (no chunk markers)."""
    _existing_layer(work, "aligned")
    _existing_layer(work, "field")
    return Prepared(_st_args(world, work, "--resume"))


def _st_one_output_exists(world, work):
    """The image layer exists, the field layer does not: the refusal must not create it."""
    _existing_layer(work, "aligned")
    return Prepared(_st_args(world, work))


def _wk_plain_path(world, work):
    return Prepared(["worker", str(work / "q")])


def _ev_report_is_file(world, work):
    (work / "rfile").write_text("not a folder\n")
    return Prepared(["eval", "--image_path", world.image, "--z_start", "1", "--z_end", "3",
                     "--report", str(work / "rfile")])


def _ev_no_data(world, work):
    """A layer whose info lists the MIP but which holds no chunks there."""
    _existing_layer(work, "empty")
    return Prepared(["eval", "--image_path", str(work / "empty"), "--z_start", "1", "--z_end",
                     "3"])


def _st_detrend_zero(world, work):
    return Prepared(_st_args(world, work, "--detrend_sections", "0"))


def _rg_missing_blocks(world, work):
    return Prepared(_rg_args(work, work / "no_blocks"))


def _rg_existing(world, work):
    """A registered block and a dataset folder that already holds one file of the set (a later
    one): nothing may be written, that file kept."""
    from PIL import Image

    from metroem import datasets, registered

    block = work / "blocks" / "b1"
    block.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for z in range(12):
        Image.fromarray(rng.integers(20, 230, (40, 40), dtype=np.uint8)).save(
            block / f"{z:03d}.png")
    (work / "data").mkdir()
    taken = work / "data" / datasets.field_filename(0, -1, 2, 0, 0, registered.GROUND_TRUTH_TAG)
    taken.write_bytes(b"an earlier run's truth\n")
    return Prepared(_rg_args(work, work / "blocks"))


def _ev_bbox_outside(world, work):
    return Prepared(["eval", "--image_path", world.image, "--z_start", "1", "--z_end", "2",
                     "--bbox", str(SIZE - 32), "0", "64", "64"])


def _tiny_weights(pyramid: Path, stage_dir: str, name: str):
    import torch

    from metroem import modules, nets

    torch.manual_seed(0)
    model = nets.build_model(tiny_spec())
    return model, modules.save_weights(pyramid / stage_dir, name, model.state_dict())


def _al_mixed_defaults(world, work):
    pyramid = work / "pyramid"
    shutil.copytree(world.pyramid, pyramid)
    _tiny_weights(pyramid, "0_mip1in_t", "a")
    _tiny_weights(pyramid, "1_mip0in_t", "b")
    return Prepared(["align", "--pyramid_path", str(pyramid), "--src_path", world.image,
                     "--z_start", "1", "--z_end", "2", "--field_path", str(work / "field"),
                     "--pairwise"])


def _al_unfinished_default(world, work):
    import torch

    from metroem.training import checkpoint as ckpt

    pyramid = work / "pyramid"
    shutil.copytree(world.pyramid, pyramid)
    _tiny_weights(pyramid, "1_mip0in_t", "a")
    model, _ = _tiny_weights(pyramid, "0_mip1in_t", "a")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_training_state(ckpt.training_state_path(pyramid / "0_mip1in_t", "a"), model, opt,
                             None, 3, None, None, {"train": {"steps": 40}}, {"final": False})
    return Prepared(["align", "--pyramid_path", str(pyramid), "--src_path", world.image,
                     "--z_start", "1", "--z_end", "2", "--field_path", str(work / "field"),
                     "--pairwise"])


def _edit_existing_checkpoint(world, work, data, pyramid):
    _, w = _tiny_weights(pyramid, "0_mip1in_t", "tiny")
    (work / ".before.sha1").write_text(_sha1(w))
    return ["--train_stages", "0", "--generate_field_stages"]


def _edit_foreign_generated(world, work, data, pyramid):
    from metroem import datasets as D

    plain = D.read_image_dataset(str(data / D.image_filename(CENTRE, CENTRE, 1, 0)))
    attrs = {**plain.attrs, "pyramid": "/elsewhere/other_pyramid", "weights": "{}"}
    D.write_image_dataset(str(data / D.image_filename(CENTRE, CENTRE, 1, 0, "tiny")),
                          plain.data, attrs, translation=plain.translation)
    return ["--train_stages", "0"]  # fields after stage 0 would be generated


def _edit_small_tissue(world, work, data, pyramid):
    x = np.zeros((5, 2, 128, 128), np.uint8)
    x[:, :, 50:60, 50:60] = 100  # 10 px of tissue at MIP 1: smaller than the 64 px crop
    _replace_dataset(data, 1, {"img": x, "translation": np.zeros((5, 2), np.int64)})
    return ["--train_stages", "0", "--generate_field_stages"]


CASES: list[Case] = [
    # download_image
    Case("di_missing_volume", "missing input path (--cv_path)", "download_image", _di_missing,
         r"no CloudVolume at .*no_such_volume"),
    Case("di_unreadable_volume", "unreadable input (volume info)", "download_image",
         _di_unreadable, r"(cannot read|cannot open|not a file|is a folder).*info"),
    Case("di_dst_is_file", "output folder is a file", "download_image", _di_dst_file,
         r"exists and is not a folder"),
    Case("di_dst_unwritable", "output folder cannot be created", "download_image",
         _di_dst_under_file, r"cannot (create|write).*plain"),
    Case("di_z_outside", "z range outside the volume", "download_image", _di_z_outside,
         r"needs sections \[3, 9\).*has z \[0, 6\)"),
    Case("di_patch_outside", "patch outside the volume", "download_image", _di_patch_outside,
         r"outside the volume"),
    Case("di_missing_mip", "MIP the volume lacks", "download_image", _di_missing_mip,
         r"has no MIP 7"),
    Case("di_nan_volume", "NaN/inf in volume data", "download_image", _di_nan,
         r"contains NaN or inf"),
    Case("di_field_dset_mismatch", "field dataset that does not match the cut",
         "download_image", _di_field_mismatch, r"covers z \[2, 3, 4\] but this cut has z"),
    Case("di_field_dset_truncated", "truncated h5 (--field_dset)", "download_image",
         _di_field_truncated, r"(truncated or corrupt|is corrupt)"),
    Case("di_field_dset_foreign", "foreign h5 (--field_dset)", "download_image",
         _di_field_foreign, r"not a metroem field dataset"),
    Case("di_existing_output", "existing output without --overwrite", "download_image",
         _di_existing, r"already exists; pass --overwrite", post=_file_intact(
             "out/x128_y128_z1_MIP1.h5")),
    Case("di_locked", "two writers of one dataset", "download_image", _di_locked,
         r"another process \(pid \d+\) is writing"),
    Case("di_bad_argument", "wrong argument type", "download_image", _di_bad_arg,
         r"--z_start.*invalid int value"),
    Case("di_disk_full", "disk fills up mid-write (RLIMIT_FSIZE)", "download_image",
         _di_disk_full, r"cannot write .*(File too large|No space)"),
    # download_field
    Case("df_image_as_field", "wrong number of channels (image as field)", "download_field",
         _df_image_volume, r"has 1 channel\(s\); a field volume has 2"),
    Case("df_nan_field", "NaN/inf in field volume", "download_field", _df_nan,
         r"contains NaN or inf"),
    Case("df_negative_stage", "out-of-range argument", "download_field", _df_negative_stage,
         r"--stage -1 must be a non-negative"),
    # train.py: module folders
    Case("tr_missing_pyramid", "missing pyramid folder", "train", _tr_missing_pyramid,
         r"pyramid folder .*no_such_pyramid does not exist"),
    Case("tr_empty_pyramid", "empty pyramid folder", "train", _tr_empty_pyramid,
         r"no module folders in"),
    Case("tr_misnamed_module", "misnamed module folder", "train", _train_case(_edit_misnamed),
         r"misnamed module folder .*2_mip0_oops"),
    Case("tr_duplicate_stage", "duplicate module stage", "train", _train_case(_edit_duplicate),
         r"duplicate stage 1"),
    Case("tr_empty_module", "empty module folder", "train", _train_case(_edit_empty_module),
         r"2_mip0in_empty lacks model/model_spec.json"),
    # train.py: datasets
    Case("tr_empty_dataset_folder", "empty dataset folder (no files)", "train", _tr_empty_data,
         r"no image datasets at MIP 1 in .*empty"),
    Case("tr_dataset_path_is_file", "dataset path is a file", "train", _tr_data_is_file,
         r"dataset folder .* (does not exist|is not a folder)"),
    Case("tr_truncated_h5", "truncated h5", "train", _train_case(_edit_truncate),
         r"x128_y128_z1_MIP1.h5 is not a readable h5 file \(truncated or corrupt"),
    Case("tr_corrupt_h5_header", "corrupt h5 (header bytes)", "train",
         _train_case(_edit_corrupt_header), r"x128_y128_z1_MIP1.h5 is not a readable h5 file"),
    Case("tr_corrupt_h5_data", "corrupt h5 (data bytes, checksum)", "train",
         _train_case(_edit_corrupt_chunk, "--train_stages", "0", "--generate_field_stages",
                     midway=True),
         r"x128_y128_z1_MIP1.h5 is corrupt"),
    Case("tr_foreign_h5", "foreign h5 (no image dataset)", "train", _train_case(_edit_foreign),
         r"is not a metroem image dataset"),
    Case("tr_wrong_rank", "image dataset of wrong rank", "train", _train_case(_edit_wrong_rank),
         r"has shape \(5, 128, 128\), expected \(N, 2, S, S\)"),
    Case("tr_wrong_dtype", "image dataset of wrong dtype", "train",
         _train_case(_edit_wrong_dtype), r"has dtype complex64"),
    Case("tr_zero_pairs", "empty dataset (N = 0 pairs)", "train",
         _train_case(_edit_zero_pairs), r"has shape \(0, 2, 128, 128\).*N >= 1"),
    Case("tr_nan_pairs", "NaN in h5 image pairs (read while training)", "train",
         _train_case(_edit_nan_pairs, "--train_stages", "0", "--generate_field_stages",
                     midway=True),
         r"x128_y128_z1_MIP1.h5 contains NaN or inf"),
    Case("tr_nan_pairs_workers", "NaN in h5 image pairs, DataLoader workers", "train",
         _train_case(_edit_nan_pairs, "--train_stages", "0", "--generate_field_stages",
                     "--set", "data.num_workers=1", midway=True),
         r"x128_y128_z1_MIP1.h5 contains NaN or inf"),
    Case("tr_unreadable_h5", "unreadable dataset file", "train", _train_case(_edit_unreadable),
         r"x128_y128_z1_MIP1.h5 (is a folder|cannot be read|is not readable)"),
    Case("tr_field_wrong_shape", "field dataset of shape (N, 3, S, S)", "train",
         _train_case(_edit_field_shape), r"field_0_.*has shape \(5, 3, 256, 256\)"),
    Case("tr_field_mismatch", "field dataset that does not match its images", "train",
         _train_case(_edit_field_mismatch), r"has 3 fields of 256px but .* has 5 pairs"),
    # train.py: config, checkpoints, device
    Case("tr_config_unknown_key", "config with an unknown key", "train",
         _train_case(None, "--set", "train.stepz=3"), r"unknown key 'train.stepz'"),
    Case("tr_config_wrong_type", "config value of the wrong type", "train",
         _train_case(None, "--set", "train.steps=many"), r"train.steps: expected int, got str"),
    Case("tr_config_out_of_range", "config value out of range", "train",
         _train_case(None, "--set", "data.val_fraction=1.5"),
         r"data.val_fraction: must be in \[0, 1\), got 1.5"),
    Case("tr_config_unparsable", "config file that does not parse", "train",
         _train_case(_edit_bad_yaml), r"params.yaml does not parse"),
    Case("tr_unknown_stage", "stage the pyramid lacks", "train",
         _train_case(None, "--train_stages", "5"), r"unknown stage\(s\) 5"),
    Case("tr_other_architecture", "checkpoint from another architecture", "train",
         _train_case(_edit_other_arch), r"another architecture"),
    Case("tr_corrupt_resume_state", "corrupt training state (--resume)", "train",
         _train_case(_edit_corrupt_resume), r"training state .* is unreadable"),
    Case("tr_missing_gpu", "device naming a GPU that is not there", "train",
         _train_case(None, "--device", "cuda:7"), r"'cuda:7' asks for GPU 7"),
    Case("tr_bad_argument", "unknown choice on the command line", "train",
         _train_case(None, "--train_mode", "sideways"), r"--train_mode.*invalid choice"),
    Case("tr_disk_full_checkpoint", "disk fills up while saving weights (RLIMIT_FSIZE)",
         "train", _tr_disk_full, r"cannot write .*old.state.pth.tar.*(File too large|No space)",
         post=_file_intact("pyramid/0_mip1in_t/model/old.state.pth.tar")),
    Case("tr_all_zero_pairs", "all-zero (no tissue) pairs", "train",
         _train_case(_edit_all_zero), r"", exit_code=0, post=_weights_finite("0_mip1in_t"),
         done="trained; the saved weights are finite"),
    # metroem umbrella CLI
    Case("m_demo_volume_exists", "existing output volume without --overwrite", "metroem",
         _m_demo_exists, r"a demo volume already exists at .*demo; pass --overwrite"),
    Case("m_demo_volume_foreign_folder", "output folder holding other files", "metroem",
         _m_demo_not_empty, r"is not empty and holds no demo volume"),
    Case("m_download_missing_volume", "missing input path via `metroem download-image`",
         "metroem", _m_download_missing, r"no CloudVolume at .*metroem ingest"),
    # issue 15: ingest, retraining, checkpoints and outputs never quietly lose work
    Case("in_same_number", "two section files with the same number (ingest)", "metroem",
         _in_same_number, r"s0?1.png and s0?1.png both carry section number 1"),
    Case("in_no_number", "section file name without a number (ingest)", "metroem",
         _in_no_number, r"overview.png .*has no number in its name"),
    Case("in_mixed_types", "section folder mixing .png and .tif (ingest)", "metroem",
         _in_mixed_types, r"mixes image types: PNG \(s0.png\), TIFF \(s1.tif\)"),
    Case("in_truncated_png", "truncated PNG section (ingest)", "metroem", _in_truncated,
         r"cannot read .*s1.png as an image"),
    Case("in_not_an_image", "non-image file named .png (ingest)", "metroem", _in_not_image,
         r"cannot read .*s1.png as an image"),
    Case("in_colour", "colour (RGB) section image (ingest; align agrees)", "metroem",
         _in_colour, r"s2.png is a colour image"),
    Case("in_16bit_tiff", "16-bit TIFF sections (ingest)", "metroem", _in_16bit, r"",
         exit_code=0, post=lambda world, work: _in_16bit_kept(world, work),
         done="ingested as a uint16 layer; every grey level kept"),
    Case("al_float_to_png", "float image written to a PNG output (align)", "metroem",
         _al_float_png, r"PNG holds 8/16-bit images.*write .tif or .npy"),
    Case("al_output_is_source", "the output image file is the source image (align "
         "--overwrite)", "metroem", _al_output_is_source,
         r"--image_out .*s.png is also --src; write the output to a new file"),
    Case("al_z_end_past_volume", "--z_end past the volume (align)", "metroem", _al_z_end_past,
         r"pass --z_end 6 or less"),
    Case("st_no_image_layer", "stack without an aligned image layer (align)", "metroem",
         _st_no_image, r"aligning a stack needs both --field_path and --image_path"),
    Case("st_no_reference", "stack whose reference section z_start-1 is missing (align)",
         "metroem", _st_no_reference, r"section -1 .*reference.*start at --z_start 1"),
    Case("st_unreachable_queue", "task queue that cannot be opened (align --queue)",
         "metroem", _st_bad_queue, r"cannot open the task queue"),
    Case("st_missing_queue", "worker on a queue that does not exist", "metroem",
         _st_missing_queue, r"queue fq://.*no_queue does not exist"),
    Case("st_missing_mask", "defect mask layer that does not exist (align --mask_path)",
         "metroem", _st_missing_mask, r"mask layer .*no_mask cannot be opened"),
    Case("st_mask_size", "defect mask layer of another size (align --mask_path)", "metroem",
         _st_mask_size, r"give a mask of the image layer's size"),
    Case("st_mask_sections", "defect mask layer without the sections aligned (align)",
         "metroem", _st_mask_sections, r"has no section 1 .*give a mask for every section"),
    Case("st_misaligned_ratio", "a misalignment ratio outside [0, 1) (align, stack)",
         "metroem", _st_misaligned_ratio, r"--misaligned_ratio must be in \[0, 1\)"),
    Case("st_detrend_zero", "a detrend sigma of 0 sections (align, stack)", "metroem",
         _st_detrend_zero, r"--detrend_sections must be a positive number of sections"),
    Case("st_output_is_source", "an output layer that is the source layer (align "
         "--overwrite)", "metroem", _st_output_is_source,
         r"--image_path .* is also --src_path; write the outputs to new layers"),
    Case("st_resume_foreign_layer", "--resume into layers no metroem run made (align)",
         "metroem", _st_resume_foreign, r"--resume: .* holds no interrupted metroem run"),
    Case("st_one_output_exists", "one output layer exists, the other not (align)", "metroem",
         _st_one_output_exists, r"output layer .*aligned already exists; pass --overwrite"),
    Case("wk_plain_path_queue", "a folder path instead of a queue URL (worker)", "metroem",
         _wk_plain_path, r"not a task queue URL.*pass fq://"),
    Case("ev_report_is_file", "--report naming a file (eval)", "metroem", _ev_report_is_file,
         r"--report .*rfile is a file; pass a folder"),
    Case("ev_no_data_at_mip", "a layer with no data at the MIP evaluated (eval)", "metroem",
         _ev_no_data, r"has no data at MIP 0 .*pass the --mip it was written at"),
    Case("rg_missing_blocks", "registered blocks folder that does not exist (registered)",
         "metroem", _rg_missing_blocks, r"registered blocks not found at .*--blocks DIR"),
    Case("rg_existing", "a registered dataset that already exists (registered)", "metroem",
         _rg_existing, r"exists; pass --overwrite"),
    Case("ev_bbox_outside", "--bbox partly outside the volume (eval)", "metroem",
         _ev_bbox_outside, r"--bbox .* is not inside the layer"),
    Case("al_mixed_checkpoints", "stages whose default checkpoints differ (align)", "metroem",
         _al_mixed_defaults, r"default checkpoints differ \(stage 0: a, stage 1: b\)"),
    Case("al_unfinished_checkpoint", "default checkpoint from a stopped run (align)",
         "metroem", _al_unfinished_default, r"did not finish .*stopped at step 3 of 40"),
    Case("tr_existing_checkpoint", "training over an existing checkpoint without --resume",
         "train", _train_case(_edit_existing_checkpoint),
         r"already has checkpoint 'tiny' .*--resume.*--overwrite",
         post=_file_intact("pyramid/0_mip1in_t/model/tiny.state.pth.tar")),
    Case("tr_foreign_generated_files", "generated datasets of another pyramid, same name",
         "train", _train_case(_edit_foreign_generated),
         r"x128_y128_z1_MIP0_tiny.h5 exists, written by pyramid /elsewhere/other_pyramid"),
    Case("tr_tissue_smaller_than_crop", "stage whose tissue is smaller than its crop", "train",
         _train_case(_edit_small_tissue), r"tissue at MIP 1 is only 10 px across"),
]


# --------------------------------------------------------------------------------- running


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("METROEM_FAULT", None)
    env.pop("METROEM_TRAIN_SET", None)
    env.update(extra)
    return env


def _preexec(limit: int | None):
    if limit is None:
        return None

    def pre():  # a full disk: writes past `limit` bytes fail with EFBIG instead of a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def snapshot(paths: list[Path], ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``paths`` (hidden ones too) with a hash of its content and mode."""
    out = {}
    for root in paths:
        if root.is_file():
            out[str(root)] = _sha1(root)
            continue
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ignore]
            for name in files:
                p = Path(dirpath) / name
                if name in ignore:
                    continue
                try:
                    out[str(p)] = f"{_sha1(p)} {oct(p.stat().st_mode)}"
                except OSError as e:  # an unreadable file, on purpose
                    out[str(p)] = f"unreadable {e.errno} {oct(p.stat().st_mode)}"
    return out


_LEFTOVER = re.compile(r"^\..*(\.tmp-\d+|\.lock$)")


def leftovers(root: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Hidden temp or lock files under ``root`` (a failed command must leave none)."""
    out = []
    for dirpath, dirnames, files in os.walk(root):
        for name in files + dirnames:
            if _LEFTOVER.match(name) and name not in ignore:
                out.append(str(Path(dirpath, name).relative_to(root)))
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def run_case(case: Case, world: World, work: Path, timeout: float = 240,
             forker=None) -> Result:
    """Prepare, run and check one case in the empty folder ``work``: as a ``python``
    subprocess, or forked from ``forker`` (:func:`forked.forkserver`) when given."""
    work.mkdir(parents=True, exist_ok=True)
    prep = case.setup(world, work)
    watch = prep.watch if prep.watch is not None else [work]
    cmd = [sys.executable, *TOOLS[case.tool], *prep.argv]
    shown = _show(cmd, world, work)
    problems: list[str] = []
    try:
        before = snapshot(watch, prep.ignore)
        t0 = time.time()
        if forker is not None:
            proc = forked.run(forker, TOOLS[case.tool], list(prep.argv), work,
                              child_env(**prep.env), timeout, fsize_limit=prep.fsize_limit)
        else:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=str(work),
                env=child_env(**prep.env), preexec_fn=_preexec(prep.fsize_limit),
            )
        seconds = time.time() - t0
        after = snapshot(watch, prep.ignore)
    finally:
        if prep.cleanup is not None:
            prep.cleanup()
    errs = error_lines(proc.stderr)
    tail = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != case.exit_code:
        problems.append(f"exit {proc.returncode}, expected {case.exit_code}")
    if "Traceback" in proc.stderr:
        problems.append("a Traceback on stderr")
    if case.exit_code != 0:
        if len(errs) != 1:
            problems.append(f"{len(errs)} 'error:' lines on stderr, expected 1")
        elif tail[-1] != errs[0]:
            problems.append("the 'error:' line is not the last line on stderr")
        if errs and not re.search(case.expect, errs[0]):
            problems.append(f"message does not match /{case.expect}/")
        if before != after:
            changed = sorted(set(before.items()) ^ set(after.items()))
            names = sorted({os.path.relpath(k, work) for k, _ in changed})
            problems.append(f"files changed: {names[:5]}")
    left = leftovers(work, prep.ignore)
    if left:
        problems.append(f"left behind: {left[:5]}")
    if case.post is not None:
        problems += case.post(world, work)
    if case.exit_code == 0:
        message = f"(exit {proc.returncode}) " + (case.done if not problems else tail[-1] if tail
                                                   else "no output")
    else:
        message = errs[0] if errs else (tail[-1] if tail else "")
    return Result(case.name, case.klass, case.tool, shown, proc.returncode, case.exit_code,
                  _show_text(message, world, work), round(seconds, 2), problems)


def _show_text(text: str, world: World, work: Path) -> str:
    return text.replace(str(work), "$WORK").replace(str(world.root), "$WORLD")


def _show(cmd: list[str], world: World, work: Path) -> str:
    shown = ["python" if c == sys.executable else c for c in cmd]
    shown = [os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in shown]
    text = " ".join(_quote(c) for c in shown)
    return _show_text(text, world, work)


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:$=*,+-]+", arg) else json.dumps(arg)


def run_cases(cases: list[Case], world: World, work_root: Path, jobs: int = 3,
              forker=None) -> list[Result]:
    """Run ``cases`` (``jobs`` at a time), each in ``work_root/<name>``; results in order."""

    def one(case: Case) -> Result:
        work = work_root / case.name
        try:
            return run_case(case, world, work, forker=forker)
        except Exception as e:  # a broken setup is a failed case, not a crashed runner
            return Result(case.name, case.klass, case.tool, "", -1, case.exit_code, "", 0.0,
                          [f"setup or runner failed: {type(e).__name__}: {e}"])
        finally:
            _make_removable(work)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, cases))


def _make_removable(root: Path) -> None:
    """Give unreadable files back their permissions so the folder can be deleted."""
    for dirpath, dirnames, files in os.walk(root):
        for name in files + dirnames:
            with contextlib.suppress(OSError):
                p = Path(dirpath, name)
                if not p.is_symlink():
                    p.chmod(0o755 if p.is_dir() else 0o644)
