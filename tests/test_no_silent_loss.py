"""Issue 15: retraining, stopped runs, generated fields and config precedence never quietly
discard or mix work. Everything goes through the real command lines (``train.py``'s
``cli.main``, ``metroem align``) on the tiny two-stage pyramid of conftest.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import snapshot
from PIL import Image

from metroem import align, modules
from metroem.training import checkpoint as ckpt
from metroem.training import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def train(argv: list[str]) -> int:
    """cli.main as train.py runs it: the exit status (errors exit 2 through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


def run_align(argv: list[str]) -> int:
    try:
        return align.main(argv)
    except SystemExit as e:
        return int(e.code)


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0]
    return lines[0]


def stage0(run, name: str, *extra: str) -> list[str]:
    return run.argv(name, "--train_stages", "0", "--generate_field_stages",
                    "--no_redirect_stdout", *extra)


def default_checkpoint(run, stage: int) -> str | None:
    return modules.read_spec(run.module(stage))[1]


def sections(tmp_path) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    a = rng.integers(1, 255, (64, 64), dtype=np.uint8)
    paths = (str(tmp_path / "s.png"), str(tmp_path / "t.png"))
    Image.fromarray(a).save(paths[0])
    Image.fromarray(np.roll(a, 2, axis=1)).save(paths[1])
    return paths


# --- item 4: a rerun without --resume never throws a checkpoint away ------------------------


def test_rerun_without_resume_is_refused_and_keeps_the_checkpoint(tiny_run, capsys):
    argv = stage0(tiny_run, "tiny")
    assert train(argv) == 0
    weights = modules.weights_path(tiny_run.module(0), "tiny")
    kept = weights.read_bytes()
    capsys.readouterr()
    before = snapshot(tiny_run.root)
    assert train([*argv, "--set", "train.steps=2"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "already has checkpoint 'tiny' (finished, 6 steps)" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(tiny_run.root) == before and weights.read_bytes() == kept
    assert train([*argv, "--resume", "--overwrite"]) == 2
    assert "not both" in error_line(capsys.readouterr().err)
    assert train([*argv, "--overwrite", "--set", "train.steps=2"]) == 0
    state = ckpt.load_checkpoint(tiny_run.module(0), "tiny", restore_rng=False)
    assert state.step == 2 and state.extra["final"]


# --- item 5: a stopped run is told apart and never silently used ------------------------------


def test_stopped_run_exits_nonzero_and_never_becomes_the_default(tiny_run, capsys, monkeypatch,
                                                                 tmp_path):
    assert train(tiny_run.argv("a", "--no_redirect_stdout")) == 0  # both stages, finished
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("training finished: stage(s) 0, 1 trained to checkpoint 'a'")
    monkeypatch.setenv("METROEM_FAULT", "sigterm@step=3,stage=0")
    assert train(stage0(tiny_run, "b")) == 143  # 128 + SIGTERM: not finished
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("training stopped: stage 0 stopped at step 3")
    monkeypatch.delenv("METROEM_FAULT")
    assert default_checkpoint(tiny_run, 0) == "a"  # the stopped 'b' is not the default
    assert ckpt.checkpoint_status(tiny_run.module(0), "b").describe() == \
        "UNFINISHED: stopped at step 3 of 6"
    src, tgt = sections(tmp_path)
    base = [str(tiny_run.pyramid), "--src", src, "--tgt", tgt, "--no_progress"]
    assert run_align([*base, "--field_out", str(tmp_path / "f1.npy")]) == 0
    err = capsys.readouterr().err
    assert "stage 0 (0_mip1in_tiny): checkpoint 'a' (finished, 6 steps)" in err
    assert "stage 1 (1_mip0in_tiny): checkpoint 'a' (finished, 6 steps)" in err
    # naming the unfinished checkpoint loads it, flagged
    assert run_align([*base, "--checkpoint_name", "b,a", "--field_out",
                      str(tmp_path / "f2.npy")]) == 0
    assert "checkpoint 'b' (UNFINISHED: stopped at step 3 of 6)" in capsys.readouterr().err
    # finishing 'b' for stage 0 only makes the defaults differ: loading refuses a silent mix
    assert train([*stage0(tiny_run, "b"), "--resume"]) == 0
    assert default_checkpoint(tiny_run, 0) == "b"
    capsys.readouterr()
    assert run_align([*base, "--field_out", str(tmp_path / "f3.npy")]) == 2
    line = error_line(capsys.readouterr().err)
    assert "default checkpoints differ (stage 0: b, stage 1: a)" in line
    assert "--checkpoint_name b,a" in line
    assert not (tmp_path / "f3.npy").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unfinished_default_is_refused(tiny_run, capsys, monkeypatch, tmp_path):
    """A checkpoint name retrained with --overwrite and stopped keeps its old default entry:
    loading by default must notice that its weights are now a stopped run's."""
    assert train(stage0(tiny_run, "a")) == 0
    monkeypatch.setenv("METROEM_FAULT", "sigterm@step=3,stage=0")
    assert train([*stage0(tiny_run, "a"), "--overwrite"]) == 143
    monkeypatch.delenv("METROEM_FAULT")
    capsys.readouterr()
    src, tgt = sections(tmp_path)
    assert run_align([str(tiny_run.pyramid), "--stages", "0", "--src", src, "--tgt", tgt,
                      "--field_out", str(tmp_path / "f.npy"), "--no_progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "did not finish" in line and "--resume" in line and "--checkpoint_name a" in line
    doc = json.loads((tiny_run.module(0) / "model" / "model_spec.json").read_text())
    assert doc["default_checkpoint"] == "a"
