"""Pyramid discovery, module folders as data, loading (metroem, modelhouse)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metroem import __version__, demo_volume, modules, nets
from metroem.errors import MetroemError


def em_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two neighbouring EM-like sections as uint8 (1, 1, size, size) tensors."""
    stack = demo_volume.procedural_stack(2, 256, 256, seed=3)[..., :size, :size].contiguous()
    return stack[0:1], stack[1:2]


def trained_like(spec: dict, seed: int = 1) -> torch.nn.Module:
    """A model with non-default weights (so loading the wrong weights would show)."""
    torch.manual_seed(seed)
    model = nets.build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def fake_module(pyramid: Path, name: str, complete: bool = True) -> Path:
    """A folder that passes discovery's content checks (model/model_spec.json)."""
    path = pyramid / name
    (path / "model").mkdir(parents=True)
    if complete:
        (path / "create.py").write_text("")
        (path / "model" / "model_spec.json").write_text("{}")
    return path


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# --- discovery ---------------------------------------------------------------------------------


def test_discover_sorts_numerically_and_ignores_other_entries(tmp_path):
    for name in ("100_mip2in_fine", "3_mip10in_b", "0_mip12in_coarse", "12_mip10in_x"):
        fake_module(tmp_path, name)
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / ".hidden_mip_thing").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "0_mip3_x.txt").write_text("a file, not a folder")
    found = modules.discover(tmp_path)
    assert [(m.stage, m.mip, m.suffix) for m in found] == [
        (0, 12, "coarse"),
        (3, 10, "b"),
        (12, 10, "x"),
        (100, 2, "fine"),
    ]
    assert found[2].name == "12_mip10in_x" and found[2].path == tmp_path / "12_mip10in_x"
    assert modules.parse_module_name("12_mip10in_x_v2") == (12, 10, "x_v2")
    assert modules.parse_module_name("12_mip10_x") is None


def test_select_stages(tmp_path):
    for name in ("0_mip6in_a", "1_mip5in_b", "2_mip4in_c"):
        fake_module(tmp_path, name)
    found = modules.discover(tmp_path)
    assert [m.stage for m in modules.select_stages(found, [2, 0])] == [0, 2]
    assert modules.select_stages(found, None) == found
    with pytest.raises(MetroemError) as e:
        modules.select_stages(found, [1, 7])
    assert "7" in one_line(e) and "0, 1, 2" in str(e.value)


@pytest.mark.parametrize(
    "names, expected",
    [
        (["0_mip2_x"], "misnamed module folder .*0_mip2_x.*<STAGE>_mip<IN_MIP>in_<SUFFIX>"),
        (["a_mip2in_x"], "misnamed module folder .*a_mip2in_x.*<STAGE>_mip<IN_MIP>in_<SUFFIX>"),
        (["1_mip4in_a", "1_mip4in_b"], "duplicate stage 1: 1_mip4in_a and 1_mip4in_b"),
        (["0_mip4in_a", "1_mip6in_b"], "coarse to fine: 1_mip6in_b .MIP 6. follows 0_mip4in_a"),
        ([], "no module folders in"),
    ],
)
def test_discover_rejects_bad_pyramids(tmp_path, names, expected):
    (tmp_path / "notes").mkdir()
    for name in names:
        fake_module(tmp_path, name)
    with pytest.raises(MetroemError, match=expected) as e:
        modules.discover(tmp_path)
    one_line(e)


def test_discover_allows_equal_mips(tmp_path):
    for name in ("0_mip4in_a", "1_mip4in_b"):
        fake_module(tmp_path, name)
    assert [m.mip for m in modules.discover(tmp_path)] == [4, 4]


def test_discover_rejects_missing_or_non_folder_paths(tmp_path):
    with pytest.raises(MetroemError, match="does not exist") as e:
        modules.discover(tmp_path / "nope")
    one_line(e)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MetroemError, match="is not a folder"):
        modules.discover(tmp_path / "file")


