"""benchmarks/gpu.py in its CPU test mode: the script a lent GPU will run once must work."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _gpu_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gpu_benchmark_cpu_quick(tmp_path, keep_threads):
    assert _gpu_script().main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                               "--threads", "1"]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    md = (tmp_path / "gpu.md").read_text()
    # a CPU file can never pass for a GPU result
    assert doc["header"]["device_type"] == "cpu" and doc["header"]["device"].startswith("CPU")
    assert md.startswith("# GPU benchmark script, CPU test run (not a GPU result)")
    assert "**CPU (" in md
    # the quick path: tiny sizes, one repeat, one timed step
    c = doc["config"]
    assert c["quick"] and c["sizes"] == [128] and c["repeats"] == 1 and c["train_steps"] == 1
    assert doc["status"] == "finished"
    pyramids = {"isbi", "demo"}
    inf = [r for r in doc["inference"] if r["precision"] == "fp32"]
    assert {r["pyramid"] for r in inf} == pyramids
    for r in inf:
        assert r["status"] == "ok" and r["size"] == 128, r
        assert _finite(r["mpix_per_s"]) and r["mpix_per_s"] > 0 and r["field_finite"]
    for r in doc["inference"]:
        if r["precision"] == "bf16" and r["status"] == "ok":
            assert _finite(r["max_diff_px"]) and _finite(r["median_diff_px"])
    assert {r["pyramid"] for r in doc["tiled"]} == pyramids
    for r in doc["tiled"]:
        assert r["status"] == "ok" and _finite(r["mpix_per_s"]) and r["field_finite"], r
    train = [r for r in doc["train"] if r["precision"] == "fp32"]
    # one row per stage of each shipped pyramid (three stages each)
    assert sorted((r["pyramid"], r["stage"]) for r in train) == sorted(
        (p, s) for p in pyramids for s in range(3))
    for r in train:
        assert r["status"] == "ok", r
        assert _finite(r["steps_per_s"]) and _finite(r["loss"]) and r["crop"] <= 64
    # every row is either measured, or says why not (never a silent gap)
    for table in ("inference", "tiled", "train"):
        for r in doc[table]:
            assert r["status"] == "ok" or r["status"].startswith("skipped") or r.get("error")
    assert "| isbi | 128² | fp32 |" in md


def test_gpu_benchmark_budget_skips_and_writes(tmp_path, keep_threads):
    """Over budget, every measurement is recorded as skipped and both files are written."""
    assert _gpu_script().main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                               "--threads", "1", "--budget_s", "0", "--pyramids", "demo"]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    rows = doc["inference"] + doc["tiled"] + doc["train"]
    assert rows and all(r["status"] == "skipped (budget)" for r in rows)
    assert "skipped (budget)" in (tmp_path / "gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_benchmark_without_cuda_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _gpu_script().main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0] and "CUDA" in err[0]
    assert not (tmp_path / "gpu.json").exists()
