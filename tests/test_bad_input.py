"""Bad input: the catalogue of tests/reliability_cases.py through the real command lines, plus
the library-level guarantees behind it (atomic writes on a full disk, HDF5 surviving it, tissue-
free pairs, weights_only loading).

The catalogue runs every case (70 commands) in a fresh process forked from a preloaded
interpreter (tests/forked.py; benchmarks/bad_inputs.py runs real `python` subprocesses), so it
is marked slow; the other tests are fast.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import forked
import numpy as np
import pytest
import reliability_cases as rc
import torch
from helpers import shared_data, tiny_pyramid

from metroem import atomic, datasets, download, losses, modules, nets
from metroem.aligner import load_aligner
from metroem.errors import MetroemError

REPO = Path(__file__).resolve().parents[1]


# --- the catalogue -------------------------------------------------------------------------


def test_catalogue_covers_the_classes_of_issue_6():
    names = [c.name for c in rc.CASES]
    assert len(names) == len(set(names))
    assert len({c.klass for c in rc.CASES}) >= 20
    assert {c.tool for c in rc.CASES} == set(rc.TOOLS)
    wanted = ["missing", "unreadable", "truncated", "corrupt", "foreign", "dtype", "rank",
              "N = 0", "empty dataset folder", "NaN", "z range", "patch outside", "MIP",
              "misnamed", "duplicate", "empty module", "unknown key", "wrong type",
              "out of range", "another architecture", "does not match", "all-zero",
              "disk fills up", "GPU", "two writers", "(N, 3, S, S)"]
    text = " | ".join(c.klass for c in rc.CASES)
    assert [w for w in wanted if w not in text] == []


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict[str, rc.Result]:
    root = tmp_path_factory.mktemp("bad_input")
    world = rc.build_world(root / "world", shared_data("isbi"))
    # Forked from a preloaded interpreter: the same checks as `python ...` subprocesses (which
    # benchmarks/bad_inputs.py runs) at a third of the cost.
    results = rc.run_cases(rc.CASES, world, root / "work", jobs=3, forker=forked.forkserver())
    return {r.name: r for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("case", rc.CASES, ids=[c.name for c in rc.CASES])
def test_bad_input_fails_cleanly(case, catalogue):
    r = catalogue[case.name]
    assert r.ok, f"{r.command}\n  exit {r.exit_code}: {r.message}\n  problems: {r.problems}"
    if case.exit_code:
        assert r.message.startswith("error: ") and "\n" not in r.message


# --- full disk: one-line error, old file intact, no temp file ------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_atomic_path_turns_a_full_disk_into_one_line(tmp_path, code):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(MetroemError) as e:
        with atomic.atomic_path(str(final)) as tmp:
            Path(tmp).write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    assert "cannot write" in str(e.value) and "exists unchanged" in str(e.value)
    assert "\n" not in str(e.value)
    assert final.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_other_os_errors_are_not_relabelled(tmp_path):
    with pytest.raises(PermissionError):
        with atomic.atomic_path(str(tmp_path / "x")):
            raise PermissionError(errno.EACCES, "denied")
    assert os.listdir(tmp_path) == []


def _limited(code: str, limit: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` with writes past ``limit`` bytes per file failing (EFBIG), no SIGXFSZ."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=120, cwd=str(cwd), env=rc.child_env(), preexec_fn=rc._preexec(limit),
    )


def test_h5_writer_survives_a_full_disk(tmp_path):
    """HDF5 cannot recover from a failed write (it crashes at exit); the WriteGuard keeps it
    from seeing one, so the writer raises a one-line error and the process exits normally."""
    old = tmp_path / "x0_y0_z1_MIP0.h5"
    old.write_bytes(b"previous content")
    res = _limited(
        f"""
        import numpy as np
        from metroem import datasets
        from metroem.errors import MetroemError
        rng = np.random.default_rng(0)
        pairs = rng.integers(0, 255, (6, 2, 256, 256), dtype=np.uint8)
        attrs = dict(mip=0, x_offset=0, y_offset=0, z=list(range(1, 7)))
        try:
            datasets.write_image_dataset({str(old)!r}, pairs, attrs, overwrite=True)
        except MetroemError as e:
            print("error:", e)
        """, 64 * 1024, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("error: cannot write") and "File too large" in res.stdout
    assert old.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == [old.name]


def test_weights_on_a_full_disk_keep_the_old_file(tmp_path):
    spec = rc.tiny_spec()
    module = modules.create_module(tmp_path / "p", 0, 0, "t", spec).path
    first = modules.save_weights(module, "w", nets.build_model(spec).state_dict())
    before = first.read_bytes()
    res = _limited(
        f"""
        import torch
        from metroem import modules, nets
        from metroem.errors import MetroemError
        torch.manual_seed(1)
        try:
            modules.save_weights({str(module)!r}, "w", nets.build_model({spec!r}).state_dict(),
                                 make_default=False)
        except MetroemError as e:
            print("error:", e)
        """, len(before) // 2, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("error: cannot write") and "w.state.pth.tar" in res.stdout
    assert first.read_bytes() == before
    assert not [p for p in (module / "model").iterdir() if ".tmp-" in p.name]


# --- paths that are not what they should be ----------------------------------------------


def test_a_folder_where_an_h5_file_is_expected(tmp_path):
    (tmp_path / "x0_y0_z1_MIP0.h5").mkdir()
    with pytest.raises(MetroemError, match="is a folder, not an h5 file"):
        datasets.list_datasets(str(tmp_path))


def test_an_unreadable_h5_file(tmp_path):
    """chmod 000 where that blocks reads; as root (who reads anyway) a folder in its place."""
    path = tmp_path / "x0_y0_z1_MIP0.h5"
    path.write_bytes(b"")
    how = rc._unreadable(path)
    expected = "is a folder" if how.startswith("a folder") else "permission denied"
    with pytest.raises(MetroemError, match=expected):
        datasets.read_image_dataset(str(path))


def test_download_checks_the_output_folder_before_reading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MetroemError, match="is a file, not a folder"):
        download.download_image("file:///nowhere", str(tmp_path / "file" / "sub"), 1, 2, 0, 0,
                                [0], [64], progress=False)
    assert os.listdir(tmp_path) == ["file"]


# --- all-zero (no tissue) pairs -----------------------------------------------------------


def test_losses_are_finite_on_tissue_free_pairs():
    zeros = torch.zeros(2, 1, 64, 64)
    field = torch.zeros(2, 2, 64, 64, requires_grad=True)
    for similarity in ("mse", "ncc"):
        loss = losses.build_loss({"similarity": similarity, "supervised_weight": 1.0})
        total, terms = loss(zeros, zeros, field, gt_field=torch.zeros(2, 2, 64, 64))
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
        assert torch.isfinite(field.grad).all()


def test_aligner_returns_the_incoming_field_on_tissue_free_pairs(tmp_path):
    tiny_pyramid(tmp_path, rc.tiny_spec())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained modules warn
        aligner = load_aligner(tmp_path)
    zeros = torch.zeros(1, 1, 64, 64)
    incoming = torch.randn(1, 2, 64, 64)
    assert torch.equal(aligner(zeros, zeros), torch.zeros(1, 2, 64, 64))
    assert torch.equal(aligner(zeros, zeros, src_agg_field=incoming), incoming)
    tissue = torch.rand(1, 1, 64, 64) * 255
    assert torch.isfinite(aligner(tissue, zeros)).all()


# --- loaded artefacts ---------------------------------------------------------------------


def _calls(path: Path, name: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == name]


def _keyword(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_every_load_in_the_package_refuses_pickled_code():
    sources = sorted((REPO / "metroem").rglob("*.py")) + sorted(REPO.glob("*.py"))
    torch_loads = np_loads = 0
    for path in sources:
        for call in _calls(path, "load"):
            owner = call.func.value
            owner = owner.id if isinstance(owner, ast.Name) else ""
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if owner == "torch":
                torch_loads += 1
                assert _keyword(call, "weights_only") is True, f"{where}: weights_only=True"
            elif owner == "np":
                np_loads += 1
                assert _keyword(call, "allow_pickle") is not True, f"{where}: allow_pickle"
            elif owner in ("pickle", "dill", "cloudpickle"):
                raise AssertionError(f"{where}: unpickling a file")
        for call in _calls(path, "load") + _calls(path, "load_all"):
            if getattr(call.func.value, "id", "") == "yaml":
                loader = next((k.value for k in call.keywords if k.arg == "Loader"), None)
                assert loader is not None, f"{path}:{call.lineno}: yaml.load needs a safe Loader"
    assert torch_loads >= 3  # the audit saw the real loads (weights, state, finetune start)


def test_saved_weights_and_state_load_with_weights_only(tmp_path):
    from metroem.training import checkpoint as ckpt

    module = modules.create_module(tmp_path, 0, 0, "t", rc.tiny_spec()).path
    model = nets.build_model(rc.tiny_spec())
    opt = torch.optim.AdamW(model.parameters())
    w, s = ckpt.save_checkpoint(module, "c", model, opt, None, 3, {"pos": 1}, {"seed": 0})
    assert set(torch.load(w, weights_only=True)) == set(model.state_dict())
    assert torch.load(s, weights_only=True)["step"] == 3


def test_a_pickle_with_code_is_refused(tmp_path):
    """A weights file that would run code when unpickled is rejected, and the code never runs."""
    module = modules.create_module(tmp_path, 0, 0, "t", rc.tiny_spec()).path
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": Evil()}, modules.weights_path(module, "evil"))
    with pytest.raises(MetroemError, match="not a readable state_dict"):
        modules.load_module(module, "evil")
    assert not marker.exists()


def test_existing_datasets_need_overwrite(tmp_path):
    path = tmp_path / "x0_y0_z1_MIP0.h5"
    pairs = np.ones((1, 2, 8, 8), np.uint8)
    attrs = dict(mip=0, x_offset=0, y_offset=0, z=[1])
    datasets.write_image_dataset(str(path), pairs, attrs)
    before = path.read_bytes()
    with pytest.raises(MetroemError, match="--overwrite"):
        datasets.write_image_dataset(str(path), pairs * 2, attrs)
    assert path.read_bytes() == before
    datasets.write_image_dataset(str(path), pairs * 2, attrs, overwrite=True)
    assert datasets.read_image_dataset(str(path)).data.max() == 2


def test_spec_path_through_a_symlink_cannot_leave_the_module(tmp_path):
    """tests/test_modules.py covers ``../`` and absolute references; a link inside the folder
    that points outside is refused too (references are resolved before the check)."""
    import json

    info = modules.create_module(tmp_path / "pyr", 0, 0, "a", rc.tiny_spec())
    (tmp_path / "outside.json").write_text(json.dumps(rc.tiny_spec()))
    (info.path / "model" / "inside.json").symlink_to(tmp_path / "outside.json")
    spec_file = info.path / "model" / "model_spec.json"
    doc = json.loads(spec_file.read_text())
    doc["spec"] = {"path": "inside.json"}
    spec_file.write_text(json.dumps(doc))
    with pytest.raises(MetroemError, match="leaves the module folder"):
        modules.load_module(info.path)