@pytest.mark.parametrize("missing", ["model/model_spec.json"])
def test_discover_rejects_incomplete_module(tmp_path, missing):
    path = fake_module(tmp_path, "0_mip4in_a")
    (path / missing).unlink()
    with pytest.raises(MetroemError, match=f"lacks {missing}") as e:
        modules.discover(tmp_path)
    one_line(e)


# --- module folders ----------------------------------------------------------------------------


def test_create_module_layout_and_round_trip(tmp_path):
    spec = nets.default_spec()
    info = modules.create_module(tmp_path / "pyr", 2, 6, "mid", spec)
    assert info.path == tmp_path / "pyr" / "2_mip6in_mid" and (info.stage, info.mip) == (2, 6)
    # data only: the spec, weights to come, and the few-line modelhouse entry point
    files = sorted(str(p.relative_to(info.path)) for p in info.path.rglob("*"))
    assert files == ["create.py", "model", "model/model_spec.json"]
    assert (info.path / "create.py").read_bytes() == modules.ENTRY_POINT.read_bytes()
    assert len((info.path / "create.py").read_text().splitlines()) < 25
    assert not [p for p in (tmp_path / "pyr").iterdir() if p.name.startswith(".")]
    assert modules.discover(tmp_path / "pyr") == [info]

    model = trained_like(spec)
    path = modules.save_weights(info.path, "best", model.state_dict())
    assert path == modules.weights_path(info.path, "best") and path.is_file()
    assert set(torch.load(path, weights_only=True)) == set(model.state_dict())
    doc = json.loads((info.path / "model" / "model_spec.json").read_text())
    assert doc["default_checkpoint"] == "best" and doc["spec"] == spec
    assert doc["metroem_version"] == __version__ and doc["spec"]["arch"] == nets.ARCH

    src, tgt = em_pair()
    loaded = modules.load_module(info.path)
    assert not loaded.training
    with torch.no_grad():
        expected = model(src, tgt)
        assert expected.abs().max() > 0
        assert torch.equal(loaded(src, tgt), expected)
        assert torch.equal(modules.load_module(info.path, "best")(src, tgt), expected)
    # Loading writes nothing into the module folder (no __pycache__).
    assert not list(info.path.rglob("__pycache__"))


def test_default_checkpoint_is_latest_saved_and_names_are_checked(tmp_path):
    spec = nets.default_spec()
    info = modules.create_module(tmp_path, 0, 3, "a", spec)
    first, second = trained_like(spec, 1), trained_like(spec, 2)
    modules.save_weights(info.path, "first", first.state_dict())
    modules.save_weights(info.path, "second", second.state_dict())
    src, tgt = em_pair()
    with torch.no_grad():
        assert torch.equal(modules.load_module(info.path)(src, tgt), second(src, tgt))
        assert torch.equal(modules.load_module(info.path, "first")(src, tgt), first(src, tgt))
    assert modules.checkpoint_names(info.path) == ["first", "second"]
    with pytest.raises(MetroemError, match="no checkpoint 'third'.*first, second") as e:
        modules.load_module(info.path, "third")
    one_line(e)
    with pytest.raises(MetroemError, match="bad checkpoint name"):
        modules.save_weights(info.path, "../escape", first.state_dict())


def test_module_without_checkpoint_is_untrained_with_warning(tmp_path):
    info = modules.create_module(tmp_path, 0, 3, "a", nets.default_spec())
    with pytest.warns(UserWarning, match="untrained"):
        model = modules.load_module(info.path)
    assert model.spec == nets.default_spec()


def test_create_module_rejects_conflicts(tmp_path):
    spec = nets.default_spec()
    modules.create_module(tmp_path, 1, 6, "a", spec)
    with pytest.raises(MetroemError, match="already exists"):
        modules.create_module(tmp_path, 1, 6, "a", spec)
    with pytest.raises(MetroemError, match="duplicate stage 1"):
        modules.create_module(tmp_path, 1, 5, "b", spec)
    with pytest.raises(MetroemError, match="coarse to fine"):
        modules.create_module(tmp_path, 2, 7, "b", spec)
    with pytest.raises(MetroemError, match="bad module suffix"):
        modules.create_module(tmp_path, 2, 5, "has space", spec)
    with pytest.raises(MetroemError, match="cannot build a model"):
        modules.create_module(tmp_path, 2, 5, "b", {"no_such_key": 1})
    assert [m.name for m in modules.discover(tmp_path)] == ["1_mip6in_a"]
    assert [p.name for p in tmp_path.iterdir()] == ["1_mip6in_a"]


