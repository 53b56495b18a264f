"""Smoke test of benchmarks/supervision.py (the full benchmark is not CI)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from metroem import config

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_supervision", REPO / "benchmarks" / "supervision.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "variant, p, sim, sup, emb",
    [("self", 0.0, 1.0, 0.0, 0.0), ("supervised", 1.0, 0.0, 1.0, 0.0),
     ("both", 0.5, 1.0, 1.0, 0.0), ("embedding", 0.5, 1.0, 1.0, 0.25)],
)
def test_variant_configs_resolve(variant, p, sim, sup, emb):
    bench = _bench()
    sets = bench.variant_overrides(variant, 7, 0.25, quick=False)
    cfg = config.resolve(config.load_config("custom", bench.RECIPE / "train.yaml", sets), 2)
    assert cfg["train"]["steps"] == 7
    assert cfg["augment"]["same_section"]["p"] == p
    loss = cfg["loss"]
    assert (loss["similarity_weight"], loss["supervised_weight"]) == (sim, sup)
    assert loss["embedding_weight"] == emb


@pytest.mark.needs_shared("isbi")
def test_supervision_benchmark_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert _bench().main(["--quick", "--variants", "embedding", "--threads", "1",
                              "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "supervision.json").read_text())
    held_out = result["config"]["held_out"]
    assert held_out == [0, 1]
    manifest = json.loads((tmp_path / "work" / "volume" / "ingest.json").read_text())
    assert sorted(int(i) for i in manifest["excluded"]) == held_out
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"identity", "embedding"}
    assert runs["embedding"]["train"]["steps"] == 20
    # even 20 steps take most of the deformation out of same-section pairs
    ident, trained = runs["identity"]["overall"], runs["embedding"]["overall"]
    assert trained["epe_median"] < 0.5 * ident["epe_median"]
    assert trained["pairs"] == 4
    assert (tmp_path / "supervision.md").read_text().startswith("# Supervision benchmark")
