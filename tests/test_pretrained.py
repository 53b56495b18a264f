"""The registry of shipped pyramids: names resolve to verified folders, copies train."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import metroem
from metroem import modules, pretrained
from metroem.errors import MetroemError

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.parametrize("name", pretrained.names())
def test_registry_matches_the_shipped_folders(name):
    entry = pretrained.REGISTRY[name]
    folder = pretrained.verify(name)  # module names and every weights checksum
    assert folder.resolve() == (MODELS / name).resolve()
    assert (folder / entry.config).is_file()  # the recipe's config travels with the pyramid
    assert [m.name for m in modules.discover(folder)] == list(entry.modules)
    for path in entry.results:
        assert (MODELS.parent / path).is_file(), path


def test_a_name_loads_the_same_aligner_as_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called "demo" here
    src = torch.full((1, 1, 64, 64), 100.0)
    src[..., 20:40, 24:30] = 20
    tgt = src.roll(2, dims=-1)
    by_name = metroem.load_aligner("demo")
    by_folder = metroem.load_aligner(MODELS / "demo")
    with torch.no_grad():
        assert torch.equal(by_name(src, tgt), by_folder(src, tgt))


def test_a_user_pyramid_named_like_a_shipped_one_wins_over_the_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pretrained.copy_pyramid("demo", tmp_path / "demo")  # the user's copy, untrained
    assert pretrained.resolve("demo") == Path("demo")


def test_a_folder_that_is_not_a_pyramid_does_not_hide_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "image").mkdir(parents=True)  # e.g. `metroem demo-volume demo`
    assert pretrained.resolve("demo") == pretrained.verify("demo")
    assert pretrained.resolve("isbi_like_folder") == Path("isbi_like_folder")  # not a name


def test_a_shipped_name_where_a_folder_is_needed_says_to_copy_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MetroemError, match="shipped pyramid.*metroem pretrained copy demo"):
        modules.discover("demo")


def test_unknown_names_and_changed_weights_are_refused(tmp_path, monkeypatch):
    with pytest.raises(MetroemError, match="no pretrained pyramid 'nope'; known: demo, isbi"):
        pretrained.pyramid_path("nope")
    copy = tmp_path / "isbi"
    shutil.copytree(MODELS / "isbi", copy)
    pretrained.verify("isbi", copy)
    weights = modules.weights_path(copy / "1_mip1in_isbi", "isbi")
    state = torch.load(weights, weights_only=True)
    next(iter(state.values())).add_(1e-3)
    modules.save_weights(copy / "1_mip1in_isbi", "isbi", state)
    with pytest.raises(MetroemError, match="does not match its registered SHA-256"):
        pretrained.verify("isbi", copy)
    monkeypatch.setattr(pretrained, "pyramid_path", lambda name: copy)
    with pytest.raises(MetroemError, match="SHA-256"):
        metroem.load_aligner("isbi")


def test_copy_is_a_trainable_definition_and_never_overwrites(tmp_path, capsys):
    dst = tmp_path / "mine"
    assert pretrained.main(["copy", "isbi", str(dst)]) == 0
    assert "copied isbi" in capsys.readouterr().out
    assert [m.name for m in modules.discover(dst)] == list(pretrained.REGISTRY["isbi"].modules)
    assert (dst / "train.yaml").read_bytes() == (MODELS / "isbi" / "train.yaml").read_bytes()
    assert not list(dst.rglob("*.pth*")) and not list(dst.rglob("__init__.py"))
    with pytest.raises(SystemExit) as e:
        pretrained.main(["copy", "isbi", str(dst)])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    with_weights = pretrained.copy_pyramid("demo", tmp_path / "tuned", weights=True)
    pretrained.verify("demo", with_weights)


def test_list_names_every_pyramid(capsys):
    assert pretrained.main([]) == 0
    out = capsys.readouterr().out
    for name, entry in pretrained.REGISTRY.items():
        assert f"{name}: {entry.summary}" in out and "weights verified" in out


def test_stack_jobs_keep_a_shipped_name_for_the_workers_to_resolve(tmp_path, monkeypatch):
    from metroem import inference

    monkeypatch.chdir(tmp_path)
    assert inference._job_pyramid("demo") == "demo"  # each worker finds its installed copy
    (tmp_path / "mine").mkdir()
    assert inference._job_pyramid("mine") == str(tmp_path / "mine")


def test_the_log_flags_work_after_the_action_too():
    parse = pretrained.build_parser().parse_args
    assert parse(["copy", "-q", "demo", "x"]).verbosity == -1
    assert parse(["list", "-v"]).verbosity == 1
    assert parse(["-v", "list"]).verbosity == 1  # before the action: the parent's flag stands
    assert parse(["list"]).verbosity == 0
