"""metroem.stack: serial alignment with composed fields, median of predecessors, empty sections;
metroem.eval.stacks: known-answer stacks from the registered FIB-SEM blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import shared_data

from metroem import fields, stack, synth
from metroem.eval import baselines, stacks
from metroem.eval import neighbours as nb

needs_fibsem = pytest.mark.needs_shared("fibsem")
SIZE = 96


def texture(seed: int = 0, size: int = SIZE + 64) -> torch.Tensor:
    """A smooth random texture, values in [20, 235] (no 0: all data)."""
    g = torch.Generator().manual_seed(seed)
    t = synth.elastic_field(1, size, size, 1.0, 3.0, generator=g)[:, :1]
    t = (t - t.min()) / (t.max() - t.min())
    return (20 + 215 * t).round()


def drifting_stack(steps: list[tuple[int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One texture seen through a window that drifts by integer ``steps``: section i is the
    texture shifted by the cumulative drift; its true whole field is that drift."""
    big = texture()
    pos = np.cumsum([(0, 0)] + steps, axis=0)
    secs, truth = [], []
    for dx, dy in pos:
        secs.append(big[..., 32 + dy : 32 + dy + SIZE, 32 + dx : 32 + dx + SIZE].clone())
        truth.append(torch.tensor([float(-dx), float(-dy)]).view(1, 2, 1, 1)
                     .expand(1, 2, SIZE, SIZE))
    return secs, truth


def phase_pairs():
    return stack.image_pair_fn(baselines.METHODS["phasecorr"])


def centre_error(f: torch.Tensor, t: torch.Tensor) -> float:
    return float((f - t)[..., 24:-24, 24:-24].abs().max())


def test_fields_compose_along_the_stack():
    """Each pair only sees the residual step; the stored fields are the whole drift."""
    steps = [(3, -2), (4, 1), (-2, 5), (5, 3), (1, -4)]
    secs, truth = drifting_stack(steps)
    aligned, fs = stack.align_stack(secs, phase_pairs(), dtype=np.uint8)
    assert torch.equal(fs[0], torch.zeros(1, 2, SIZE, SIZE)) and torch.equal(aligned[0], secs[0])
    for f, t in zip(fs, truth, strict=True):
        assert centre_error(f, t) < 0.3
    # with the steps found exactly (integers), every aligned section is the reference itself
    snapped = stack.image_pair_fn(lambda s, t: np.round(baselines.METHODS["phasecorr"](s, t)))
    aligned, fs = stack.align_stack(secs, snapped, dtype=np.uint8)
    for a in aligned[1:]:
        assert torch.equal(a[..., 24:-24, 24:-24], secs[0][..., 24:-24, 24:-24])


def test_each_pair_only_needs_to_find_one_step():
    """Starting from the previous field, a method with a small search range (here +-6 px)
    follows a drift far beyond it; started from zero it cannot."""
    secs, truth = drifting_stack([(5, 3), (4, -5), (5, 2), (5, 4)])  # 19 px in x at the end

    def short_range(src, tgt):
        return np.clip(baselines.METHODS["phasecorr"](src, tgt), -6, 6)

    _, fs = stack.align_stack(secs, stack.image_pair_fn(short_range))
    assert all(centre_error(f, t) < 0.5 for f, t in zip(fs, truth, strict=True))
    cold = stack.image_pair_fn(short_range)
    _, fs = stack.align_stack(secs, lambda s, t, init: cold(s, t, torch.zeros_like(init)))
    assert centre_error(fs[-1], truth[-1]) > 5


def test_median_of_three_predecessors_outvotes_a_damaged_section():
    steps = [(2, 1), (3, -2), (-1, 3), (2, 2)]
    secs, truth = drifting_stack(steps)
    g = torch.Generator().manual_seed(5)
    secs[2] = torch.rand(secs[2].shape, generator=g) * 200 + 20  # damaged: noise, not tissue
    _, one = stack.align_stack(secs, phase_pairs(), predecessors=1)
    _, three = stack.align_stack(secs, phase_pairs(), predecessors=3)
    assert centre_error(one[3], truth[3]) > 2  # derailed by the damaged section before it
    assert centre_error(three[3], truth[3]) < 0.5 and centre_error(three[4], truth[4]) < 0.5


