"""torchrun: two CPU processes (gloo) train the tiny pyramid; a NaN on one rank only makes
every rank skip the same step, and training finishes (no deadlock: every run has a timeout)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO, subprocess_env

from metroem import datasets, modules
from metroem.training import checkpoint as ckpt
from metroem.training import distributed as dist

TIMEOUT_S = 300


def torchrun(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(REPO / "train.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=subprocess_env(**env), cwd=str(REPO))


@pytest.mark.slow
def test_two_processes_train_and_write_one_checkpoint(tiny_run):
    res = torchrun(tiny_run.argv("ddp", "--no_redirect_stdout"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world size 2" in res.stderr
    for stage in (0, 1):
        model_dir = tiny_run.module(stage) / "model"
        names = sorted(p.name for p in model_dir.iterdir())
        assert names == ["ddp.state.pth.tar", "ddp.training.pt", "model_spec.json"]
        state = torch.load(model_dir / "ddp.state.pth.tar", weights_only=True)
        assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DDP
        restored = ckpt.load_training_state(model_dir / "ddp.training.pt", restore_rng=False)
        assert restored.step == 6 and restored.extra["final"]
    assert (tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "ddp")).exists()
    assert res.stderr.count("stage 1 done: 6 steps") == 1  # only rank 0 logs


@pytest.mark.slow
def test_nan_on_rank_1_only_is_skipped_by_every_rank(tiny_run):
    res = torchrun(tiny_run.argv("ddp", "--no_redirect_stdout", "--train_stages", "0"),
                   METROEM_FAULT="nan@step=3,rank=1")
    assert res.returncode == 0, res.stderr[-3000:]
    # rank 0 computed a finite loss at step 3, yet it skipped the step too
    assert "step 3: non-finite loss or gradient, skipped (1 of at most 20)" in res.stderr
    state = ckpt.load_training_state(
        ckpt.training_state_path(tiny_run.module(0), "ddp"), restore_rng=False
    )
    assert state.step == 6 and state.extra["skipped"] == 1
    weights = torch.load(modules.weights_path(tiny_run.module(0), "ddp"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_single_process_collectives_are_local():
    info = dist.DistInfo()
    cpu = torch.device("cpu")
    assert dist.agree(info, False, True, cpu) == (False, True)
    assert dist.all_true(info, True) and not dist.all_true(info, False)
    assert dist.mean_scalar(info, 2.5, cpu) == 2.5
