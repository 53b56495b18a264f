"""Training config: presets as schema, merging, one-line validation errors, per-MIP, builders."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from metroem import config as cfg
from metroem.errors import MetroemError


def tree(node, prefix=""):
    """{dotted key: type name} of a config, descending into sections but not free mappings."""
    out = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in cfg.FREE:
            out.update(tree(value, path + "."))
        else:
            out[path] = type(value).__name__
    return out


def error(**kwargs) -> str:
    """The one-line message load_config raises for ``kwargs``."""
    kwargs.setdefault("mode", "scratch")
    with pytest.raises(MetroemError) as e:
        cfg.load_config(**kwargs)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_presets_share_one_schema_and_differ_where_intended():
    scratch, finetune = cfg.load_preset("scratch"), cfg.load_preset("finetune")
    assert tree(scratch) == tree(finetune)
    assert scratch["preset"] == "scratch" and finetune["preset"] == "finetune"
    assert finetune["optimizer"]["lr"] < scratch["optimizer"]["lr"]
    assert finetune["train"]["steps"] < scratch["train"]["steps"]
    assert finetune["augment"]["warp"]["p"] < scratch["augment"]["warp"]["p"]
    assert cfg.load_config("finetune") == finetune


def test_sections_take_defaults_from_their_modules():
    from metroem import augment, masks

    config = cfg.load_preset("finetune")
    assert set(config["augment"]) == set(augment.DEFAULTS)
    assert config["masks"] == masks.DEFAULTS  # the preset changes nothing there
    assert config["augment"]["swap"] == augment.DEFAULTS["swap"]


def test_user_yaml_is_merged_over_the_preset(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "optimizer:\n  lr: 1e-3\n  params: {betas: [0.8, 0.99]}\n"
        "train: {steps: 40, nan_policy: {max_skips: 2}}\n"
        "augment: {swap: {p: 0}}\n"
    )
    config = cfg.load_config("custom", path)
    base = cfg.load_preset("scratch")
    assert config["optimizer"]["lr"] == 1e-3 and isinstance(config["optimizer"]["lr"], float)
    assert config["optimizer"]["params"] == {"weight_decay": 1e-4, "betas": [0.8, 0.99]}
    assert config["train"]["steps"] == 40 and config["train"]["nan_policy"]["max_skips"] == 2
    assert config["augment"]["swap"]["p"] == 0.0
    assert config["train"]["log_every"] == base["train"]["log_every"]
    assert config["data"] == base["data"]


def test_json_custom_file_picks_its_preset(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"preset": "finetune", "train": {"steps": 7}}))
    config = cfg.load_config("custom", path)
    assert config["preset"] == "finetune" and config["train"]["steps"] == 7
    assert config["optimizer"] == cfg.load_preset("finetune")["optimizer"]


def test_overrides_as_strings_or_mapping():
    a = cfg.load_config("scratch", overrides=["train.steps=12", "optimizer.name=SGD"])
    b = cfg.load_config("scratch", overrides={"train.steps": 12, "optimizer.name": "SGD"})
    assert a == b and a["train"]["steps"] == 12 and a["optimizer"]["name"] == "SGD"
    assert cfg.parse_overrides(["a.b.c=[1, 2]", "a.d=x"]) == {"a": {"b": {"c": [1, 2]}, "d": "x"}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.steps=ten"], "train.steps: expected int, got str 'ten'"),
        (["train.steps=2.5"], "train.steps: expected int, got float 2.5"),
        (["schedule.name=true"], "schedule.name: expected str, got bool True"),
        (["train.nan_policy=3"], "train.nan_policy: expected dict, got int 3"),
        (["augment.wrap.p=1"], "unknown key 'augment.wrap' (did you mean 'warp'?)"),
        (["masks.valid_mi=3"], "unknown key 'masks.valid_mi' (did you mean 'valid_min'?)"),
        (["trian.steps=3"], "unknown key 'trian' (did you mean 'train'?)"),
        (["train.steps=-1"], "train.steps: must be >= 0, got -1"),
        (["optimizer.lr=0"], "optimizer.lr: must be > 0, got 0.0"),
        (["augment.swap.p=1.5"], "augment.swap.p: must be in [0, 1], got 1.5"),
        (["data.val_fraction=1"], "data.val_fraction: must be in [0, 1), got 1.0"),
        (["optimizer.lr=.nan"], "optimizer.lr: must be a finite number"),
        (["schedule.name=cosin"], "schedule.name: 'cosin' is not one of none, cosine, step, "),
        (["optimizer.name=Adamm"], "optimizer.name: unknown optimizer 'Adamm'; valid: "),
        (["optimizer.params.momentum=0.9"], "optimizer.params.momentum: AdamW has no such"),
        (["optimizer.params.lr=0.1"], "set the learning rate as optimizer.lr"),
        (["optimizer.params.betas=[0.9, 2.0]"], "optimizer.params: AdamW rejects them"),
        (["augment.holes.on=nowhere"], "augment.holes.on"),
        (["per_mip.x.train.steps=1"], "per_mip: key 'x' is not a MIP"),
        (["per_mip.6.train.steps=-3"], "per_mip.6 (effective config of MIP 6): train.steps"),
        (["per_mip.6.preset=finetune"], "unknown key 'per_mip.6.preset'"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_key(overrides, expected):
    assert expected in error(overrides=overrides)


def test_unknown_optimizer_lists_valid_ones():
    text = error(overrides={"optimizer.name": "Adamm"})
    for name in ("Adam", "AdamW", "SGD", "RMSprop"):
        assert name in text
    assert "LBFGS" not in text


def test_loss_keys_come_from_losses_defaults():
    from metroem import losses
    key = next(k for k in losses.DEFAULTS if len(k) > 3)
    text = error(overrides={f"loss.{key[:-1]}": 1})
    assert f"unknown key 'loss.{key[:-1]}' (did you mean '{key}'?)" in text


def test_file_problems(tmp_path):
    assert "does not exist" in error(mode="custom", train_params_path=tmp_path / "no.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    assert "does not parse" in error(mode="custom", train_params_path=bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in error(mode="custom", train_params_path=listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train: {stesp: 3}\n")
    text = error(mode="custom", train_params_path=typo)
    assert "unknown key 'train.stesp' (did you mean 'steps'?)" in text and str(typo) in text
    assert "needs --train_params_path" in error(mode="custom")
    assert "unknown training mode" in error(mode="fast")
    conflict = tmp_path / "conflict.yaml"
    conflict.write_text("preset: finetune\n")
    assert "mode is 'scratch'" in error(mode="scratch", train_params_path=conflict)


def test_per_mip_resolution():
    config = cfg.load_config(
        "scratch",
        overrides={
            "per_mip": {"8": {"data": {"crop_size": 64}, "optimizer": {"lr": 0.01}}},
            "data.crop_size": 256,
        },
    )
    assert list(config["per_mip"]) == [8]
    coarse, fine = cfg.resolve(config, 8), cfg.resolve(config, 2)
    assert coarse["data"]["crop_size"] == 64 and coarse["optimizer"]["lr"] == 0.01
    assert coarse["data"]["batch_size"] == config["data"]["batch_size"]
    assert coarse["optimizer"]["params"] == config["optimizer"]["params"]
    assert fine["data"]["crop_size"] == 256 and fine["optimizer"] == config["optimizer"]
    assert "per_mip" not in coarse and config["data"]["crop_size"] == 256  # input untouched


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_saved_config_reloads_identically(tmp_path, suffix):
    config = cfg.load_config(
        "finetune", overrides={"per_mip.5.train.steps": 9, "optimizer.params.betas": [0.8, 0.9]}
    )
    path = cfg.save_resolved(config, tmp_path / f"run{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [f"run{suffix}"]
    raw = path.read_text()
    assert (json.loads(raw) if suffix == ".json" else yaml.safe_load(raw))["preset"] == "finetune"
    assert cfg.load_config("custom", path) == config
    with pytest.raises(MetroemError, match="use a .yaml, .yml or .json name"):
        cfg.save_resolved(config, tmp_path / "run.txt")


def test_build_optimizer_from_config():
    model = torch.nn.Linear(2, 2)
    adamw = cfg.build_optimizer(model.parameters(), cfg.load_preset("scratch"))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["weight_decay"] == 1e-4 and adamw.defaults["lr"] == 2e-3
    config = cfg.load_config(
        "scratch", overrides={"optimizer.name": "sgd", "optimizer.params.momentum": 0.9}
    )
    sgd = cfg.build_optimizer(model.parameters(), config)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9


def lrs(name: str, steps: int = 20, **schedule) -> list[float]:
    over = {"schedule.name": name, "train.steps": steps, "optimizer.lr": 1.0}
    over.update({f"schedule.{k}": v for k, v in schedule.items()})
    config = cfg.load_config("scratch", overrides=over)
    opt = cfg.build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    sched = cfg.build_scheduler(opt, config)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules():
    cosine = lrs("cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert cosine[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(cosine[3:], cosine[4:], strict=False))
    assert cosine[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    step = lrs("step", warmup_steps=0, step_size=5, gamma=0.5)
    assert step[::5] == pytest.approx([1.0, 0.5, 0.25, 0.125])
    assert lrs("none", warmup_steps=0) == [1.0] * 20
    onecycle = lrs("onecycle", warmup_steps=5)
    assert (
        max(onecycle) == pytest.approx(1.0) and onecycle.index(max(onecycle)) == 4
    )  # last warmup step
    assert onecycle[0] < 0.1 and onecycle[-1] < 0.01


def test_scheduler_state_loads_with_weights_only(tmp_path):
    for name in ("cosine", "onecycle"):
        config = cfg.load_config("scratch", overrides={"schedule.name": name})
        opt = cfg.build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
        torch.save(cfg.build_scheduler(opt, config).state_dict(), tmp_path / "s.pt")
        assert torch.load(tmp_path / "s.pt", weights_only=True)["last_epoch"] == 0


# Rules of the loss / masks / augment sections live in config.py's tables; load_config and the
# section modules' own resolve/validate (library callers building from a dict) apply the same.
MOVED_RULES = [
    ("augment", "intensity.contrast", 1.0, "augment.intensity.contrast: must be in [0, 1)"),
    ("augment", "warp.elastic_scale", 0.0, "augment.warp.elastic_scale: must be > 0"),
    ("augment", "holes.radius", -1.0, "augment.holes.radius: must be >= 0, got -1.0"),
    ("augment", "folds.on", "left", "augment.folds.on: 'left' is not one of src, tgt, both"),
    ("masks", "similarity_rings", [[0, 1]], "masks.similarity_rings: each ring must be"),
    ("masks", "smoothness_rings", [[2, -1.0]], "masks.smoothness_rings: each ring must be"),
    ("masks", "mask_threshold", -0.5, "masks.mask_threshold: must be >= 0, got -0.5"),
    ("masks", "valid_min", "low", "masks.valid_min: must be a finite number or null"),
    ("loss", "ncc_window", 4, "loss.ncc_window: must be an odd integer, got 4"),
    ("loss", "ncc_window", 1, "loss.ncc_window: must be >= 3, got 1"),
    ("loss", "fold_margin", 1.0, "loss.fold_margin: must be in [0, 1), got 1.0"),
    ("loss", "embedding_margin", 2.5, "loss.embedding_margin: must be in (0, 2]"),
    ("loss", "embedding_radius", 5, "loss.embedding_radius: must be in [1, 4]"),
    ("loss", "embedding_levels", [0, 2], "loss.embedding_levels: must be a list of encoder"),
    ("loss", "similarity", "l1", "loss.similarity: 'l1' is not one of mse, ncc, none"),
]


def _nested(key: str, value):
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value)} if rest else {head: value}


@pytest.mark.parametrize("section, key, value, expected", MOVED_RULES)
def test_section_rules_refused_by_load_config_in_one_line(section, key, value, expected):
    assert expected in error(overrides={f"{section}.{key}": value})


@pytest.mark.parametrize("section, key, value, expected", MOVED_RULES)
def test_section_modules_refuse_the_same_values(section, key, value, expected):
    from metroem import augment, losses, masks

    check = {"loss": losses.resolve, "masks": masks.resolve, "augment": augment.validate}[section]
    with pytest.raises(MetroemError) as e:
        check(_nested(key, value))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_section_rules_apply_to_per_mip_entries():
    text = error(overrides={"per_mip.6.loss.ncc_window": 6})
    assert "per_mip.6 (effective config of MIP 6): loss.ncc_window: must be an odd" in text


def test_check_section_merges_defaults_and_returns_a_copy():
    from metroem import masks

    out = cfg.check_section("masks", {"similarity_rings": [[2, 1]]})
    assert out["similarity_rings"] == [[2, 1]] and out["mask_threshold"] == 0.5
    out["similarity_rings"].append([3, 1])
    assert masks.DEFAULTS["similarity_rings"] == []
    assert masks.resolve({"similarity_rings": [(2, 1)]})["similarity_rings"] == [[2, 1.0]]
    with pytest.raises(MetroemError, match=r"^masks: expected dict, got list"):
        cfg.check_section("masks", [1])