def test_a_section_without_data_is_skipped():
    secs, truth = drifting_stack([(2, 1), (3, -2), (-1, 3)])
    secs[2] = torch.zeros_like(secs[2])
    aligned, fs = stack.align_stack(secs, phase_pairs())
    assert torch.equal(fs[2], fs[1]) and not stack.has_data(aligned[2])
    assert centre_error(fs[3], truth[3]) < 1.0  # aligned onto section 1, the last with data


def test_damaged_sections_are_targets_only_when_needed():
    has = [True] * 6
    damaged = [False, False, False, True, False, False]
    assert stack.predecessor_indices(4, has, 1, damaged) == [2]
    assert stack.predecessor_indices(4, has, 3, damaged) == [2, 1, 0]
    assert stack.predecessor_indices(5, has, 2, damaged) == [4, 2]
    assert stack.predecessor_indices(4, has, 4, damaged) == [2, 1, 0, 3]  # not enough others
    assert stack.predecessor_indices(4, has, 1) == [3]


def test_a_section_after_a_damaged_one_is_aligned_onto_the_one_before():
    """With defect masks, the section after a damaged one goes onto the last undamaged aligned
    section, starting from its field; masked pixels are empty in the aligned image."""
    secs, truth = drifting_stack([(2, 1), (3, -2), (-1, 3)])
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 40:44, :] = 1
    calls = []

    def record(src, tgt, init):
        calls.append((tgt.clone(), init.clone()))
        return phase_pairs()(src, tgt, init)

    aligned, fs = stack.align_stack(secs, record, dtype=np.uint8,
                                    masks=[None, None, mask, None])
    masked = stack.render(secs[2] * (1 - mask), fs[2], np.uint8)
    assert torch.equal(aligned[2], masked) and not torch.equal(aligned[2],
                                                               stack.render(secs[2], fs[2],
                                                                            np.uint8))
    assert torch.equal(calls[-1][0], aligned[1]) and torch.equal(calls[-1][1], fs[1])
    for f, t in zip(fs, truth, strict=True):
        assert centre_error(f, t) < 0.5


def test_predecessors_and_median():
    assert stack.predecessor_indices(4, [True, False, True, True], 3) == [3, 2, 0]
    assert stack.predecessor_indices(1, [False], 2) == []
    a, b, c = (torch.full((1, 2, 2, 2), v) for v in (1.0, 5.0, 2.0))
    assert torch.equal(stack.combine_fields([a, b, c]), c)
    assert torch.equal(stack.combine_fields([a, b]), torch.full((1, 2, 2, 2), 3.0))
    with pytest.raises(ValueError):
        stack.align_stack([a[:, :1]], phase_pairs(), predecessors=0)


def test_section_progress_counts_and_estimates(capsys):
    lines: list[str] = []
    bar = stack.SectionProgress(4, done=1, emit=lines.append)
    bar.step(7)
    bar.step(8, " (note)")
    assert lines[0].startswith("section 2/4 (z 7) done;") and "ETA" in lines[0]
    assert lines[1].startswith("section 3/4 (z 8) done (note);")


@needs_fibsem
def test_known_stacks_truth_restores_the_block():
    block = nb.load_blocks(shared_data("fibsem"))["sample1"]
    for kind in ("neighbours", "same"):
        s = stacks.make_stack(block, "sample1", 193, kind=kind)
        again = stacks.make_stack(block, "sample1", 193, kind=kind)
        assert len(s.sections) == 15 and all(torch.equal(a, b) for a, b in
                                              zip(s.sections, again.sections, strict=True))
        assert s.slices[-1] == 249 if kind == "neighbours" else set(s.slices) == {193}
        assert stacks.stack_errors(s, s.truth)["median"] == 0.0
        raw = stacks.raw_errors(s)
        assert raw["median"] > 3 and raw["worst_section"] > raw["median"]
        back = fields.warp_image(s.sections[-1], s.truth[-1])
        inner = (slice(None), slice(None), slice(32, -32), slice(32, -32))
        if kind == "neighbours":  # the truth undoes the deformation (up to interpolation)
            assert float((back - s.originals[-1])[inner].abs().median()) < 3
    with pytest.raises(Exception, match="do not fit"):
        stacks.make_stack(block, "sample1", 240)


