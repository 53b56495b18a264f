"""The shipped pyramids by name: ``load_aligner("isbi")``, ``metroem align --pyramid_path isbi``.

Each entry says what a pyramid is for, which module folders and checkpoint it has, the
SHA-256 of every weights file, the command that trains it (its config is the pyramid's own
``train.yaml``, so a copy trains the same way) and where its measured quality is recorded. The
pyramids themselves live in the repository's ``models/`` folder, which installs as the data
package ``metroem_models``. A folder of the same name in the working folder is used instead only
when it is a pyramid itself (module folders inside: a user's trained copy); any other folder
of that name (a demo volume called ``demo``) does not hide the shipped pyramid.

A pretrained pyramid is read-only: train a copy (:func:`copy_pyramid`, ``metroem pretrained
copy NAME DEST``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from metroem import logs, modules
from metroem.errors import MetroemError, cli_errors

log = logging.getLogger(__name__)

__all__ = ["Pretrained", "REGISTRY", "names", "pyramid_path", "resolve", "verify",
           "copy_pyramid"]

PACKAGE = "metroem_models"


@dataclass(frozen=True)
class Pretrained:
    """One shipped pyramid."""

    name: str
    summary: str
    checkpoint: str
    modules: tuple[str, ...]  # module folder names, coarse to fine
    sha256: dict[str, str]  # module folder name -> SHA-256 of its weights file
    recipe: str  # the command that trains it from the raw data
    resolution_nm: float | None  # MIP0 pixel size of the data it was trained on
    results: tuple[str, ...] = field(default=())  # where its measured quality is recorded

    @property
    def config(self) -> str:
        """Its training config, inside the pyramid folder (train.py's default for it)."""
        return "train.yaml"


REGISTRY: dict[str, Pretrained] = {p.name: p for p in (
    Pretrained(
        name="isbi",
        summary="real EM at 4 nm px (ISBI 2012 ssTEM + FIB-SEM neighbours): stages at MIP 2, 1, 0",
        checkpoint="isbi",
        modules=("0_mip2in_isbi", "1_mip1in_isbi", "2_mip0in_isbi"),
        sha256={
            "0_mip2in_isbi": "44a974b9210ce0b3450f8d64c365a9de78049c58ba1d407aeb16a9225f44d70a",
            "1_mip1in_isbi": "c44ae11d35dad3b07ddd2240c4708fe21a0aa90134746a7d2c8f160379a5ee88",
            "2_mip0in_isbi": "0ba59462ba886cf621678e51949d6d16d71f68b75ff07d05c012048e612df091",
        },
        recipe="make isbi",
        resolution_nm=4.0,  # trained on 4 nm ssTEM and on 10 nm FIB-SEM resampled to 4-16 nm
        results=("benchmarks/results/neighbours.md", "benchmarks/results/quality.md",
                 "benchmarks/results/stack.md", "benchmarks/results/speed.md"),
    ),
    Pretrained(
        name="demo",
        summary="the demo volume (procedural EM-like sections): stages at MIP 3, 2, 1",
        checkpoint="demo",
        modules=("0_mip3in_demo", "1_mip2in_demo", "2_mip1in_demo"),
        sha256={
            "0_mip3in_demo": "b11ca87b291e7dc4aa1179b0acbe2cefd9a5d5dc9e81e37a96651ccdddb61b97",
            "1_mip2in_demo": "2b0067b77b264cb5a7e1e8b9b9613ad8793fbf3bcf607d562772502f5d677c2b",
            "2_mip1in_demo": "d330794216eea9f1ddfce9e9efa32941c5a43a2eacab29531d23c0b6924feb1b",
        },
        recipe="make demo",
        resolution_nm=None,
        results=("benchmarks/results/demo_run.md",),
    ),
)}


def names() -> list[str]:
    return sorted(REGISTRY)


def _entry(name: str) -> Pretrained:
    if name not in REGISTRY:
        raise MetroemError(f"no pretrained pyramid {name!r}; known: {', '.join(names())}")
    return REGISTRY[name]


def pyramid_path(name: str) -> Path:
    """The installed folder of pretrained pyramid ``name``."""
    entry = _entry(name)
    try:
        root = Path(str(importlib.resources.files(PACKAGE)))
    except ModuleNotFoundError:
        root = None
    if root is None or not (root / entry.name).is_dir():
        raise MetroemError(
            f"pretrained pyramid {name!r} is not installed (package {PACKAGE}); reinstall "
            "metroem (pip install -e . in a checkout)"
        )
    return root / entry.name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Check that pyramid ``name`` (at ``folder``, default: the installed one) has exactly the
    registered module folders and weights; returns its folder."""
    entry = _entry(name)
    root = Path(folder) if folder is not None else pyramid_path(name)
    found = tuple(m.name for m in modules.discover(root))
    if found != entry.modules:
        raise MetroemError(f"{root} holds modules {', '.join(found)}, not the registered "
                           f"{', '.join(entry.modules)}; reinstall metroem")
    for module, expected in entry.sha256.items():
        path = modules.weights_path(root / module, entry.checkpoint)
        if not path.is_file():
            raise MetroemError(f"{path} is missing; reinstall metroem")
        if _sha256(path) != expected:
            raise MetroemError(f"{path} does not match its registered SHA-256 (changed or "
                               "corrupt); reinstall metroem, or train a copy under another name")
    return root


def resolve(pyramid: str | os.PathLike) -> Path:
    """A pyramid folder: ``pyramid`` itself when it is a path that exists (and, for a
    shipped pyramid's name, holds module folders), else the pretrained pyramid of that name
    (checked against the registry)."""
    path = Path(pyramid).expanduser()
    if str(pyramid) not in REGISTRY:
        return path
    if path.exists():
        if path.is_dir() and any(modules._looks_like_module(e) for e in path.iterdir()):
            log.info("pyramid %r: the folder %s (not the shipped pyramid of that name)",
                     str(pyramid), path.resolve())
            return path
        log.info("%s is not a pyramid folder; using the shipped pyramid %r", path, str(pyramid))
    root = verify(str(pyramid))
    log.info("pretrained pyramid %r: %s", str(pyramid), root)
    return root


def copy_pyramid(name: str, dst: str | os.PathLike, weights: bool = False) -> Path:
    """Copy pretrained pyramid ``name`` to ``dst`` (which must not exist) for training:
    module folders, ``train.yaml`` and ``pyramid.json``; the weights too with ``weights``
    (to finetune them). Copied into a temporary sibling and renamed into place."""
    src = verify(name)
    dst = Path(dst).expanduser()
    if dst.exists():
        raise MetroemError(f"{dst} already exists; pick a new folder for the copy")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    ignore = ["__pycache__", "__init__.py"] + ([] if weights else ["*.pth*", "*.training.pt"])
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*ignore))
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _describe(entry: Pretrained) -> str:
    try:
        where, state = str(verify(entry.name)), "weights verified"
    except MetroemError as e:
        where, state = "-", f"unusable: {e}"
    resolution = f"{entry.resolution_nm:g} nm px" if entry.resolution_nm else "no pixel size"
    return "\n".join([
        f"{entry.name}: {entry.summary}",
        f"  modules     {', '.join(entry.modules)} (checkpoint {entry.checkpoint!r}, "
        f"{resolution})",
        f"  folder      {where} ({state})",
        f"  trained by  {entry.recipe} (config: its {entry.config})",
        f"  measured in {', '.join(entry.results) or '-'}",
    ])


def build_parser():
    from metroem import cliargs

    p = cliargs.Parser(
        prog="metroem pretrained",
        description="List the shipped pyramids (usable by name: metroem align --pyramid_path "
        "isbi ...), or copy one to train or finetune it.",
        epilog="example: metroem pretrained copy isbi ~/pyramids/mine --weights",
    )
    sub = p.add_subparsers(dest="action")
    ls = sub.add_parser("list", help="the pyramids, their modules, recipes and results (default)")
    c = sub.add_parser("copy", help="copy a pyramid to a new folder (to train it)")
    c.add_argument("name", choices=names())
    c.add_argument("dest", help="new folder")
    c.add_argument("--weights", action="store_true", help="copy the weights too (finetuning)")
    cliargs.add_common(p, threads_flag=False)
    for s in (ls, c):  # -v / -q after the action too
        logs.add_arguments(s, default=argparse.SUPPRESS)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    from metroem import cliargs

    a = cliargs.parse_args(build_parser(), argv)
    if a.action == "copy":
        dst = copy_pyramid(a.name, a.dest, weights=a.weights)
        what = "with" if a.weights else "without"
        print(f"copied {a.name} to {dst} ({what} weights); train it with: train.py "
              f"--pyramid_path {dst} --dataset_path DATA --checkpoint_name NAME")
    else:
        print("\n\n".join(_describe(REGISTRY[n]) for n in names()))
    return 0
