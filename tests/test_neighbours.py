"""metroem.eval.neighbours: FIB-SEM neighbour pairs with a known answer, and their benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import shared_data

from metroem import fields
from metroem.errors import MetroemError
from metroem.eval import neighbours as nb

REPO = Path(__file__).resolve().parents[1]
needs_fibsem = pytest.mark.needs_shared("fibsem")


@pytest.fixture(scope="module")
def blocks():
    return nb.load_blocks(shared_data("fibsem"))


@needs_fibsem
def test_pairs_are_held_out_reproducible_and_their_truth_undoes_the_deformation(blocks):
    ps = nb.make_neighbour_pairs(blocks, gaps=(1, 4), per_block=2)
    again = nb.make_neighbour_pairs(blocks, gaps=(1, 4), per_block=2)
    assert len(ps) == 2 * 2 * 2 * 2  # blocks x gaps x targets x kinds
    for p, r in zip(ps, again, strict=True):
        assert p.name == r.name and torch.equal(p.src, r.src)
        n = blocks[p.block].shape[0]
        assert n - nb.HELD_OUT <= p.z and p.z + p.gap < n  # held out
        raw = blocks[p.block][p.z + p.gap]
        assert torch.equal(p.tgt, blocks[p.block][p.z])
        if p.kind == "undeformed":
            assert torch.equal(p.src, raw) and p.gt.abs().max() == 0
        else:
            back = fields.warp_image(p.src[None, None], p.gt[None])[0, 0]
            m = nb.valid_mask(p)
            assert m.float().mean() > 0.3
            assert (back - raw)[m].abs().median() < 3.0  # resampling only (uint8 grey levels)
            assert p.gt.abs().max() > 5  # a real deformation


@needs_fibsem
def test_distinct_gaps_and_slices_get_distinct_deformations(blocks):
    ps = nb.make_neighbour_pairs(blocks, gaps=(1, 2), per_block=2, kinds=("deformed",))
    gts = [p.gt for p in ps]
    assert all(not torch.equal(a, b) for i, a in enumerate(gts) for b in gts[i + 1 :])


def test_bad_arguments_name_the_problem(tmp_path):
    stack = torch.ones(20, 16, 16)
    with pytest.raises(MetroemError, match="gap"):
        nb.make_neighbour_pairs({"b": stack}, gaps=(10,), held_out=10)
    with pytest.raises(MetroemError, match="held_out"):
        nb.make_neighbour_pairs({"b": stack}, held_out=30)
    with pytest.raises(MetroemError, match="kind"):
        nb.make_neighbour_pairs({"b": stack}, kinds=("same",))
    with pytest.raises(MetroemError, match="not found"):
        nb.load_blocks(tmp_path / "nothing")
    assert nb.split(250) == (range(0, 200), range(200, 250))


def test_truth_is_exact_on_a_registered_synthetic_block():
    """A block whose slices are one image: the undeformed morph is 0 for a perfect matcher and
    the deformed pair's truth aligns it back."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, 16, 16, generator=gen)
    img = torch.nn.functional.interpolate(coarse, size=(128, 128), mode="bilinear") * 200 + 20
    stack = img[0].expand(30, 128, 128).clone()
    ps = nb.make_neighbour_pairs({"b": stack}, gaps=(1,), per_block=1, held_out=10)
    d = next(p for p in ps if p.kind == "deformed")
    back = fields.warp_image(d.src[None, None], d.gt[None])[0, 0]
    assert (back - d.tgt)[nb.valid_mask(d, margin=8)].abs().median() < 1.0


@needs_fibsem
def test_benchmark_quick_run_writes_its_tables(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "neighbours.py"), "--quick", "--no-metroem",
         "--threads", "1", "--out", str(tmp_path), "--fibsem", str(shared_data("fibsem"))],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "neighbours.json").read_text())
    table = result["fibsem"]["4"]
    raw, smooth = table["farneback+pc"], table["farneback+pc gauss 32px"]
    assert raw["pairs"] == 4 and raw["failures"] == 0
    assert result["fibsem"]["0"]["farneback+pc"]["pairs"] == 2  # same-section pairs
    # the smoothed flow bends less on the undeformed pairs: the morph metric sees it
    assert smooth["morph_median"] < raw["morph_median"]
    assert result["apparent_shift"]["4"] > result["apparent_shift"]["1"]
    assert "| farneback+pc |" in (tmp_path / "neighbours.md").read_text()


@needs_fibsem
def test_same_section_pairs_are_a_noisy_deformed_copy_with_exact_truth(blocks):
    ps = nb.make_same_pairs(blocks, per_block=2)
    assert len(ps) == 4 and all(p.kind == "same" and p.gap == 0 for p in ps)
    for p in ps:
        assert torch.equal(p.tgt, blocks[p.block][p.z])
        back = fields.warp_image(p.src[None, None], p.gt[None])[0, 0]
        m = nb.valid_mask(p)
        assert (back - p.tgt)[m].abs().median() < 3 * nb.NOISE_STD  # noise and resampling
        assert p.gt.abs().max() > 5
