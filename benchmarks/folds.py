"""Folds with a known answer: is the field right next to a fold, where it must jump?

Pairs (``metroem.eval.folds``): a section folded along a gentle arc (16 px of tissue lost, both
sides pulled 8 px toward it, a 3 px dark line) and moved by a moderate smooth deformation,
against the unfolded section:

* ISBI (4 nm px): held-out sections 1, 15 and 29 against themselves (gap 0, noise added);
* FIB-SEM (10 nm px, registered blocks): held-out slices against themselves (gap 0) and against
  the slice 4 before (gap 4, 40 nm: the tissue changes too).

Every method gets the source's defect mask (the fold line) where it can use it:

* ``<method>``: the pair as it is, mask ignored;
* ``<method> masked``: the fold line set to no data (0);
* ``<method> masked split``: no data, and the source, cut in two by the fold line, aligned
  piece by piece (:func:`metroem.defects.align_with_defects`), so the field may jump.

Scores: median end-point error within 16 px of the fold (``near``; median over pairs of each
pair's median, and of each pair's p95), the median elsewhere (``far``), seconds per pair.
Writes ``<out>/folds.json`` and ``<out>/folds.md``.

Examples::

    python benchmarks/folds.py                       # everything (about 3 min on 2 cores)
    python benchmarks/folds.py --quick --out /tmp/f  # smoke run: one pair per table
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (shared helpers: results files, threads, number format)

from metroem import defects  # noqa: E402
from metroem.errors import MetroemError, cli_errors  # noqa: E402
from metroem.eval import baselines, folds, pairs  # noqa: E402
from metroem.eval import neighbours as nb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYRAMID = REPO / "models" / "isbi"
DEFAULT_OUT = REPO / "benchmarks" / "results"
ISBI_NM, FIBSEM_NM = 4.0, 10.0
ISBI_SECTIONS = [1, 15, 29]  # held out of the shipped pyramid's training
FIB_PER_BLOCK = 3
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))

Align = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid", default=str(DEFAULT_PYRAMID),
                   help="metroem pyramid (MIP0 pixel size from its pyramid.json, else 4 nm)")
    p.add_argument("--no-metroem", action="store_true", help="peers only")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: one pair per table")
    p.add_argument("--seed", type=int, default=0)
    return p


def _as_align(fn: baselines.FieldFn) -> Align:
    return lambda s, t: baselines.align(fn, s, t)


def bases(args) -> dict[str, dict[float, Align]]:
    """Base method -> pixel size (nm) -> ``(src, tgt) -> field`` on ``(1, 1, H, W)`` tensors."""
    out = {"identity": {}, "farneback+pc": {}}
    for nm in (ISBI_NM, FIBSEM_NM):
        out["identity"][nm] = _as_align(baselines.METHODS["identity"])
        out["farneback+pc"][nm] = _as_align(baselines.METHODS["farneback+pc"])
    if not args.no_metroem:
        from metroem.aligner import load_aligner
        from metroem.modules import pyramid_settings

        pyramid_nm = pyramid_settings(args.pyramid).get("resolution_nm", 4.0)
        out["metroem"] = {}
        for nm in (ISBI_NM, FIBSEM_NM):
            mip = max(0, round(math.log2(nm / pyramid_nm)))  # as the neighbour benchmark
            out["metroem"][nm] = load_aligner(args.pyramid, input_mip=mip,
                                              smoothing_nm=0)  # the own field
    return out


def variants(base: str) -> dict[str, dict]:
    """Row name -> :func:`metroem.defects.align_with_defects` settings for one base method."""
    if base == "identity":
        return {base: {"use_mask": False}}
    return {base: {"use_mask": False}, f"{base} masked": {"split": False},
            f"{base} masked split": {"split": True}}


def run_pair(align: Align, pair: folds.FoldPair, use_mask: bool = True,
             split: bool = True) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        if use_mask:
            field = defects.align_with_defects(align, pair.src, pair.tgt,
                                               src_mask=pair.src_defect, split=split)
        else:
            field = align(pair.src, pair.tgt)
    return field, time.perf_counter() - t0


def tables(args) -> dict[str, tuple[float, list[folds.FoldPair]]]:
    """Table name -> (pixel size in nm, pairs)."""
    isbi = pairs.load_stack(None)
    if isbi.shape[0] < 30:
        raise MetroemError("the ISBI folder must hold 30 sections (held out 1, 15, 29)")
    zs = ISBI_SECTIONS[:1] if args.quick else ISBI_SECTIONS
    out = {"ISBI, same section (gap 0)": (ISBI_NM, folds.make_pairs(
        {"isbi": isbi}, {"isbi": zs}, (0,), args.seed))}
    blocks = nb.load_blocks(None)
    per_block = 1 if args.quick else FIB_PER_BLOCK
    for gap in (0, 4):
        zs_fib = {}
        for name, stack in blocks.items():
            held = nb.split(stack.shape[0])[1]
            zs_fib[name] = torch.linspace(held.start, held.stop - 1 - 4, per_block).round()\
                .long().tolist()
        if args.quick:
            blocks_used = dict(list(blocks.items())[:1])
            zs_fib = {k: zs_fib[k] for k in blocks_used}
        else:
            blocks_used = blocks
        title = "FIB-SEM, same slice (gap 0)" if gap == 0 else "FIB-SEM, 40 nm neighbours (gap 4)"
        out[title] = (FIBSEM_NM, folds.make_pairs(blocks_used, zs_fib, (gap,), args.seed))
    return out


def _median(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.median(xs)) if xs else math.nan


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Folds with a known answer",
        "",
        f"Generated by `{cfg['command']}` on {cfg['machine']}, {cfg['threads']} threads, "
        f"torch {cfg['torch']}, {cfg['total_seconds']:.0f} s. Fold: `{cfg['fold']}`; then "
        f"`{cfg['deformation']}`. The fold's jump is {cfg['jump_px']:g} px.",
        "",
        "`near` = median over pairs of each pair's median end-point error (px) within "
        f"{cfg['near_px']} px of the fold; `near p95` = the same for each pair's p95; `far` = "
        "the median elsewhere; `s` = seconds per pair. Pixels whose tissue went into the fold "
        "have no answer and are left out. Issue 14 asks for the defect to be masked and the "
        "field to be free to jump across it (the `masked split` rows).",
        "",
    ]
    for title, rows in result["tables"].items():
        n = next(iter(rows.values()))["pairs"] if rows else 0
        lines += [f"## {title}", "", f"{n} pair(s).", "",
                  "| method | near | near p95 | far | s |", "|---|---:|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {q._fmt(r['near'])} | {q._fmt(r['near_p95'])} | "
                         f"{q._fmt(r['far'])} | {q._fmt(r['seconds'])} |")
        lines.append("")
    lines += ["## Methods", ""] + [f"- `{m}`: {d}" for m, d in result["methods"].items()]
    return "\n".join(lines) + "\n"


DESCRIPTIONS = {
    "identity": "the zero field (the misalignment itself)",
    "farneback+pc": baselines.method_params("farneback+pc")
    if "farneback+pc" in baselines.METHODS else "",
    "metroem": "the shipped pyramid (models/isbi; FIB-SEM slices as its MIP 1)",
}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    q.set_threads(args.threads)
    t_start = time.perf_counter()
    all_tables = tables(args)
    methods = bases(args)
    result: dict = {"tables": {}, "methods": {}}
    for base in methods:
        for row in variants(base):
            result["methods"][row] = DESCRIPTIONS.get(base, base) + (
                "" if row == base else ", " + row[len(base) + 1:])
    for title, (nm, pair_list) in all_tables.items():
        rows = {}
        for base, fns in methods.items():
            for row, kw in variants(base).items():
                scores, secs = [], []
                for pair in pair_list:
                    field, dt = run_pair(fns[nm], pair, **kw)
                    scores.append(folds.fold_errors(field, pair))
                    secs.append(dt)
                rows[row] = {"near": _median([s["near"] for s in scores]),
                             "near_p95": _median([s["near_p95"] for s in scores]),
                             "far": _median([s["far"] for s in scores]),
                             "seconds": float(np.mean(secs)), "pairs": len(pair_list)}
                print(f"{title} | {row}: near {rows[row]['near']:.2f} far "
                      f"{rows[row]['far']:.2f}", file=sys.stderr)
        result["tables"][title] = rows
    result["config"] = {
        "command": "python benchmarks/folds.py" + (" " + " ".join(argv) if argv else ""),
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
        "threads": args.threads, "torch": torch.__version__,
        "fold": str(folds.FOLD), "deformation": str(folds.DEFORMATION),
        "jump_px": folds.FOLD.width, "near_px": folds.NEAR_PX,
        "total_seconds": time.perf_counter() - t_start,
    }
    q.write_results(Path(args.out), "folds", result, markdown(result))
    print(f"wrote {Path(args.out) / 'folds.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
