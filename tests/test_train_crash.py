"""Crash safety: SIGTERM (preemption) and SIGKILL at many points, then --resume, must end with
weights identical (torch.equal) to an uninterrupted run.

SIGTERM tests run the repository's train.py in a fresh interpreter. The SIGKILL test needs
dozens of runs, so its runs are forked from a forkserver that has already imported torch and
metroem (each run is a real process calling ``metroem.training.cli.main``, what train.py calls,
and is really killed with SIGKILL); that saves ~5 s of imports per run.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import forked
import pytest
import torch
from conftest import REPO, TinyRun, run_train_py, subprocess_env

from metroem import modules
from metroem.training import checkpoint as ckpt

pytestmark = pytest.mark.slow

STAGES = (0, 1)


def _forked_main(argv: list[str], fault: str | None, log_path: str) -> None:
    """Child process: one train.py run with its output in ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop("METROEM_FAULT", None)
    if fault:
        os.environ["METROEM_FAULT"] = fault
    torch.set_num_threads(1)
    from metroem.training import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def forker():
    """Warm before the reference run is timed: its duration sets the random kill moments."""
    return forked.forkserver()


def start(forker, argv: list[str], log: Path, fault: str | None = None):
    p = forker.Process(target=_forked_main, args=(argv, fault, str(log)))
    p.start()
    return p


def fresh_copy(world, dst: Path) -> TinyRun:
    shutil.copytree(world.data, dst / "data")
    shutil.copytree(world.pyramid, dst / "pyramid")
    return TinyRun(dst, dst / "data", dst / "pyramid", world.volume)


def final_weights(run: TinyRun, checkpoint: str = "tiny") -> dict[int, dict]:
    return {s: run.weights(s, checkpoint) for s in STAGES}


def assert_same(a: dict[int, dict], b: dict[int, dict], what: str) -> None:
    for stage in STAGES:
        assert a[stage].keys() == b[stage].keys()
        diff = [k for k in a[stage] if not torch.equal(a[stage][k], b[stage][k])]
        assert not diff, f"{what}: stage {stage} weights differ in {diff[:3]}"


def assert_checkpoints_load(run: TinyRun, checkpoint: str = "tiny") -> None:
    """Whatever checkpoint files exist load cleanly (weights_only) after a crash."""
    for stage in STAGES:
        module = run.module(stage)
        weights = modules.weights_path(module, checkpoint)
        if weights.exists():
            state = torch.load(weights, weights_only=True)
            assert state and all(torch.isfinite(v).all() for v in state.values())
        state_path = ckpt.training_state_path(module, checkpoint)
        if state_path.exists():
            ckpt.load_training_state(state_path, restore_rng=False)
        for path in (module / "model").iterdir():  # temp files are hidden, never final names
            assert path.name.startswith(".") or path.name == "model_spec.json" or \
                path.name.endswith((modules.WEIGHTS_SUFFIX, ckpt.STATE_SUFFIX)), path


def assert_no_leftovers(run: TinyRun) -> None:
    for stage in STAGES:
        left = [p.name for p in run.module(stage).rglob(".*.tmp-*")]
        assert not left, f"the resumed run left {left}"


@pytest.fixture(scope="module")
def reference(tiny_world, tmp_path_factory, forker):
    """One uninterrupted run: its final weights and its duration."""
    run = fresh_copy(tiny_world, tmp_path_factory.mktemp("reference"))
    t0 = time.time()
    p = start(forker, run.argv("tiny", "--no_redirect_stdout"), run.root / "log.txt")
    p.join(300)
    assert p.exitcode == 0, (run.root / "log.txt").read_text()[-2000:]
    return final_weights(run), time.time() - t0


# --- SIGTERM: preemption -------------------------------------------------------------------


