"""train.py end to end on a tiny 2-stage pyramid: outputs, logs, stage chaining, NaN policy,
bad input. Training runs in-process through ``metroem.training.cli.main`` (what train.py calls)
on one thread; train.py itself runs as a subprocess in tests/test_train_crash.py."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time

import modelhouse
import numpy as np
import pytest
import torch
import yaml
from conftest import MIPS, TINY_OVERRIDES, snapshot, subprocess_env, tiny_spec
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from metroem import config as config_mod
from metroem import datasets, fields, modules, nets
from metroem.aligner import load_aligner
from metroem.generate import generate_fields
from metroem.training import checkpoint as ckpt
from metroem.training import cli
from metroem.training.faults import FaultHooks, parse_faults
from metroem.training.stage_inputs import StageDataset

pytestmark = pytest.mark.usefixtures("one_thread")


def train(argv: list[str]) -> int:
    """cli.main as train.py runs it: the exit status (errors exit 2 through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


def error_line(capsys) -> str:
    """The one-line error of a failed run; fails on a traceback or a multi-line error."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_world, tmp_path_factory):
    """One full run (both stages, field generation, train.log) shared by the output tests."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_world.data, root / "data")
    shutil.copytree(tiny_world.pyramid, root / "pyramid")
    from conftest import TinyRun

    run = TinyRun(root, root / "data", root / "pyramid", tiny_world.volume)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(run.argv("tiny")) == 0
    finally:
        torch.set_num_threads(before)
    return run


def test_each_stage_writes_weights_state_and_entry_point(trained):
    for stage in (0, 1):
        module = trained.module(stage)
        state = torch.load(modules.weights_path(module, "tiny"), weights_only=True)
        model = nets.build_model(tiny_spec())
        model.load_state_dict(state)  # a complete, plain state_dict of the stage's net
        assert all(torch.isfinite(v).all() for v in state.values())
        restored = ckpt.load_training_state(
            ckpt.training_state_path(module, "tiny"), restore_rng=False
        )
        assert restored.step == 6 and restored.extra["final"] and restored.extra["skipped"] == 0
        assert "epe_median" in restored.extra["val"]
        assert (module / "create.py").read_bytes() == modules.ENTRY_POINT.read_bytes()
        assert not (module / "code").exists()  # a module folder is data
        assert modules.read_spec(module)[1] == "tiny"  # default checkpoint


def test_run_folder_has_resolved_config_log_and_tensorboard(trained):
    run_dir = trained.pyramid / "_runs" / "tiny"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == config_mod.load_config("scratch", None, TINY_OVERRIDES)
    assert saved["train"]["steps"] == 6 and saved["data"]["crop_size"] == 64
    log = (run_dir / "train.log").read_text()
    assert "stage 0 done: 6 steps" in log and "stage 1 done: 6 steps" in log
    assert re.search(r"stage 0 done: .*\(\d+\.\d\d steps/s, \d+ % of it on data\)", log)
    assert "generated field_0_" in log
    for stage, mip in enumerate(MIPS):
        acc = EventAccumulator(str(run_dir / f"stage{stage}_mip{mip}"),
                               size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars = set(acc.Tags()["scalars"])
        assert {"train/loss", "train/lr", "train/grad_norm", "val/epe_median",
                "val/strain_median"} <= scalars
        assert all(0 <= e.value < 10 for e in acc.Scalars("val/strain_median"))
        loss = acc.Scalars("train/loss")
        assert [e.step for e in loss] == [2, 4, 6]
        assert all(np.isfinite(e.value) for e in loss)
        assert acc.Scalars("train/lr")[0].value > 0
        # loop speed and the share of it spent on data, per log line
        assert [e.step for e in acc.Scalars("train/steps_per_s")] == [2, 4, 6]
        assert all(e.value > 0 for e in acc.Scalars("train/steps_per_s"))
        assert all(0 < e.value < 1 for e in acc.Scalars("train/data_share"))
        images = set(acc.Tags()["images"])
        assert {"train/pair", "val/pair"} <= images
        panel = acc.Images("val/pair")[-1]
        assert panel.width > panel.height > 0  # six panels side by side
        assert [e.step for e in acc.Images("train/pair")] == [3, 6]


def test_modelhouse_loads_the_trained_module(trained):
    module = trained.module(1)
    loaded = modelhouse.load_model_simple(str(module))
    ref = nets.build_model(tiny_spec())
    ref.load_state_dict(trained.weights(1))
    ref.eval()
    item = StageDataset(str(trained.data), 0, 0, "tiny")[0]
    args = (item["src"][None], item["tgt"][None])
    with torch.no_grad():
        got = loaded(*args, src_agg_field=item["src_agg_field"][None])
        want = ref(*args, src_agg_field=item["src_agg_field"][None])
    assert got.shape == (1, 2, 256, 256)
    assert torch.equal(got, want)
    assert not torch.equal(got, item["src_agg_field"][None])  # the trained residual is there


# --- stage chaining --------------------------------------------------------------------------


def _interior(field: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """Pixels p whose sample point p + field(p) lies ``margin`` px inside the patch."""
    h, w = field.shape[-2:]
    ys = torch.arange(h).view(1, h, 1).float()
    xs = torch.arange(w).view(1, 1, w).float()
    px, py = xs + field[:, 0], ys + field[:, 1]
    return (px >= margin) & (px <= w - 1 - margin) & (py >= margin) & (py <= h - 1 - margin)


def _check_invariant(data_dir, tag: str, stage: int, mip: int, full: torch.Tensor | None):
    """src_recut(p + f_removed(p)) == src_plain(p + f_full(p)) where both sample inside."""
    name = datasets.field_filename(stage, 128, 128, 1, mip, tag)
    fd = datasets.read_field_dataset(os.path.join(data_dir, name))
    recut = datasets.read_image_dataset(os.path.join(data_dir, f"x128_y128_z1_MIP{mip}_{tag}.h5"))
    plain = datasets.read_image_dataset(os.path.join(data_dir, f"x128_y128_z1_MIP{mip}.h5"))
    assert np.array_equal(recut.translation, fd.translation)
    assert recut.attrs["field_dset"] == fd.path
    assert (fd.translation % 2 ** max(MIPS) == 0).all()  # multiples of 2^(coarsest MIP)
    t = torch.from_numpy(fd.translation).float().view(-1, 2, 1, 1) / 2**mip
    removed = torch.from_numpy(fd.data)
    if full is not None:  # the saturated field of the stages, recomputed independently
        torch.testing.assert_close(removed + t, full, atol=1e-4, rtol=0)
    full = removed + t
    src_recut = torch.from_numpy(recut.data[:, 0:1].astype(np.float32))
    src_plain = torch.from_numpy(plain.data[:, 0:1].astype(np.float32))
    a = fields.warp_image(src_recut, removed)[:, 0]
    b = fields.warp_image(src_plain, full)[:, 0]
    inside = _interior(removed) & _interior(full)
    assert inside.float().mean() > 0.5
    scale = float(src_plain.max())
    assert float((a - b)[inside].abs().max()) <= 1e-3 * scale
    assert np.array_equal(recut.data[:, 1], plain.data[:, 1])  # targets never move
    return fd, recut, plain, inside


def test_generated_fields_satisfy_the_translation_invariant(trained):
    aligner = load_aligner(trained.pyramid, "tiny", stages=[0], input_mip=0)
    plain = datasets.read_image_dataset(str(trained.data / "x128_y128_z1_MIP0.h5"))
    pairs = torch.from_numpy(plain.data.astype(np.float32))
    with torch.no_grad():
        full = aligner(pairs[:, 0:1], pairs[:, 1:2])
    _check_invariant(trained.data, "tiny", 0, 0, full)
    # by default no fields are generated after the last stage
    assert not (trained.data / datasets.field_filename(1, 128, 128, 1, 0, "tiny")).exists()


def test_next_stage_reads_the_generated_field_and_shifted_truth(trained):
    ds = StageDataset(str(trained.data), 0, 0, "tiny")
    fd = datasets.read_field_dataset(
        str(trained.data / datasets.field_filename(0, 128, 128, 1, 0, "tiny"))
    )
    gt = datasets.read_field_dataset(
        str(trained.data / datasets.field_filename(0, 128, 128, 1, 0, "groundtruth"))
    )
    assert ds.pairs.image_files() == [str(trained.data / "x128_y128_z1_MIP0_tiny.h5")]
    for i in range(len(ds)):
        item = ds[i]
        assert torch.equal(item["src_agg_field"], torch.from_numpy(fd.data[i]))
        t = torch.from_numpy(fd.translation[i]).float().view(2, 1, 1)
        torch.testing.assert_close(item["field"], torch.from_numpy(gt.data[i]) - t)


def _constant_shift_module(pyramid, stage: int, mip: int, shift: tuple[float, float], tag: str):
    """Give a module weights that predict the constant field ``shift`` (px at its MIP): a
    real stage net whose residual heads output only their bias."""
    spec = tiny_spec()
    spec["global_translation"] = False
    spec.update({k: False for k in ("local_prior",) if k in nets.default_spec()})
    module = next(m for m in modules.discover(pyramid) if m.stage == stage)
    shutil.rmtree(module.path)
    modules.create_module(pyramid, stage, mip, module.suffix, spec)
    model = nets.build_model(spec)
    levels = sorted(int(k) for k in model.heads)
    with torch.no_grad():
        for level in levels:
            last = [m for m in model.heads[str(level)].modules() if isinstance(m, nn.Conv2d)][-1]
            last.weight.zero_()
            last.bias.zero_()
        top = [m for m in model.heads[str(levels[-1])].modules() if isinstance(m, nn.Conv2d)][-1]
        top.bias.copy_(torch.tensor(shift) / 2 ** (levels[-1] - model.finest_level)
                       / 2 ** model.finest_level)
    modules.save_weights(module.path, tag, model.state_dict())


def test_known_translation_is_removed_snapped_and_recut(tiny_run):
    # Stage 0 (MIP 1) predicts (3.3, -5.6) px = (6.6, -11.2) MIP0 px -> snapped to (6, -12).
    _constant_shift_module(tiny_run.pyramid, 0, 1, (3.3, -5.6), "shift")
    generate_fields(str(tiny_run.pyramid), str(tiny_run.data), "shift", 0)
    aligner = load_aligner(tiny_run.pyramid, "shift", stages=[0], input_mip=0)
    plain = datasets.read_image_dataset(str(tiny_run.data / "x128_y128_z1_MIP0.h5"))
    pairs = torch.from_numpy(plain.data.astype(np.float32))
    with torch.no_grad():
        full = aligner(pairs[:, 0:1], pairs[:, 1:2])
    torch.testing.assert_close(full.mean((2, 3)), torch.tensor([[6.6, -11.2]]).expand(4, 2),
                               atol=1e-4, rtol=0)
    fd, recut, _, _ = _check_invariant(tiny_run.data, "shift", 0, 0, full)
    assert fd.translation.tolist() == [[6, -12]] * 4
    # the re-cut source really comes from the moved window of the volume (0 outside it)
    from metroem import volumes

    src = volumes.read(tiny_run.volume.image_path, 0, 6, -12, 1, 256)[0, 0].numpy()
    assert np.array_equal(recut.data[0, 0], src.astype(recut.data.dtype))
    assert (recut.data[:, 0, :12] == 0).all() and (recut.data[:, 0, 12:] != 0).mean() > 0.9
    # stage 1 trains on it: the ground truth moves with the source window
    ds = StageDataset(str(tiny_run.data), 0, 0, "shift")
    gt = datasets.read_field_dataset(
        str(tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "groundtruth"))
    )
    item = ds[2]
    torch.testing.assert_close(item["field"], torch.from_numpy(gt.data[2])
                               - torch.tensor([6.0, -12.0]).view(2, 1, 1))
    # ... and (gt - t) pulls the re-cut source exactly where gt pulled the original one
    gt_full = torch.from_numpy(gt.data)
    t = torch.tensor([6.0, -12.0]).view(1, 2, 1, 1)
    a = fields.warp_image(torch.from_numpy(recut.data[:, 0:1].astype(np.float32)), gt_full - t)
    b = fields.warp_image(pairs[:, 0:1], gt_full)
    inside = _interior(gt_full - t) & _interior(gt_full)
    assert float((a - b)[:, 0][inside].abs().max()) <= 1e-3 * float(pairs.max())


def test_recut_falls_back_to_shifting_when_the_volume_is_gone(tiny_run, tmp_path, caplog):
    _constant_shift_module(tiny_run.pyramid, 0, 1, (3.3, -5.6), "shift")
    volume_dir = tiny_run.volume.out_dir
    hidden = tmp_path / "volume_moved_away"
    os.rename(volume_dir, hidden)
    try:
        with caplog.at_level(logging.WARNING, logger="metroem"):
            generate_fields(str(tiny_run.pyramid), str(tiny_run.data), "shift", 0)
    finally:
        os.rename(hidden, volume_dir)
    assert "shifting the stored patches" in caplog.text
    fd, recut, plain, inside = _check_invariant(tiny_run.data, "shift", 0, 0, None)
    assert fd.translation.tolist() == [[6, -12]] * 4
    # what came from outside the stored patch is 0 (no data); the rest is the patch, moved
    assert (recut.data[:, 0, :, -6:] == 0).all() and (recut.data[:, 0, :12] == 0).all()
    assert np.array_equal(recut.data[:, 0, 12:, :-6], plain.data[:, 0, :-12, 6:])


# --- NaN policy --------------------------------------------------------------------------------


def test_injected_nan_is_skipped_and_counted(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("METROEM_FAULT", "nan@step=2,stage=0")
    assert train(tiny_run.argv("tiny", "--train_stages", "0", "--no_redirect_stdout")) == 0
    state = ckpt.load_training_state(
        ckpt.training_state_path(tiny_run.module(0), "tiny"), restore_rng=False
    )
    assert state.step == 6 and state.extra["skipped"] == 1
    out = capsys.readouterr().err
    assert "step 2: non-finite loss or gradient, skipped (1 of at most 20)" in out
    assert all(torch.isfinite(v).all() for v in tiny_run.weights(0).values())


def test_too_many_nans_stop_with_one_line_and_last_good_weights(tiny_run, monkeypatch, capsys):
    base = tiny_run.argv("tiny", "--train_stages", "0", "--no_redirect_stdout",
                         "--set", "train.nan_policy.max_skips=2")
    monkeypatch.setenv("METROEM_FAULT", "nan@step=2+")
    assert train(base) == 2
    line = error_line(capsys)
    assert "3 non-finite steps" in line and "max_skips=2" in line
    stopped = tiny_run.weights(0)
    state = ckpt.load_training_state(
        ckpt.training_state_path(tiny_run.module(0), "tiny"), restore_rng=False
    )
    assert state.step == 4 and state.extra["skipped"] == 3 and not state.extra["final"]
    # the saved weights are those after the one good step: same as a 1-step run
    monkeypatch.delenv("METROEM_FAULT")
    assert train(tiny_run.argv("one", "--train_stages", "0", "--no_redirect_stdout",
                               "--set", "train.steps=1")) == 0
    one = tiny_run.weights(0, "one")
    assert all(torch.equal(stopped[k], one[k]) for k in one)


def test_only_the_command_line_reads_the_fault_variable(tiny_run, monkeypatch):
    """The library call (cli.run, the loop) takes hooks as an argument and ignores
    METROEM_FAULT; hooks passed in act."""
    monkeypatch.setenv("METROEM_FAULT", "nan@step=1+")
    argv = tiny_run.argv("lib", "--train_stages", "0", "--generate_field_stages",
                         "--no_redirect_stdout", "--set", "train.steps=2")
    (res,) = cli.run(cli.build_parser().parse_args(argv))
    assert res.steps == 2 and res.skipped == 0
    argv[argv.index("lib")] = "hooked"
    (res,) = cli.run(cli.build_parser().parse_args(argv), FaultHooks("nan@step=2"))
    assert res.steps == 2 and res.skipped == 1


def test_fault_spec_is_checked():
    assert parse_faults("nan@step=3,rank=1; kill9@save=2,file=weights")[1].file == "weights"
    assert parse_faults("sigterm@step=4+")[0].steps == (4, float("inf"))
    for bad in ("boom@step=1", "nan@save=1", "kill9", "nan@step=x", "kill9@step=1,save=2"):
        with pytest.raises(Exception, match="METROEM_FAULT"):
            parse_faults(bad)


# --- upstream invocation -----------------------------------------------------------------------


def test_upstream_invocation_trains_stage_1_from_precomputed_fields(tiny_run, monkeypatch):
    # stage 0 first, writing the field dataset stage 1 needs (checkpoint "precomputed")
    assert train(tiny_run.argv("precomputed", "--train_stages", "0", "--no_redirect_stdout")) == 0
    field0 = tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "precomputed")
    assert field0.exists()
    w0 = modules.weights_path(tiny_run.module(0), "precomputed")
    before = w0.stat().st_mtime_ns
    # exactly the upstream command line; the tiny config comes through the environment
    monkeypatch.setenv(cli.OVERRIDES_ENV, ";".join(TINY_OVERRIDES))
    argv = ["--pyramid_path", str(tiny_run.pyramid), "--dataset_path", str(tiny_run.data),
            "--train_mode", "scratch", "--train_stages", "1", "--generate_field_stages", "1",
            "--checkpoint_name", "precomputed", "--no_redirect_stdout"]
    assert train(argv) == 0
    assert w0.stat().st_mtime_ns == before  # stage 0 untouched
    assert modules.weights_path(tiny_run.module(1), "precomputed").exists()
    assert (tiny_run.data / datasets.field_filename(1, 128, 128, 1, 0, "precomputed")).exists()
    assert not (tiny_run.pyramid / "_runs" / "precomputed" / "train.log").exists()
    saved = yaml.safe_load((tiny_run.pyramid / "_runs" / "precomputed" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


def _fails_cleanly(tiny_run, capsys, argv, *expected: str) -> str:
    before = snapshot(tiny_run.root)
    assert train(argv) == 2
    line = error_line(capsys)
    for text in expected:
        assert text in line, line
    assert snapshot(tiny_run.root) == before
    return line


def test_misnamed_module_folder(tiny_run, capsys):
    shutil.copytree(tiny_run.module(1), tiny_run.pyramid / "2_mip0_oops")
    _fails_cleanly(tiny_run, capsys, tiny_run.argv(), "misnamed module folder", "2_mip0_oops")


def test_duplicate_stage(tiny_run, capsys):
    shutil.copytree(tiny_run.module(1), tiny_run.pyramid / "1_mip0in_other")
    _fails_cleanly(tiny_run, capsys, tiny_run.argv(), "duplicate stage 1")


def test_stage_mip_without_dataset(tiny_run, capsys):
    (tiny_run.data / "x128_y128_z1_MIP0.h5").unlink()
    _fails_cleanly(tiny_run, capsys, tiny_run.argv(), "MIP0", "metroem-download-image")


def test_missing_incoming_field(tiny_run, capsys):
    _fails_cleanly(tiny_run, capsys, tiny_run.argv("tiny", "--train_stages", "1"),
                   "field_0_x*_y*_z*_MIP0_tiny.h5", "--generate_field_stages 0")


def test_field_dataset_that_disagrees_with_images(tiny_run, capsys):
    gt = datasets.read_field_dataset(
        str(tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "groundtruth"))
    )
    attrs = {k: gt.attrs[k] for k in ("mip", "x_offset", "y_offset", "patch_size")}
    attrs["z"] = list(gt.z[:3])
    datasets.write_field_dataset(
        str(tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "tiny")),
        gt.data[:3], np.zeros((3, 2), np.int64), attrs,
    )
    _fails_cleanly(tiny_run, capsys, tiny_run.argv("tiny", "--train_stages", "1"),
                   "has 3 fields", "4 pairs")


def test_unknown_config_key_and_wrong_type(tiny_run, capsys):
    _fails_cleanly(tiny_run, capsys, tiny_run.argv("tiny", "--set", "train.stepz=3"),
                   "train.stepz", "did you mean 'steps'")
    _fails_cleanly(tiny_run, capsys, tiny_run.argv("tiny", "--set", "train.steps=many"),
                   "train.steps", "expected int")


def test_finetune_from_another_architecture_names_the_keys(tiny_run, capsys):
    other = nets.build_model(nets.default_spec(channels=[4, 8], head_channels=4, local_radius=1))
    modules.save_weights(tiny_run.module(0), "old", other.state_dict())
    argv = [a if a != "scratch" else "finetune" for a in tiny_run.argv("old")]
    line = _fails_cleanly(tiny_run, capsys, argv, "another architecture")
    assert "missing: " in line or "unexpected: " in line or "shape: " in line
    assert "encoder." in line or "heads." in line


def test_missing_gpu(tiny_run, capsys):
    argv = [a if a != "cpu" else "cuda:3" for a in tiny_run.argv()]
    _fails_cleanly(tiny_run, capsys, argv, "cuda:3", "GPU")


def test_reserved_checkpoint_name(tiny_run, capsys):
    _fails_cleanly(tiny_run, capsys, tiny_run.argv("groundtruth"), "reserved")


def test_module_locked_by_another_live_process(tiny_run, capsys):
    module = tiny_run.module(0)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom metroem.atomic import FileLock\n"
         f"with FileLock({str(module)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tiny_run.root)
        assert train(tiny_run.argv()) == 2
        line = error_line(capsys)
        assert f"pid {holder.pid}" in line and str(module) in line
        assert snapshot(tiny_run.root) == before
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    # the holder died without releasing: its stale lock is taken over
    assert train(tiny_run.argv("tiny", "--train_stages", "0", "--no_redirect_stdout",
                               "--set", "train.steps=1")) == 0


# --- the demo pipeline ---------------------------------------------------------------------------


def test_demo_pipeline_without_a_pyramid_definition_is_one_line(tmp_path, capsys):
    from metroem import demo_pipeline

    with pytest.raises(SystemExit) as e:
        demo_pipeline.main(["--out", str(tmp_path / "out"), "--pyramid", str(tmp_path / "no")])
    assert e.value.code == 2
    assert "no pyramid definition at" in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_pipeline_prints_the_results_table(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "metroem.demo_pipeline", "--out", str(out), "--num_sections", "5",
         "--size", "256", "--set", "train.steps=3", "--set", "data.batch_size=2",
         "--set", "data.crop_size=64"],  # the shipped demo definition, from any folder
        capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if "val before" in ln)
    rows = [ln.split() for ln in lines[header + 1 : header + 4]]
    assert [(r[0], r[1]) for r in rows] == [("0", "3"), ("1", "2"), ("2", "1")]
    for r in rows:  # identity EPE, validation EPE, EPE of the pyramid through the stage
        assert len(r) == 5 and all(np.isfinite(float(v)) for v in r[2:])
        assert float(r[4]) < float(rows[0][2]) * 2**3  # better than doing nothing (MIP0 px)
    for stage, mip in ((0, 3), (1, 2), (2, 1)):
        module = out / "pyramid" / f"{stage}_mip{mip}in_demo"
        assert (module / "model" / "demo.state.pth.tar").is_file()