def test_loading_runs_no_code_from_the_folder(tmp_path):
    """A folder is data: its create.py and an old frozen code/ copy are never executed."""
    spec = nets.default_spec()
    info = modules.create_module(tmp_path, 0, 4, "a", spec)
    model = trained_like(spec, 1)
    modules.save_weights(info.path, "w", model.state_dict())
    (info.path / "create.py").write_text("raise SystemExit('create.py ran')\n")
    (info.path / "code").mkdir()  # the layout of folders written by metroem 0.1
    (info.path / "code" / "nets.py").write_text("raise SystemExit('frozen code ran')\n")
    src, tgt = em_pair()
    with torch.no_grad():
        assert torch.equal(modules.load_module(info.path)(src, tgt), model(src, tgt))
    modules.write_entry_point(info.path)  # what training does to a folder it trains
    assert (info.path / "create.py").read_bytes() == modules.ENTRY_POINT.read_bytes()


def test_unknown_architecture_is_refused_in_one_line(tmp_path):
    info = modules.create_module(tmp_path, 0, 4, "a", nets.default_spec())
    doc = json.loads((info.path / "model" / "model_spec.json").read_text())
    doc["spec"]["arch"] = "metroem-stage-v99"
    (info.path / "model" / "model_spec.json").write_text(json.dumps(doc))
    with pytest.raises(MetroemError, match="unknown architecture 'metroem-stage-v99'") as e:
        modules.load_module(info.path)
    assert nets.ARCH in one_line(e) and __version__ in str(e.value)


WIDER = {"channels": [c * 2 for c in nets.default_spec()["channels"]]}


@pytest.mark.parametrize(
    "ours, theirs, expected",
    [
        ({"global_translation": True}, {}, "missing: global_head"),
        ({}, {"global_translation": True}, "unexpected: global_head"),
        ({}, WIDER, r"shape: \S+ \(\d+, \d+, \d+, \d+\) vs \("),
    ],
)
def test_checkpoint_of_another_architecture_is_named(tmp_path, ours, theirs, expected):
    info = modules.create_module(tmp_path, 0, 3, "a", nets.default_spec(**ours))
    foreign = nets.build_model(nets.default_spec(**theirs))
    path = modules.save_weights(info.path, "foreign", foreign.state_dict())
    with pytest.raises(MetroemError, match=expected) as e:
        modules.load_module(info.path)
    assert str(path) in one_line(e) and "another architecture" in str(e.value)


def test_truncated_weights_are_reported(tmp_path):
    info = modules.create_module(tmp_path, 0, 3, "a", nets.default_spec())
    path = modules.save_weights(info.path, "w", trained_like(nets.default_spec()).state_dict())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MetroemError, match="truncated or corrupt") as e:
        modules.load_module(info.path)
    assert str(path) in one_line(e)


def _write_spec(info, spec) -> None:
    doc = {"format": "metroem-module", "spec": spec, "default_checkpoint": None}
    (info.path / "model" / "model_spec.json").write_text(json.dumps(doc))


def test_spec_path_references_stay_inside_module(tmp_path):
    spec = nets.default_spec(global_translation=False)
    info = modules.create_module(tmp_path / "pyr", 0, 3, "a", nets.default_spec())
    (info.path / "model" / "parts").mkdir()
    (info.path / "model" / "parts" / "base.json").write_text(json.dumps(spec))
    _write_spec(info, {"path": "parts/base.json"})
    with pytest.warns(UserWarning, match="untrained"):
        assert modules.load_module(info.path).spec == spec

    (tmp_path / "outside.json").write_text(json.dumps(spec))
    for ref in ("../../../outside.json", str(tmp_path / "outside.json")):
        _write_spec(info, {"path": ref})
        with pytest.raises(MetroemError, match="leaves the module folder") as e:
            modules.load_module(info.path)
        one_line(e)