def test_sigterm_at_a_step_exits_143_and_resume_is_identical(tiny_world, tmp_path, reference):
    run = fresh_copy(tiny_world, tmp_path)
    argv = run.argv("tiny")
    stopped = run_train_py(argv, METROEM_FAULT="sigterm@step=3,stage=1")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]  # not finished
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("training stopped: stage 1 stopped at step 3")
    assert "Traceback" not in stopped.stderr
    state = ckpt.load_training_state(ckpt.training_state_path(run.module(1), "tiny"),
                                     restore_rng=False)
    assert state.step == 3 and not state.extra["final"]
    assert "stage 1 stopped at step 3" in (run.pyramid / "_runs/tiny/train.log").read_text()
    resumed = run_train_py([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 1: resumed at step 3" in resumed.stderr
    assert_same(final_weights(run), reference[0], "SIGTERM at stage 1 step 3")


def test_external_sigterm_once_a_checkpoint_exists(tiny_world, tmp_path, forker):
    """A real SIGTERM from outside, sent as soon as the first checkpoint is on disk."""
    argv_extra = ["--no_redirect_stdout", "--train_stages", "0", "--set", "train.steps=60",
                  "--set", "train.checkpoint_every=10", "--set", "train.val_every=0",
                  "--set", "train.image_every=0"]
    ref_run = fresh_copy(tiny_world, tmp_path / "ref")
    p = start(forker, ref_run.argv("tiny", *argv_extra), tmp_path / "ref.txt")
    run = fresh_copy(tiny_world, tmp_path / "run")
    argv = run.argv("tiny", *argv_extra)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=str(REPO),
                            env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state_path = ckpt.training_state_path(run.module(0), "tiny")
    try:
        deadline = time.time() + 120
        while not state_path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert state_path.exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "training stopped" in err and "Traceback" not in err
    state = ckpt.load_training_state(state_path, restore_rng=False)
    assert 10 <= state.step < 60, "the signal should land during training"
    p.join(300)
    assert p.exitcode == 0, (tmp_path / "ref.txt").read_text()[-2000:]
    log = tmp_path / "resume.txt"
    p = start(forker, [*argv, "--resume"], log)
    p.join(300)
    assert p.exitcode == 0, log.read_text()[-2000:]
    assert f"resumed at step {state.step}" in log.read_text()
    ref, got = ref_run.weights(0), run.weights(0)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# --- SIGKILL at many points ----------------------------------------------------------------

# Checkpoints of one run: stage 0 at steps 2, 4, 6 (final), stage 1 at steps 2, 4, 6 (final).
FAULT_KILLS = [
    "kill9@step=1,stage=0",
    "kill9@step=4,stage=0",
    "kill9@step=1,stage=1",
    "kill9@step=5,stage=1",
] + [f"kill9@save={n},file={f}" for n in range(1, 7) for f in ("weights", "state")]
RANDOM_KILLS = 6


def test_kill9_anywhere_then_resume_is_identical(tiny_world, tmp_path, reference, forker):
    """Each trial: a fresh run SIGKILLed at one point (a fault hook, or a random moment),
    whatever checkpoint exists must load, and --resume must end at the reference weights."""
    ref, seconds = reference
    rng = random.Random(1234)
    plan = [("fault", f) for f in FAULT_KILLS] + [("time", None)] * (RANDOM_KILLS + 6)
    killed = 0
    for i, (kind, fault) in enumerate(plan):
        if kind == "time" and killed >= len(FAULT_KILLS) + RANDOM_KILLS:
            break
        run = fresh_copy(tiny_world, tmp_path / f"trial{i}")
        log = run.root / "log.txt"
        argv = run.argv("tiny", "--no_redirect_stdout", "--resume")
        delay = rng.uniform(0.02, 0.9) * seconds
        what = fault if kind == "fault" else f"{delay:.2f} s"
        t0 = time.time()
        p = start(forker, argv, log, fault=fault)
        if kind == "time":
            p.join(delay)
            if p.is_alive():
                p.kill()
        p.join(120)
        if p.exitcode == 0:  # finished before the random moment: a clean run, no kill
            assert kind == "time", f"{what} did not kill: {log.read_text()[-2000:]}"
            seconds = time.time() - t0  # adapt to the machine's current speed
        else:
            assert p.exitcode == -signal.SIGKILL, f"{what}: exit {p.exitcode}\n{log.read_text()}"
            killed += 1
            assert_checkpoints_load(run)
            p = start(forker, argv, log)
            p.join(120)
            assert p.exitcode == 0, f"resume after {what}: {log.read_text()[-2000:]}"
        assert_same(final_weights(run), ref, f"kill at {what}")
        assert_no_leftovers(run)
        shutil.rmtree(run.root)
    assert killed >= 20


def test_second_train_py_on_the_same_module_is_refused(tiny_world, tmp_path):
    run = fresh_copy(tiny_world, tmp_path)
    argv = run.argv("tiny", "--no_redirect_stdout", "--train_stages", "0",
                    "--set", "train.steps=100000", "--set", "train.checkpoint_every=0")
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=str(REPO),
                             env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = run.pyramid / ".0_mip1in_tiny.lock"
    try:
        deadline = time.time() + 120
        while not (run.pyramid / "_runs" / "tiny").exists() and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)
        assert lock.read_text().strip() == str(first.pid)
        second = run_train_py(argv)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: another process")
        assert f"pid {first.pid}" in lines[0]
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 128 + signal.SIGTERM and "training stopped" in err
        assert not lock.exists()  # released on the way out
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
