"""benchmarks/appearance.py: the source changes it makes, and a quick run of the script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import isbi_section

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_appearance",
                                                  REPO / "benchmarks" / "appearance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_change_keeps_no_data_and_the_grey_range_and_changes_the_image():
    bench = _bench()
    img = torch.linspace(1, 255, 64 * 64).reshape(64, 64)
    img[:, :8] = 0  # no data
    for change in bench.CHANGES:
        out = bench.changed(img, change, 4.0, seed=0)
        assert out.shape == img.shape and out.dtype == torch.float32
        assert (out[:, :8] == 0).all(), change
        data = out[:, 8:]
        assert data.min() >= 1 and data.max() <= 255, change
        assert (change == "none") == torch.equal(out, img), change
    again = bench.changed(img, "noisier", 4.0, seed=0)
    assert torch.equal(again, bench.changed(img, "noisier", 4.0, seed=0))  # seeded


@pytest.mark.needs_shared("isbi")
@pytest.mark.needs_shared("fibsem")
@pytest.mark.slow
def test_appearance_benchmark_quick_run_writes_its_tables(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "appearance.py"), "--quick", "--threads", "1",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "METROEM_SHARED_DATA": str(Path(isbi_section(0)).parents[1])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "appearance.json").read_text())
    isbi = result["tables"]["ISBI, same section"]
    # noise does not close the match gate: the default stays near its own raw field
    assert isbi["noisier"]["metroem"]["median"] < 2 * isbi["noisier"]["metroem raw"]["median"]
    assert isbi["noisier"]["metroem"]["median"] < isbi["noisier"]["farneback+pc"]["median"]
    assert isbi["out of focus"]["metroem"]["median"] < 0.5
    assert "| uneven illumination |" in (tmp_path / "appearance.md").read_text()