@needs_fibsem
@pytest.mark.slow
def test_stack_benchmark_quick_run_writes_its_table(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "stack.py"), "--quick", "--no-metroem",
         "--threads", "1", "--out", str(tmp_path), "--fibsem", str(shared_data("fibsem"))],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "stack.json").read_text())
    same, nbr = result["table"]["same"], result["table"]["neighbours"]
    # on one slice repeated, a dense flow recovers the stack; the unaligned stack is far off
    assert same["farneback+pc"]["median"] < 0.5 < same["unaligned"]["median"]
    # on real neighbours every image-only method follows the tissue's own drift
    assert nbr["farneback+pc"]["median"] > same["farneback+pc"]["median"]
    assert set(result["content_drift"]) == {"sample1"}
    assert "| farneback+pc |" in (tmp_path / "stack.md").read_text()


# --- misaligned sections and runaway misalignment ------------------------------------------------


def test_pearson_from_chunk_sums_is_the_section_correlation():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 40, 40, generator=g) * 200 + 10
    b = 0.5 * a + torch.rand(1, 1, 40, 40, generator=g) * 100
    b[..., :5, :] = 0  # no data: left out
    whole = stack.pearson(stack.similarity_sums(a, b))
    sums = stack.similarity_sums(a[..., :17, :], b[..., :17, :]) + \
        stack.similarity_sums(a[..., 17:, :], b[..., 17:, :])
    keep = (b != 0).flatten()
    expected = float(np.corrcoef(a.flatten()[keep], b.flatten()[keep])[0, 1])
    assert abs(whole - expected) < 1e-9 and abs(stack.pearson(sums) - expected) < 1e-9
    assert stack.pearson(stack.similarity_sums(a, torch.full_like(a, 7.0))) is None  # flat
    assert stack.pearson(stack.similarity_sums(a, torch.zeros_like(a))) is None  # no data


def test_guard_flags_a_drop_and_stops_a_runaway():
    guard = stack.MisalignmentGuard(ratio=0.5, stop=3)
    assert not guard.judge(1, 0.05)  # no verdict before two well-aligned sections
    assert not guard.judge(2, 0.8) and not guard.judge(3, 0.7)
    assert guard.judge(4, 0.2) and guard.is_flagged(4)  # under 0.5 x the 0.7-0.8 level
    assert not guard.judge(5, 0.6) and not guard.is_flagged(5)  # the streak ends
    assert guard.judge(6, 0.1) and guard.judge(7, 0.1)
    with pytest.raises(stack.RunawayMisalignment, match=r"z 6, 7, 8 .* before z 6 is complete"):
        guard.judge(8, 0.1)
    never = stack.MisalignmentGuard(ratio=0.5, stop=0)
    for z, r in enumerate([0.8, 0.8, 0.1, 0.1, 0.1, 0.1], start=1):
        never.judge(z, r)
    assert never.flagged == {3, 4, 5, 6}
    off = stack.MisalignmentGuard(ratio=0.0)
    assert not any(off.judge(z, r) for z, r in enumerate([0.8, 0.8, 0.01, 0.01, 0.01]))
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(stop=-1)):
        with pytest.raises(stack.MetroemError):
            stack.MisalignmentGuard(**bad)


