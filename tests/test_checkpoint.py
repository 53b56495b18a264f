"""Training state: exact resume, RNG capture, weights_only loading, corrupt files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from metroem import config as cfg
from metroem import modules, nets
from metroem.errors import MetroemError
from metroem.training import checkpoint as ckpt

STEPS = 6


def make_config(schedule: str) -> dict:
    return cfg.load_config(
        "scratch",
        overrides={
            "train.steps": STEPS,
            "schedule.name": schedule,
            "schedule.warmup_steps": 2,
            "schedule.step_size": 2,
        },
    )


def build(config: dict, seed: int):
    """A tiny model with dropout (consumes torch RNG), its optimizer and scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1)
    )
    optimizer = cfg.build_optimizer(model.parameters(), config)
    return model, optimizer, cfg.build_scheduler(optimizer, config)


def train(model, optimizer, scheduler, start: int, stop: int) -> None:
    """Steps whose data depends on the python, numpy and torch RNGs."""
    for _ in range(start, stop):
        x = torch.randn(4, 3) + random.random() + float(np.random.rand())
        loss = ((model(x) - 1) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, schedule):
    config = make_config(schedule)
    seed_all(0)
    model, opt, sched = build(config, 0)
    train(model, opt, sched, 0, STEPS)
    reference = [p.detach().clone() for p in model.parameters()]

    seed_all(0)
    model, opt, sched = build(config, 0)
    train(model, opt, sched, 0, 3)
    path = ckpt.save_training_state(
        tmp_path / "run.training.pt", model, opt, sched, 3, ckpt.capture_rng_states(),
        {"epoch": 0, "position": 12}, config, {"best_val": 0.5},
    )  # fmt: skip
    train(model, opt, sched, 3, 5)  # the run goes on, then dies

    seed_all(99)  # a new process: other seeds, other initial weights
    model, opt, sched = build(config, 7)
    state = ckpt.load_training_state(path, model, opt, sched)
    assert state.step == 3 and state.data_state == {"epoch": 0, "position": 12}
    assert state.config == config and state.extra == {"best_val": 0.5}
    train(model, opt, sched, state.step, STEPS)
    for got, want in zip(model.parameters(), reference, strict=True):
        assert torch.equal(got, want)
    assert sched.last_epoch == STEPS


def test_state_file_loads_with_weights_only(tmp_path):
    config = make_config("onecycle")
    model, opt, sched = build(config, 0)
    train(model, opt, sched, 0, 2)
    path = ckpt.save_training_state(
        tmp_path / "s.pt", model, opt, sched, 2, ckpt.capture_rng_states(), [1, 2], config
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ckpt.FORMAT and raw["version"] == ckpt.VERSION
    assert raw["step"] == 2 and raw["config"] == config and raw["data_state"] == [1, 2]
    assert set(raw["model"]) == set(model.state_dict())
    assert not [p.name for p in tmp_path.iterdir() if p.name != "s.pt"]  # no temp files left


def test_rng_states_round_trip():
    seed_all(3)
    states = ckpt.capture_rng_states()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    seed_all(4)
    ckpt.restore_rng_states(states)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_unserialisable_data_state_is_refused(tmp_path):
    config = make_config("cosine")
    model, opt, sched = build(config, 0)
    with pytest.raises(TypeError, match="data_state.*object"):
        ckpt.save_training_state(tmp_path / "s.pt", model, opt, sched, 0, None, object(), config)
    assert not list(tmp_path.iterdir())


def test_corrupt_truncated_or_foreign_files_are_reported(tmp_path):
    config = make_config("cosine")
    model, opt, sched = build(config, 0)
    path = ckpt.save_training_state(tmp_path / "s.pt", model, opt, sched, 1, None, None, config)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MetroemError, match="truncated or corrupt") as e:
        ckpt.load_training_state(path, model, opt, sched)
    assert "\n" not in str(e.value) and str(path) in str(e.value)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MetroemError, match="truncated or corrupt"):
        ckpt.load_training_state(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(MetroemError, match="not a metroem training state"):
        ckpt.load_training_state(foreign)
    with pytest.raises(MetroemError, match="no training state"):
        ckpt.load_training_state(tmp_path / "missing.pt")


def test_checkpoint_in_module_folder(tmp_path):
    """save_checkpoint writes modelhouse-loadable weights and a resumable state beside them."""
    spec = nets.default_spec()
    info = modules.create_module(tmp_path, 0, 4, "a", spec)
    config = make_config("cosine")
    torch.manual_seed(0)
    model = nets.build_model(spec)
    opt = cfg.build_optimizer(model.parameters(), config)
    sched = cfg.build_scheduler(optimizer=opt, config=config)
    src, tgt = torch.rand(2, 1, 1, 32, 32).unbind(0)
    loss = model(src * 255, tgt * 255).square().mean()
    loss.backward()
    opt.step()
    sched.step()
    weights, state = ckpt.save_checkpoint(info.path, "last", model, opt, sched, 1, None, config)
    assert weights.parent == state.parent == info.path / "model"
    assert state == ckpt.training_state_path(info.path, "last")
    assert modules.checkpoint_names(info.path) == ["last"]  # the state is no checkpoint
    with torch.no_grad():
        assert torch.equal(modules.load_module(info.path)(src, tgt), model.eval()(src, tgt))

    other = nets.build_model(nets.default_spec(global_translation=True))
    with pytest.raises(MetroemError, match="another architecture"):
        ckpt.load_checkpoint(info.path, "last", other)
    fresh = nets.build_model(spec)
    resumed = ckpt.load_checkpoint(info.path, "last", fresh, restore_rng=False)
    assert resumed.step == 1
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