# --- modelhouse and isolation ------------------------------------------------------------------


def test_modelhouse_loads_trained_module(tmp_path, monkeypatch):
    import modelhouse
    monkeypatch.setattr(sys, "path", list(sys.path))  # modelhouse prepends its temp folder
    monkeypatch.chdir(tmp_path)
    spec = nets.default_spec()
    info = modules.create_module(tmp_path / "mh", 0, 5, "a", spec)
    model = trained_like(spec, 3)
    modules.save_weights(info.path, "trained", model.state_dict())
    modules.save_weights(info.path, "later", trained_like(spec, 4).state_dict())
    src, tgt = em_pair()
    loaded = modelhouse.load_model_simple(str(info.path), checkpoint_name="trained",
                                          output="tensor")
    kwargs = json.dumps({"checkpoint_name": "trained", "device": "cpu", "unused": 1})
    processor = modelhouse.load_model(str(info.path), kwargs)  # corgie's default: torchfields
    with torch.no_grad():
        expected = model(src, tgt)
        assert type(loaded(src, tgt)) is torch.Tensor
        assert torch.equal(loaded(src, tgt), expected)
        field = processor(src_img=src, tgt_img=tgt)
        assert torch.equal(field.as_subclass(torch.Tensor), expected) and field.x is not None
    assert not list(info.path.rglob("__pycache__"))


MODELHOUSE = textwrap.dedent(
    """
    import json, sys, torch, modelhouse
    from torchfields.fields import DisplacementField
    processor = modelhouse.load_model_simple({folder!r})
    src, tgt = torch.load({inputs!r})
    field = processor(src_img=src, tgt_img=tgt, src_agg_field=None)  # as corgie calls it
    assert isinstance(field, DisplacementField), type(field)
    torch.save((field.x.as_subclass(torch.Tensor), field.y.as_subclass(torch.Tensor),
                field.as_subclass(torch.Tensor)), {out!r})
    """
)


def test_modelhouse_gives_corgie_a_processor_with_no_params(tmp_path):
    """``modelhouse.load_model_simple(folder)`` alone, in a fresh process, is what corgie needs:
    a processor returning a torchfields DisplacementField (``.x``/``.y``), default weights."""
    spec = nets.default_spec()
    info = modules.create_module(tmp_path / "pyr", 0, 5, "a", spec)
    model = trained_like(spec, 5)
    modules.save_weights(info.path, "best", model.state_dict())
    src, tgt = em_pair()
    torch.save((src, tgt), tmp_path / "inputs.pt")
    script = MODELHOUSE.format(folder=str(info.path), inputs=str(tmp_path / "inputs.pt"),
                               out=str(tmp_path / "out.pt"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-2000:]
    x, y, field = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = model(src, tgt)
    assert expected.abs().max() > 0 and torch.equal(field, expected)
    assert torch.equal(x, expected[:, 0:1]) and torch.equal(y, expected[:, 1:2])


def test_update_spec_switches_parameter_free_settings_and_refuses_unknown_keys(tmp_path):
    info = modules.create_module(tmp_path, 0, 1, "x", nets.default_spec(levels=2))
    new = modules.update_spec(info.path, lk_iterations=1, residual_sigma=6.0)
    spec, _ = modules.read_spec(info.path)
    assert spec == new and spec["lk_iterations"] == 1 and spec["residual_sigma"] == 6.0
    with pytest.raises(MetroemError, match="does not build"):
        modules.update_spec(info.path, lk_iterations=-2)
    with pytest.raises(MetroemError, match="different parameters"):
        modules.update_spec(info.path, global_translation=True)
    assert modules.read_spec(info.path)[0]["lk_iterations"] == 1  # unchanged on refusal