def test_a_misaligned_section_is_not_a_target():
    """A wrong section in the stack (noise instead of tissue) is aligned as well as it can be,
    flagged, and later sections go onto the section before it: the stack stays on track. With
    the guard off (ratio 0), every later section follows the wrong one."""
    steps = [(2, 1), (3, -2), (-1, 3), (2, 2), (1, -3), (-2, 1), (3, 1)]
    secs, truth = drifting_stack(steps)
    g = torch.Generator().manual_seed(5)
    secs[4] = (torch.rand(secs[4].shape, generator=g) * 200 + 20).round()
    guard = stack.MisalignmentGuard()
    _, fs = stack.align_stack(secs, phase_pairs(), dtype=np.uint8, guard=guard)
    assert guard.flagged == {4}
    assert [r["target"] for r in guard.records] == [0, 1, 2, 3, 3, 5, 6]
    assert all(centre_error(fs[z], truth[z]) < 0.5 for z in (5, 6, 7))
    _, off = stack.align_stack(secs, phase_pairs(), dtype=np.uint8,
                               guard=stack.MisalignmentGuard(0.0))
    assert all(centre_error(off[z], truth[z]) > 2 for z in (5, 6, 7))


def test_a_run_of_wrong_sections_stops_the_stack():
    secs, _ = drifting_stack([(2, 1), (3, -2), (-1, 3), (2, 2), (1, -3), (-2, 1)])
    g = torch.Generator().manual_seed(6)
    for z in (3, 4, 5):
        secs[z] = (torch.rand(secs[z].shape, generator=g) * 200 + 20).round()
    with pytest.raises(stack.RunawayMisalignment, match="z 3, 4, 5"):
        stack.align_stack(secs, phase_pairs(), dtype=np.uint8)


def _morph(src: np.ndarray, tgt: np.ndarray, reach: int = 4) -> np.ndarray:
    """The worst kind of aligner: every pixel takes the shift (within ``reach``) at which the
    source looks most like the target there, whatever the tissue."""
    s, t = torch.from_numpy(src).float(), torch.from_numpy(tgt).float()
    best = torch.full_like(t, float("inf"))
    field = torch.zeros(2, *t.shape)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            err = (torch.roll(s, (-dy, -dx), (0, 1)) - t).abs()  # src(p + d) - tgt(p)
            better = err < best
            best = torch.where(better, err, best)
            field[0][better], field[1][better] = float(dx), float(dy)
    return field.numpy()


def test_block_mean_field_is_one_translation_per_cell_and_chunks_agree():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 2, 70, 90, generator=g)
    m = stack.block_mean_field(f, 32)
    assert torch.allclose(m[..., :32, :32], f[..., :32, :32].mean((-2, -1), keepdim=True)
                          .expand(1, 2, 32, 32), atol=1e-6)
    assert torch.allclose(m[..., 64:, 64:], f[..., 64:, 64:].mean((-2, -1), keepdim=True)
                          .expand(1, 2, 6, 26), atol=1e-6)  # smaller edge cells
    # a chunk starting at a multiple of the block gets the same cells as the whole field
    assert torch.equal(stack.block_mean_field(f[..., 32:, 32:], 32), m[..., 32:, 32:])


def test_a_wrong_section_morphed_into_its_target_is_still_flagged():
    """An aligner that bends a wrong section's pixels into its target's shapes makes the
    aligned pair correlate well; the guard judges the field's block means, which cannot."""
    steps = [(2, 1), (3, -2), (-1, 3), (2, 2), (1, -3), (-2, 1)]
    secs, _ = drifting_stack(steps)
    g = torch.Generator().manual_seed(5)
    secs[4] = (torch.rand(secs[4].shape, generator=g) * 200 + 20).round()
    wrong = secs[4]
    shift = stack.image_pair_fn(baselines.METHODS["phasecorr"])
    morph = stack.image_pair_fn(_morph)

    def pairs(src, tgt, init):
        return (morph if torch.equal(src, wrong) else shift)(src, tgt, init)

    guard = stack.MisalignmentGuard()
    aligned, _ = stack.align_stack(secs, pairs, dtype=np.uint8, guard=guard)
    fooled = stack.pearson(stack.similarity_sums(aligned[4], aligned[3]))
    assert fooled > 0.5 * guard.level()  # what a guard on the aligned images would pass
    assert guard.flagged == {4}
    assert [r["target"] for r in guard.records][4:] == [3, 5]
