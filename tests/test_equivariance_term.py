"""The training equivariance term: its algebra, its forward pass, and train.py using it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_OVERRIDES, TinyRun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metroem import fields, modules, synth
from metroem.training import cli
from metroem.training.equivariance import consistency_epe, forward_with_equivariance

pytestmark = pytest.mark.usefixtures("one_thread")


def _const(n: int, h: int, w: int, x: float, y: float) -> torch.Tensor:
    f = torch.zeros(n, 2, h, w)
    f[:, 0], f[:, 1] = x, y
    return f


def test_consistency_is_zero_exactly_when_the_deformation_is_undone():
    n, h, w = 2, 24, 32
    d = _const(n, h, w, 3.0, -1.5)  # src_d(p) = src(p + d)
    r0 = _const(n, h, w, 0.5, 2.0)
    weight = torch.ones(n, 1, h, w)
    r1 = r0 - d  # aligns the deformed source: src_d(p + r1) = src(p + r0)
    assert float(consistency_epe(r0, r1, d, weight)) < 1e-3
    # off by (0.3, 0.4): a 0.5 px end-point error everywhere
    assert float(consistency_epe(r0, r1 + _const(n, h, w, 0.3, 0.4), d, weight)) == \
        pytest.approx(0.5, abs=1e-3)
    # only weighted pixels count
    bad = r1.clone()
    bad[..., :, : w // 2] += 10.0
    half = torch.zeros(n, 1, h, w)
    half[..., w // 2 :] = 1.0
    assert float(consistency_epe(r0, bad, d, half)) < 1e-3
    assert float(consistency_epe(r0, bad, d, weight)) > 4.0


class _Recorder(torch.nn.Module):
    """A stand-in stage that returns zero residuals and records what it was given."""

    def forward(self, src, tgt, src_agg_field=None):
        self.seen = (src, tgt, src_agg_field)
        return torch.zeros(src.shape[0], 2, *src.shape[-2:])


def test_forward_aligns_both_sources_in_one_call_and_composes_the_incoming_field():
    torch.manual_seed(0)
    n, h, w = 2, 32, 32
    src = torch.rand(n, 1, h, w) * 100 + 50
    tgt = torch.rand(n, 1, h, w) * 100 + 50
    agg = _const(n, h, w, 1.0, 0.0)
    spec = synth.DeformationSpec(translation=2.0)
    net = _Recorder()
    pred, eq = forward_with_equivariance(net, {"src": src, "tgt": tgt, "src_agg_field": agg},
                                         spec, torch.Generator().manual_seed(1))
    s, t, a = net.seen
    assert s.shape == (2 * n, 1, h, w) and a is None
    assert torch.equal(t[:n], tgt) and torch.equal(t[n:], tgt)
    # first half: the source pre-warped by the incoming field, as the stage does internally
    assert torch.allclose(s[:n], fields.warp_image(src, agg))
    assert torch.allclose(pred, agg)  # zero residual composed onto the incoming field
    # zero residuals on both halves: the term is the deformation's mean length (0 < |d| <= 2.9)
    assert 0.05 < float(eq) < 2.9
    assert not torch.equal(s[n:], s[:n])


def test_train_py_logs_the_term_and_a_custom_finetune_config_starts_from_the_weights(
    tiny_world, tmp_path
):
    run = TinyRun(tmp_path, tmp_path / "data", tmp_path / "pyramid", tiny_world.volume)
    shutil.copytree(tiny_world.data, run.data)
    shutil.copytree(tiny_world.pyramid, run.pyramid)
    stage0 = ["--train_stages", "0", "--generate_field_stages", "0", "--no_redirect_stdout"]
    assert cli.main(run.argv("eq", *stage0)) == 0
    before = run.weights(0, "eq")
    # a custom config built on the finetune preset, with the equivariance term on
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("preset: finetune\nloss: {equivariance_weight: 0.5}\n")
    argv = ["--pyramid_path", str(run.pyramid), "--dataset_path", str(run.data),
            "--checkpoint_name", "eq", "--train_mode", "custom", "--train_params_path", str(cfg),
            "--device", "cpu", *stage0, "--set", "train.steps=2", "--set", "optimizer.lr=1e-9",
            "--set", "train.log_every=1", "--overwrite"]  # finetuning in place replaces "eq"
    argv += [x for o in TINY_OVERRIDES if not o.startswith(("train.steps", "optimizer.lr",
                                                             "train.log_every"))
             for x in ("--set", o)]
    assert cli.main(argv) == 0
    after = run.weights(0, "eq")
    # lr 1e-9 for 2 steps: a finetune stays at the old weights (a scratch start would not)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-4
    events = list((run.pyramid / "_runs" / "eq").rglob("events.out.tfevents.*"))
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/equivariance" in tags
    assert modules.discover(run.pyramid)
