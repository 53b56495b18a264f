"""Alignment quality of metroem and classical baselines on synthetic pairs with known answers.

For every difficulty of :data:`metroem.eval.pairs.DIFFICULTIES` and every method it measures

* same-section pairs (deformed noisy copy vs the section): end-point error (EPE) against the
  exact ground-truth field, over target tissue whose ground-truth sample lies in the source;
* neighbouring-section pairs (section z deformed vs section z-1): equivariance EPE, the gap
  between the method's field on the deformed pair and ``compose(h, f0)`` from its own field
  ``f0`` on the undeformed pair (see docs/evaluation.md), plus the chunked Pearson r after;
* folds (Jacobian determinant <= 0) of every field, failures (median error above
  ``--fail-px`` or an exception) and seconds per alignment.

Writes ``<out>/quality.json`` (every pair and the aggregated table), ``<out>/quality.md`` and
PNGs (EPE vs difficulty charts, example pair reports).

Examples::

    python benchmarks/quality.py                        # baselines (+ metroem if models/isbi)
    python benchmarks/quality.py --pyramid_path models/isbi --refine
    python benchmarks/quality.py --quick --out /tmp/q   # smoke run: 2 methods, 128 px crops
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metroem import fields
from metroem.atomic import atomic_path
from metroem.errors import MetroemError, cli_errors
from metroem.eval import baselines, metrics, pairs, report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYRAMID = REPO / "models" / "isbi"
DEFAULT_OUT = REPO / "benchmarks" / "results"
FAIL_PX = 2.0
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder of consecutive section images "
                   f"(default {pairs.default_data_dir()})")
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid", default=None,
                   help="metroem pyramid to include "
                   f"(default {DEFAULT_PYRAMID} when it exists)")
    p.add_argument("--no-metroem", action="store_true", help="baselines only")
    p.add_argument("--checkpoint_name", "--checkpoint", dest="checkpoint", default=None,
                   help="checkpoint name inside the pyramid")
    p.add_argument("--refine", action="store_true",
                   help="also run the pyramid with online per-pair refinement (row "
                   "metroem-refine)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="baselines to run (default: every installed one; see --list)")
    p.add_argument("--list", action="store_true", help="list the baselines and exit")
    p.add_argument("--difficulties", nargs="+", default=None, choices=list(pairs.DIFFICULTIES))
    p.add_argument("--per-difficulty", type=int, default=3,
                   help="sections per difficulty, evenly spread (default 3: the held-out "
                   "sections 1, 15 and 29 of the ISBI stack)")
    p.add_argument("--draws", type=int, default=3,
                   help="random deformations per section, kind and difficulty (default 3)")
    p.add_argument("--fail-px", type=float, default=FAIL_PX,
                   help="a pair fails when its median (equivariance) EPE exceeds this")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: identity + dis+pc, 1 pair per kind, 128 px crops, 2 levels")
    p.add_argument("--seed", type=int, default=0)
    return p


def _methods(args) -> dict[str, baselines.FieldFn]:
    names = args.methods or baselines.available_methods()
    if args.quick and args.methods is None:
        names = ["identity", "dis+pc"]
    unknown = [n for n in names if n not in baselines.METHODS]
    if unknown:
        raise MetroemError(
            f"unknown method {unknown[0]!r}; choose from {', '.join(baselines.METHODS)}"
        )
    out: dict[str, baselines.FieldFn] = {n: baselines.METHODS[n] for n in names}
    pyramid = args.pyramid or (str(DEFAULT_PYRAMID) if DEFAULT_PYRAMID.is_dir() else None)
    if args.no_metroem:
        pyramid = None
    if pyramid:
        out["metroem"] = baselines.metroem_method(pyramid, args.checkpoint,
                                                  smoothing_nm=0.0)  # its own field
        if args.refine:
            out["metroem-refine"] = baselines.metroem_method(
                pyramid, args.checkpoint, refine=True, smoothing_nm=0.0
            )
    elif args.refine:
        raise MetroemError("--refine needs a pyramid; pass --pyramid_path DIR")
    return out


def _timed(fn, src, tgt) -> tuple[torch.Tensor | None, float, str | None]:
    t0 = time.perf_counter()
    try:
        field = baselines.align(fn, src, tgt)
    except MetroemError:
        raise
    except Exception as e:  # a baseline blowing up is a failure to report, not a crash
        return None, time.perf_counter() - t0, f"{type(e).__name__}: {e}".splitlines()[0]
    dt = time.perf_counter() - t0
    if not torch.isfinite(field).all():
        return None, dt, "non-finite field"
    return field, dt, None


def _nan_stats() -> dict[str, float]:
    return {"median": math.nan, "p95": math.nan, "max": math.nan, "mean": math.nan, "pixels": 0}


def score_pair(fn, pair: pairs.BenchmarkPair, f0_cache: dict, fail_px: float) -> dict:
    """Run one method on one benchmark pair and measure it (a JSON-ready row)."""
    row: dict = {"pair": pair.name, "kind": pair.kind, "difficulty": pair.difficulty, "z": pair.z}
    seconds = []
    field, dt, err = _timed(fn, pair.src, pair.tgt)
    seconds.append(dt)
    if pair.kind == "same":
        target = metrics.as_field(pair.gt)
        mask = pairs.gt_valid_mask(pair)
    else:
        if pair.z not in f0_cache:
            f0_cache[pair.z] = _timed(fn, pair.src_undeformed, pair.tgt)
            seconds.append(f0_cache[pair.z][1])
        f0, _, err0 = f0_cache[pair.z]
        err = err or err0
        target = None if f0 is None else metrics.equivariance_target(f0, pair.h)
        mask = None
        if target is not None:
            mask = (pair.tgt != 0) & metrics.valid_after_warp(pair.src, target, margin=4)
    row["seconds"] = float(np.mean(seconds))
    if field is None or target is None:
        row.update(epe=_nan_stats(), folds={"count": 0, "fraction": math.nan},
                   failed=True, error=err)
        return row
    row["epe"] = metrics.epe_stats(field, target, mask)
    row["folds"] = metrics.fold_stats(field, mask)
    row["roughness"] = metrics.roughness(field, mask)
    if pair.kind == "neighbour":
        warped = fields.warp_image(pair.src[None, None], field)
        row["pearson"] = metrics.pearson_summary(metrics.chunked_pearson(warped, pair.tgt, 32))
    row["failed"] = not (row["epe"]["median"] <= fail_px)
    row["error"] = None
    return row


def _median(xs) -> float:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.median(xs)) if xs else math.nan


def aggregate(rows: list[dict]) -> dict:
    """Table entry of one method at one difficulty from its per-pair rows."""
    same = [r for r in rows if r["kind"] == "same"]
    nbr = [r for r in rows if r["kind"] == "neighbour"]
    return {
        "epe_median": _median(r["epe"]["median"] for r in same),
        "epe_p95": _median(r["epe"]["p95"] for r in same),
        "equivariance_median": _median(r["epe"]["median"] for r in nbr),
        "equivariance_p95": _median(r["epe"]["p95"] for r in nbr),
        "pearson_mean": _median(r.get("pearson", {}).get("mean") for r in nbr),
        "fold_fraction": _median(r["folds"]["fraction"] for r in rows),
        "fold_count": int(sum(r["folds"]["count"] for r in rows)),
        "failures": int(sum(r["failed"] for r in rows)),
        "pairs": len(rows),
        "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
    }


def deformation_strain(pair_list: list[pairs.BenchmarkPair]) -> dict[str, float]:
    """Median over pairs of the local strain (median and p95) of their synthetic fields."""
    stats = [metrics.strain_stats(p.h, pairs.gt_valid_mask(p)) for p in pair_list]
    return {"median": _median(s["median"] for s in stats), "p95": _median(s["p95"] for s in stats)}


def _fmt(v: float, digits: int = 2) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Alignment quality benchmark",
        "",
        f"`{cfg['command']}` on {cfg['machine']}, {cfg['threads']} threads, "
        f"{cfg['pairs_per_kind']} pairs per kind and difficulty "
        f"({cfg['sections']} sections x {cfg['draws']} "
        f"deformations), sections from `{cfg['data']}`"
        f" ({cfg['size']} px). Total {cfg['total_seconds']:.0f} s.",
        "",
        "EPE = median over pairs of each pair's median end-point error (px) on same-section pairs"
        " against the exact ground truth; equiv. = the same for the equivariance EPE on "
        "neighbouring-section pairs (equiv. p95: its 95th percentile); r = mean chunked "
        "Pearson (32 px blocks) of the warped neighbour pair; folds = median % of pixels with "
        "det J <= 0; fail = pairs with median "
        f"error > {cfg['fail_px']} px or an error; s = seconds per alignment.",
        "",
    ]
    for diff, spec in result["difficulties"].items():
        strain = result.get("strain", {}).get(diff)
        about = "" if strain is None else (
            f" Local strain of the synthetic fields: median {100 * strain['median']:.1f} %, "
            f"p95 {100 * strain['p95']:.1f} %."
        )
        lines += [f"## {diff}", "", f"Deformation: `{spec}`.{about}", "",
                  "| method | EPE | EPE p95 | equiv. | equiv. p95 | r | folds % | fail | s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, t in result["table"][diff].items():
            lines.append(
                f"| {method} | {_fmt(t['epe_median'])} | {_fmt(t['epe_p95'])} | "
                f"{_fmt(t['equivariance_median'])} | {_fmt(t.get('equivariance_p95'))} | "
                f"{_fmt(t['pearson_mean'], 3)} | "
                f"{_fmt(100 * t['fold_fraction'], 3)} | {t['failures']}/{t['pairs']} | "
                f"{_fmt(t['seconds_per_pair'])} |"
            )
        lines.append("")
    lines += ["## Methods", ""]
    lines += [f"- `{m}`: {p}" for m, p in result["methods"].items()]
    return "\n".join(lines) + "\n"


def _json_safe(x):
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_text(path: Path, text: str) -> None:
    with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_results(out: Path, stem: str, result: dict, text: str) -> None:
    """``<out>/<stem>.json`` (strict JSON, NaN as null) and ``<out>/<stem>.md``, each written
    whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / f"{stem}.json",
                json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    _write_text(out / f"{stem}.md", text)


