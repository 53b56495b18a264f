"""Issue 15: retraining, stopped runs, generated fields and config precedence never quietly
discard or mix work. Everything goes through the real command lines (``train.py``'s
``cli.main``, ``metroem align``) on the tiny two-stage pyramid of conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
from conftest import snapshot
from PIL import Image
from test_training import train

from metroem import datasets, generate, inference, modules, nets
from metroem.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


def run_align(argv: list[str]) -> int:
    try:
        return inference.main(argv)
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
    out = capsys.readouterr().err.strip().splitlines()
    assert out[-1].startswith("training finished: stage(s) 0, 1 trained to checkpoint 'a'")
    monkeypatch.setenv("METROEM_FAULT", "sigterm@step=3,stage=0")
    assert train(stage0(tiny_run, "b")) == 143  # 128 + SIGTERM: not finished
    out = capsys.readouterr().err.strip().splitlines()
    assert out[-1].startswith("training stopped: stage 0 stopped at step 3")
    monkeypatch.delenv("METROEM_FAULT")
    assert default_checkpoint(tiny_run, 0) == "a"  # the stopped 'b' is not the default
    assert ckpt.checkpoint_status(tiny_run.module(0), "b").describe() == \
        "UNFINISHED: stopped at step 3 of 6"
    src, tgt = sections(tmp_path)
    base = ["--pyramid_path", str(tiny_run.pyramid), "--src", src, "--tgt", tgt, "--no_progress"]
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
    assert run_align(["--pyramid_path", str(tiny_run.pyramid), "--stages", "0", "--src", src,
                      "--tgt", tgt, "--field_out", str(tmp_path / "f.npy"), "--no_progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "did not finish" in line and "--resume" in line and "--checkpoint_name a" in line
    doc = json.loads((tiny_run.module(0) / "model" / "model_spec.json").read_text())
    assert doc["default_checkpoint"] == "a"


# --- item 6: generated datasets are never replaced silently -----------------------------------


def test_second_pyramid_cannot_replace_the_fields_of_the_first(tiny_run, capsys):
    other = tiny_run.root / "other_pyramid"
    shutil.copytree(tiny_run.pyramid, other)  # untrained copy: another pyramid, same data
    argv = tiny_run.argv("v1", "--train_stages", "0", "--no_redirect_stdout")
    assert train(argv) == 0  # trains stage 0 and generates the fields stage 1 needs
    field = tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "v1")
    recut = tiny_run.data / "x128_y128_z1_MIP0_v1.h5"
    kept = field.read_bytes(), recut.read_bytes()
    made_by = datasets.read_field_dataset(str(field), load_data=False).attrs["pyramid"]
    assert made_by == str(tiny_run.pyramid.resolve())
    capsys.readouterr()
    before = snapshot(tiny_run.root)
    theirs = [a if a != str(tiny_run.pyramid) else str(other) for a in argv]
    assert train(theirs) == 2
    line = error_line(capsys.readouterr().err)
    assert field.name in line and f"written by pyramid {tiny_run.pyramid.resolve()}" in line
    assert "--overwrite" in line
    assert snapshot(tiny_run.root) == before  # checked before training: nothing written
    assert (field.read_bytes(), recut.read_bytes()) == kept
    assert train([*theirs, "--overwrite"]) == 0
    assert datasets.read_field_dataset(str(field), load_data=False).attrs["pyramid"] == \
        str(other.resolve())


def test_generate_cli_keeps_existing_files_unless_told(tiny_run, capsys):
    assert train(tiny_run.argv("v1", "--train_stages", "0", "--no_redirect_stdout")) == 0
    field = tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "v1")
    base = ["--pyramid_path", str(tiny_run.pyramid), "--dataset_path", str(tiny_run.data),
            "--checkpoint_name", "v1", "--stage", "0"]
    mtime = field.stat().st_mtime_ns
    capsys.readouterr()
    assert generate.main(base) == 0  # same pyramid, same weights: up to date, kept
    assert "is up to date" in capsys.readouterr().err and field.stat().st_mtime_ns == mtime
    # new weights for the same name: the old fields are not replaced without --overwrite
    other = nets.build_model(modules.read_spec(tiny_run.module(0))[0])
    modules.save_weights(tiny_run.module(0), "v1", other.state_dict())
    try:
        generate.main(base)
    except SystemExit as e:
        assert e.code == 2
    line = error_line(capsys.readouterr().err)
    assert "written by this pyramid in an earlier run" in line and "--overwrite" in line
    assert field.stat().st_mtime_ns == mtime
    assert generate.main([*base, "--overwrite"]) == 0
    assert field.stat().st_mtime_ns != mtime


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_field_generation_then_rerun(tiny_run, capsys, monkeypatch, presses):
    """Ctrl-C while the fields after stage 0 are generated: one press finishes the fields and
    stops before stage 1; two presses interrupt the generation itself. Either way nothing
    half-written is left, the run does not look finished, and --resume completes it."""
    real = generate.geometry.remove_translation

    def ctrl_c(*args, **kwargs):
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(generate.geometry, "remove_translation", ctrl_c)
    argv = tiny_run.argv("v1", "--no_redirect_stdout")
    assert train(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("training stopped: stopped after stage 0" if presses == 1
                           else "interrupted")
    assert not list(tiny_run.root.rglob(".*.tmp-*")) and not list(tiny_run.root.rglob(".*.lock"))
    field = tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "v1")
    assert field.exists() == (presses == 1)
    assert not modules.weights_path(tiny_run.module(1), "v1").exists()
    monkeypatch.setattr(generate.geometry, "remove_translation", real)
    assert train(argv) == 2  # a plain rerun would throw stage 0's checkpoint away
    assert "--resume" in error_line(capsys.readouterr().err)
    assert train([*argv, "--resume"]) == 0
    out = capsys.readouterr().err
    assert ("is up to date" in out) == (presses == 1)
    assert out.strip().splitlines()[-1].startswith("training finished")
    assert datasets.read_field_dataset(str(field), load_data=False).attrs["pyramid"] == \
        str(tiny_run.pyramid.resolve())


# --- item 7: config precedence ----------------------------------------------------------------


def test_command_line_beats_the_recipes_per_mip_value(tiny_run, capsys):
    recipe = tiny_run.root / "recipe.yaml"
    recipe.write_text("train:\n  steps: 40\nper_mip:\n  1:\n    train:\n      steps: 30\n"
                      "    data:\n      batch_size: 2\n")
    argv = stage0(tiny_run, "tiny", "--train_params_path", str(recipe),
                  "--set", "train.steps=3")
    assert train(argv) == 0
    err = capsys.readouterr().err
    assert "--set train.steps=3 replaces per_mip.1.train.steps=30" in err
    state = ckpt.load_checkpoint(tiny_run.module(0), "tiny", restore_rng=False)
    assert state.step == 3  # was 30: the recipe's per-MIP value won silently
    assert state.config["data"]["batch_size"] == 2  # other per-MIP values still apply


def test_resume_with_a_changed_config_says_what_changed(tiny_run, capsys, monkeypatch):
    monkeypatch.setenv("METROEM_FAULT", "sigterm@step=3,stage=0")
    assert train(stage0(tiny_run, "tiny")) == 143
    monkeypatch.delenv("METROEM_FAULT")
    capsys.readouterr()
    assert train([*stage0(tiny_run, "tiny"), "--resume", "--set", "train.steps=8"]) == 0
    out = capsys.readouterr().err
    assert "config differs from the checkpoint's (train.steps: 6 -> 8)" in out
    assert ckpt.load_checkpoint(tiny_run.module(0), "tiny", restore_rng=False).step == 8


# --- item 8: settings that cannot work are refused ----------------------------------------------


def test_stage_whose_tissue_is_smaller_than_its_crop_is_refused(tiny_run, capsys):
    path = tiny_run.data / "x128_y128_z1_MIP1.h5"
    data = datasets.read_image_dataset(str(path))
    small = np.zeros_like(data.data)
    small[:, :, 60:70, 60:70] = data.data[:, :, 60:70, 60:70]  # a 10 px island of tissue
    small[:, :, 60:70, 60:70] = np.maximum(small[:, :, 60:70, 60:70], 1)
    datasets.write_image_dataset(str(path), small, dict(data.attrs), overwrite=True,
                                 translation=data.translation)
    before = snapshot(tiny_run.root)
    assert train(stage0(tiny_run, "tiny")) == 2
    line = error_line(capsys.readouterr().err)
    assert "tissue at MIP 1 is only 10 px across" in line and "data.crop_size 64" in line
    assert snapshot(tiny_run.root) == before


def test_train_header_shows_the_threads_flag(tiny_run, capsys):
    assert train(stage0(tiny_run, "tiny", "--threads", "1", "--set", "train.steps=1")) == 0
    header = capsys.readouterr().err.splitlines()[0]
    assert header.startswith("metroem train:") and "1 CPU threads" in header


def test_export_prints_each_stages_checkpoint_and_refuses_a_silent_mix(tmp_path, monkeypatch,
                                                                     capsys):
    import subprocess
    import sys

    import torch
    from conftest import REPO, subprocess_env

    pyramid = tmp_path / "demo"
    shutil.copytree(REPO / "models" / "demo", pyramid)
    stage0_dir = pyramid / "0_mip3in_demo"
    state = torch.load(modules.weights_path(stage0_dir, "demo"), weights_only=True)
    modules.save_weights(stage0_dir, "mine", state)  # now stage 0's default, 1-2 keep "demo"

    def export(*extra):
        return subprocess.run([sys.executable, "-m", "metroem.cli", "export", "--pyramid_path",
                               str(pyramid), str(tmp_path / "out.pt"), *extra], capture_output=True,
                              text=True, env=subprocess_env(), cwd=str(REPO))

    r = export()
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert "(stage 0: mine, stage 1: demo, stage 2: demo)" in line
    assert "--checkpoint_name mine,demo,demo" in line and not (tmp_path / "out.pt").exists()
    # with the mix named, the pyramid loads and each stage's checkpoint is printed (the
    # capture itself, minutes of torch.export, is stopped here: tests/test_export.py runs it)
    from metroem import export as export_module
    from metroem.errors import MetroemError

    def stop(*args):
        raise MetroemError("capture stopped by the test")

    monkeypatch.setattr(export_module, "_capture", stop)
    with pytest.raises(SystemExit) as stopped:
        export_module.main(["--pyramid_path", str(pyramid), str(tmp_path / "out.pt2"),
                            "--checkpoint_name", "mine,demo,demo"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "stage 0 (0_mip3in_demo): checkpoint 'mine' (no training record)" in err
    assert "stage 2 (2_mip1in_demo): checkpoint 'demo' (no training record)" in err
    assert "capture stopped by the test" in err and not (tmp_path / "out.pt2").exists()
