"""A pyramid's own recipe (PYRAMID/train.yaml) and ``model.train_spec``: copying a pyramid and
running train.py reproduces its recipe, including settings that differ while training."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY_OVERRIDES

from metroem import modules
from metroem.training import cli, engine


def recipe(train_spec: dict) -> dict:
    """The tiny overrides as a recipe file, with ``model.train_spec``."""
    out: dict = {"preset": "scratch", "model": {"train_spec": train_spec}}
    for item in TINY_OVERRIDES:
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def train(run, capsys) -> tuple[int, str]:
    argv = ["--pyramid_path", str(run.pyramid), "--dataset_path", str(run.data),
            "--checkpoint_name", "tiny", "--device", "cpu", "--no_redirect_stdout",
            "--train_stages", "0", "--generate_field_stages", "0"]
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = int(e.code)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_pyramid_recipe_is_the_default_and_train_spec_applies(tiny_run, one_thread, capsys,
                                                               monkeypatch):
    (tiny_run.pyramid / "train.yaml").write_text(yaml.safe_dump(recipe({"iterations": 2})))
    before = modules.read_spec(tiny_run.module(0))[0]
    assert before["iterations"] == 1
    built = []
    real = engine.training_spec

    def spy(module, cfg):
        built.append(real(module, cfg))
        return built[-1]

    monkeypatch.setattr(engine, "training_spec", spy)
    code, log = train(tiny_run, capsys)
    assert code == 0, log
    assert "the pyramid's recipe" in log and str(tiny_run.pyramid / "train.yaml") in log
    assert built and all(spec["iterations"] == 2 for spec in built)  # trained with the change
    assert modules.read_spec(tiny_run.module(0))[0] == before  # the module keeps its spec
    saved = yaml.safe_load((tiny_run.pyramid / "_runs" / "tiny" / "config.yaml").read_text())
    assert saved["model"]["train_spec"] == {"iterations": 2}
    assert saved["train"]["steps"] == 6  # the recipe's own values, not the scratch preset's


@pytest.mark.parametrize("change", [{"channels": [2, 2]}, {"global_translation": True},
                                    {"no_such_key": 1}])
def test_train_spec_that_changes_the_weights_is_refused(tiny_run, capsys, change):
    (tiny_run.pyramid / "train.yaml").write_text(yaml.safe_dump(recipe(change)))
    code, log = train(tiny_run, capsys)
    assert code != 0
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.train_spec" in errors[0] and "Traceback" not in log
    assert not list(tiny_run.pyramid.rglob("*.state.pth.tar"))