def set_threads(threads: int) -> None:
    """Pin torch's (and OpenCV's, when installed) CPU threads for a benchmark run."""
    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass


def _pictures(out: Path, result: dict, methods: dict, examples: list[pairs.BenchmarkPair]):
    diffs = list(result["difficulties"])
    table = result["table"]
    for key, title, name in (
        ("epe_median", "same-section pairs: median end-point error (px)", "quality_epe.png"),
        ("equivariance_median", "neighbour pairs: median equivariance error (px)",
         "quality_equivariance.png"),
    ):
        series = {m: [table[d][m][key] for d in diffs] for m in methods}
        report.write_epe_chart(out / name, series, diffs, title=title)
    # Example pictures on the hardest difficulty: identity (before) vs the best method.
    hardest = diffs[-1]
    ranked = sorted(
        (m for m in methods if m != "identity"),
        key=lambda m: (np.nan_to_num(table[hardest][m]["epe_median"], nan=1e9)),
    )
    for method in ranked[:1] + [m for m in ("metroem", "metroem-refine") if m in methods]:
        for pair in examples:
            field = baselines.align(methods[method], pair.src, pair.tgt)
            report.write_pair_report(out / "png", pair.src, pair.tgt, field,
                                     name=f"{method}_{pair.name}", gt=pair.gt)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name in baselines.METHODS:
            print(f"{name:14s} {baselines.method_params(name)}")
        return 0
    set_threads(args.threads)
    methods = _methods(args)
    stack = pairs.load_stack(args.data)
    diffs = args.difficulties or list(pairs.DIFFICULTIES)
    per = 1 if args.quick else args.per_difficulty
    draws = 1 if args.quick else args.draws
    crop = 128 if args.quick else None
    if args.quick and args.difficulties is None:
        diffs = ["shift8", "elastic"]
    t_start = time.perf_counter()
    all_pairs = pairs.make_pairs(stack, diffs, per, seed=args.seed, crop=crop, draws=draws)
    rows: dict[str, list[dict]] = {}
    for name, fn in methods.items():
        f0_cache: dict = {}
        rows[name] = []
        t0 = time.perf_counter()
        for pair in all_pairs:
            rows[name].append(score_pair(fn, pair, f0_cache, args.fail_px))
        print(f"{name:18s} {time.perf_counter() - t0:7.1f} s", flush=True)
    table = {
        d: {m: aggregate([r for r in rows[m] if r["difficulty"] == d]) for m in methods}
        for d in diffs
    }
    size = tuple(all_pairs[0].tgt.shape)
    result = {
        "config": {
            "command": "python benchmarks/quality.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.processor() or ''} "
                       f"({os.cpu_count()} CPUs)".replace("  ", " "),
            "threads": args.threads,
            "data": str(args.data or pairs.default_data_dir()),
            "size": f"{size[1]}x{size[0]}",
            "pairs_per_kind": per * draws,
            "sections": per,
            "draws": draws,
            "fail_px": args.fail_px,
            "seed": args.seed,
            "total_seconds": time.perf_counter() - t_start,
            "torch": torch.__version__,
        },
        "difficulties": {d: repr(pairs.DIFFICULTIES[d]) for d in diffs},
        "strain": {d: deformation_strain([p for p in all_pairs if p.difficulty == d])
                   for d in diffs},
        "methods": {m: baselines.method_params(m) or "trained pyramid" for m in methods},
        "table": table,
        "pairs": rows,
    }
    out = Path(args.out)
    write_results(out, "quality", result, markdown(result))
    hardest = [p for p in all_pairs
               if p.difficulty == diffs[-1] and p.z == all_pairs[-1].z and p.draw == 0]
    _pictures(out, result, methods, hardest)
    print(markdown(result))
    print(f"wrote {out / 'quality.json'}, {out / 'quality.md'} and PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
