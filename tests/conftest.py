"""Shared fixtures: a tiny demo volume with datasets and a tiny 2-stage pyramid (MIP 1 -> 0).

The volume, datasets and pyramid definition are built once per session; each test that trains
gets its own copy (``tiny_run``) so runs never see each other's files.

Tests that need the shared data beside the checkout (tests/helpers.py) get it through
``helpers.shared_data(name)`` or the ``needs_shared`` marker and are skipped without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    SHARED_DATA,
    SHARED_ENV,
    have_shared,
    shared_data,
    skip_reason,
    tiny_pyramid,
)

from metroem import demo_pipeline, demo_volume, modules, nets

# The package reads the shared data's location from the environment only; the checkout's
# default (../shared/data) is set here, for the library calls and subprocesses of the tests.
os.environ.setdefault(SHARED_ENV, str(SHARED_DATA))

MIPS = (1, 0)  # stage 0 at MIP 1, stage 1 at MIP 0

# A training config small enough that one step takes milliseconds on one CPU thread.
TINY_OVERRIDES = [
    "data.batch_size=2",
    "data.crop_size=64",
    "data.val_fraction=0.25",
    "optimizer.lr=1.0e-3",
    "schedule.warmup_steps=2",
    "train.steps=6",
    "train.log_every=2",
    "train.image_every=3",
    "train.val_every=3",
    "train.checkpoint_every=2",
    "augment.same_section.p=0.5",
    "augment.same_section.translation=4.0",
]


# --- the shared data beside the checkout ---------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs_shared(*names): needs the shared data sets (default 'isbi') beside the "
        "checkout; skipped without them (tests/helpers.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_shared"):
        for name in mark.args or ("isbi",):
            if not have_shared(name):
                pytest.skip(skip_reason(name))


# --- tiny worlds ----------------------------------------------------------------------------


def tiny_spec() -> dict:
    return nets.default_spec(channels=[4, 8, 8], head_channels=4, local_radius=1,
                             global_radius=2)


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    volume: demo_volume.DemoVolume
    data: Path  # datasets at MIP 1 and 0 (+ ground truth), never written by tests
    pyramid: Path  # pyramid definition without weights, never written by tests


@dataclass(frozen=True)
class TinyRun:
    """A private copy of the datasets and the pyramid for one test."""

    root: Path
    data: Path
    pyramid: Path
    volume: demo_volume.DemoVolume

    def argv(self, checkpoint: str = "tiny", *extra: str, tiny: bool = True) -> list[str]:
        """train.py arguments for this run (scratch mode with the tiny overrides)."""
        out = ["--pyramid_path", str(self.pyramid), "--dataset_path", str(self.data),
               "--checkpoint_name", checkpoint, "--train_mode", "scratch", "--device", "cpu"]
        if tiny:
            for o in TINY_OVERRIDES:
                out += ["--set", o]
        return out + list(extra)

    def module(self, stage: int) -> Path:
        return next(m.path for m in modules.discover(self.pyramid) if m.stage == stage)

    def weights(self, stage: int, checkpoint: str = "tiny") -> dict:
        path = modules.weights_path(self.module(stage), checkpoint)
        return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    root = tmp_path_factory.mktemp("tiny_world")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vol = demo_volume.build_demo_volume(
            root / "volume", num_sections=5, size=256, num_mips=3, seed=0, chunk_xy=128,
            sections_dir=shared_data("isbi") if have_shared("isbi") else None, drift=8.0,
            elastic=2.0,
        )
        demo_pipeline.cut_datasets(vol, str(root / "data"), list(MIPS))
    finally:
        torch.set_num_threads(threads)
    tiny_pyramid(root / "pyramid", tiny_spec(), MIPS, suffix="tiny")
    return TinyWorld(root, vol, root / "data", root / "pyramid")


@pytest.fixture
def tiny_run(tiny_world, tmp_path) -> TinyRun:
    data, pyramid = tmp_path / "data", tmp_path / "pyramid"
    shutil.copytree(tiny_world.data, data)
    shutil.copytree(tiny_world.pyramid, pyramid)
    return TinyRun(tmp_path, data, pyramid, tiny_world.volume)


@pytest.fixture
def one_thread():
    """Training on tiny tensors: one thread is faster, fair to a shared CPU and reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("METROEM_FAULT", None)
    env.update(extra)
    return env


def run_train_py(argv: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """Run the repository's train.py in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv], capture_output=True, text=True,
        timeout=timeout, env=subprocess_env(**env), cwd=str(REPO),
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (hidden ones too) under ``root`` with its size and mtime."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out
