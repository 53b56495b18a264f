"""Aligning a whole stack with a known answer: does the aligned stack return the original block?

Stacks (``metroem.eval.stacks``): 15 slices 40 nm apart (every 4th of the 10 nm FIB-SEM blocks,
slices 193-249 of each block), every slice but the first deformed by its own known field: a
drift that is a random walk of up to +-5 px per section and axis, plus rotation (+-1 deg),
scale and shear (+-1 %) and an elastic part (1.5 px). The first section is the fixed reference.
Every method runs the same serial alignment (:func:`metroem.stack.align_stack`: each section
onto the aligned section before it, starting from its field; ``k3`` = onto the three before,
median of the fields), so the rows differ only in how a pair is aligned.

Stack kinds per block: ``neighbours`` (consecutive slices: the tissue changes from section
to section, as in a real stack), ``same`` (one slice repeated with noise: no change of
content, what is left is the error a method accumulates by itself), ``fold`` (``same`` with
the middle section folded, its defect mask given) and ``wrong`` (``same`` with the middle
section showing unrelated tissue: does one bad section derail the sections after it?).

Measured against the true fields, away from the border: the median over all pixels of all
sections, p95, the worst section's median, the worst 64 px block's median, the slope of the
per-section median along z (px per section: drift), and the median after removing the
block's own apparent tissue drift (the cumulative phase-correlation shift between the
undeformed slices, which an image-only method cannot tell from a real drift).

Writes ``<out>/stack.json`` and ``<out>/stack.md``.

Examples::

    python benchmarks/stack.py                       # everything (about 10 min on 2 cores)
    python benchmarks/stack.py --quick --out /tmp/s  # smoke run: one block, 5 sections
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
import neighbours  # noqa: E402  (the neighbour benchmark's post-processing of a field)
import quality as q  # noqa: E402  (shared helpers: results files, threads)

from metroem import detrend, regularize, stack  # noqa: E402
from metroem.errors import MetroemError, cli_errors  # noqa: E402
from metroem.eval import baselines, folds, metrics, stacks  # noqa: E402
from metroem.eval import neighbours as nb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYRAMID = REPO / "models" / "isbi"
DEFAULT_OUT = REPO / "benchmarks" / "results"
FIBSEM_NM = 10.0
START, SECTIONS, GAP = 193, 15, 4  # slices 193, 197, ..., 249: 40 nm apart
LONG_START, LONG_SECTIONS = 1, 63  # slices 1, 5, ..., 249: the whole block, 40 nm apart
# the long stacks' rows (the others cost too much there)
LONG_METHODS = ("translation only (phasecorr)", "farneback+pc reg 640nm", "metroem",
                "metroem reg 640nm", "metroem reg 640nm gated")
DETREND = 8.0  # sections: the sigma of the `detrend` rows (metroem align --detrend_sections)
TARGETS = {"median": 0.5, "worst_section": 1.0, "worst_block": 3.0}  # issue 14, px
KINDS = {"neighbours": "Consecutive slices (tissue changes, a real stack)",
         "independent": "Consecutive slices, each section placed on its own (no drift in the "
                        "raw stack)",
         "long": "A long stack, each section placed on its own",
         "same": "One slice repeated with noise (no change of content)",
         "fold": "One slice repeated, the middle section folded (a damaged section)",
         "wrong": "One slice repeated, the middle section a wrong one (unrelated tissue)"}
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fibsem", default=None, help="folder of registered blocks "
                   f"(default {nb.default_data_dir()})")
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid", default=str(DEFAULT_PYRAMID),
                   help="metroem pyramid")
    p.add_argument("--no-metroem", action="store_true", help="peers only")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: one block, 5 sections")
    p.add_argument("--seed", type=int, default=0)
    return p


# --- pair functions ------------------------------------------------------------------------------


def _post(method: Callable, post: Callable) -> Callable:
    """``method`` followed by one of the neighbour benchmark's post-processings (10 nm px)."""
    def run(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        f = torch.from_numpy(np.asarray(method(src, tgt), np.float32))[None]
        s = torch.from_numpy(src)[None, None]
        t = torch.from_numpy(tgt)[None, None]
        return post(f, s, t, FIBSEM_NM)[0].numpy()

    return run


def methods(args) -> dict[str, tuple[stack.PairFn, int]]:
    """name -> (pair function, predecessors)."""
    fb = baselines.METHODS["farneback+pc"]
    out: dict[str, tuple[stack.PairFn, int]] = {
        "translation only (phasecorr)": (stack.image_pair_fn(baselines.METHODS["phasecorr"]),
                                         1),
        "farneback+pc": (stack.image_pair_fn(fb), 1),
        f"farneback+pc gauss {neighbours.FLOW_SIGMA_PX:g}px (smoothed flow)":
            (stack.image_pair_fn(_post(fb, neighbours._gauss(neighbours.FLOW_SIGMA_PX))), 1),
        "farneback+pc reg 640nm":
            (stack.image_pair_fn(_post(fb, neighbours._regularized(640))), 1),
    }
    if args.no_metroem:
        return out
    from metroem.aligner import load_aligner
    from metroem.modules import pyramid_settings

    # the MIP and stages metroem align uses for 10 nm pixels (as the neighbour benchmark)
    pyramid_nm = pyramid_settings(args.pyramid).get("resolution_nm")
    if pyramid_nm:
        from metroem.inference import pyramid_input

        mip, fib_stages, _ = pyramid_input(args.pyramid, FIBSEM_NM, None, None)
        mip = mip or 0
    else:  # a pyramid that does not say its pixel size: 4 nm, every stage
        mip, fib_stages = max(0, round(math.log2(FIBSEM_NM / 4.0))), None
    variants = [("metroem", 0.0, 1), ("metroem k3", 0.0, 3)]
    if not args.quick:
        variants += [("metroem reg 640nm", 640.0, 1), ("metroem reg 640nm k3", 640.0, 3),
                     ("metroem reg 640nm gated", 640.0, 1)]
    for name, length, k in variants:
        gate = regularize.GATE if name.endswith(" gated") else "off"
        al = load_aligner(args.pyramid, input_mip=mip, smoothing_nm=length,  # 0: the own field
                          resolution_nm=FIBSEM_NM / 2**mip, smoothing_gate=gate,
                          stages=fib_stages)
        out[name] = (stack.aligner_pair_fn(al), k)
    return out


# --- scoring -------------------------------------------------------------------------------------


def drift_free_median(s: stacks.KnownStack, whole: list[torch.Tensor]) -> float:
    """Median error after adding the block's own apparent tissue drift to the truth."""
    drift = np.cumsum([(0.0, 0.0)] + stacks.content_drift(s), axis=0)
    vals = []
    h, w = s.truth[0].shape[-2:]
    inner = metrics.interior_mask((h, w), stacks.MARGIN)
    for i in range(1, len(whole)):
        ref = s.truth[i] + torch.tensor(drift[i], dtype=torch.float32).view(1, 2, 1, 1)
        mask = inner & metrics.valid_after_warp(s.sections[i], s.truth[i], margin=2)
        vals.append(metrics.epe_map(whole[i], ref)[mask])
    return float(torch.cat(vals).median())


def run_method(pair_fn: stack.PairFn, k: int, s: stacks.KnownStack, masks: bool = True,
               guard_ratio: float = stack.MISALIGNED_RATIO,
               detrend_sigma: float | None = None) -> dict | tuple[dict, dict]:
    """One method on one stack; ``masks``: give it the stack's defect masks (if it has any);
    ``guard_ratio``: the misalignment guard's ratio (0 = off; it flags, never stops here).
    With ``detrend_sigma`` also the same alignment detrended (:mod:`metroem.detrend`, as
    ``align_stack(detrend_sections=...)`` does it): ``(serial row, detrended row)``."""
    t0 = time.perf_counter()
    guard = stack.MisalignmentGuard(guard_ratio, stop=0)
    aligned, whole = stack.align_stack(
        s.sections, pair_fn, predecessors=k, dtype=np.uint8,
        masks=s.masks if masks and any(m is not None for m in s.masks) else None, guard=guard)
    dt = time.perf_counter() - t0
    row = _scored(s, whole, guard, dt)
    if detrend_sigma is None:
        return row
    t0 = time.perf_counter()
    skip = [z for z, sec in enumerate(s.sections)
            if not stack.has_data(sec) or guard.is_flagged(z)]
    flat = detrend.detrend_fields(whole, aligned, detrend_sigma, skip)
    return row, _scored(s, flat, guard, dt + time.perf_counter() - t0)


def _scored(s: stacks.KnownStack, whole: list[torch.Tensor], guard, seconds: float) -> dict:
    row = stacks.stack_errors(s, whole)
    row["flagged"] = sorted(guard.flagged)
    row["drift_free_median"] = drift_free_median(s, whole)
    row["seconds_per_section"] = seconds / (len(s.sections) - 1)
    return row


def aggregate(rows: list[dict]) -> dict:
    keys = ["median", "p95", "worst_section", "worst_block", "slope", "drift_free_median",
            "seconds_per_section", "after"]
    agg = {k: float(np.median([r[k] for r in rows])) for k in keys}
    for k in ("worst_section", "worst_block"):  # the worst over the blocks, not the median
        agg[k] = float(max(r[k] for r in rows))
    agg["flagged"] = sum(len(r.get("flagged", [])) for r in rows)
    return agg


# --- report --------------------------------------------------------------------------------------


def _f(v: float, nd: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "# Stack alignment with a known answer",
        "",
        f"Generated by `{c['command']}` on {c['machine']}, {c['threads']} threads, torch "
        f"{c['torch']}, {c['total_seconds']:.0f} s. {c['sections']} sections {c['gap']} slices "
        f"(40 nm) apart from slice {c['start']} of each FIB-SEM block ({c['blocks']}; "
        f"{c['size']} px, 10 nm), the first fixed, the others deformed: drift random walk "
        f"+-{stacks.DRIFT_STEP:g} px per section and axis (the `independent` stacks instead: "
        f"each section its own offset, +-{stacks.INDEPENDENT_OFFSET:g} px per axis), plus "
        f"`{c['deformation']}`. "
        "Every method runs the same serial alignment (`metroem.stack.align_stack`); `k3` "
        "aligns onto the three aligned sections before and takes the median; `detrend "
        f"{DETREND:g}` is the same alignment with the trend of the stack's placement along z "
        f"removed (`metroem.detrend`, `--detrend_sections {DETREND:g}`: right when the raw "
        "sections were placed independently, wrong for a drifting block face). `reg 640nm` "
        "is `--smoothing_nm 640` with the match gate off (smoothed everywhere), `gated` with "
        f"it on (`metroem.regularize.GATE` {regularize.GATE}: kept as matched where the "
        "warped section correlates with its target like a copy of the same section).",
        "",
        "Errors in px against the true fields (the original block), away from the border. "
        "`worst section` and `worst 64px block` are the worst over both blocks; `slope` is the "
        "growth of the per-section median along z (px per section); `drift-free` is the "
        "median against the truth plus the block's own apparent tissue drift (see below).",
        "",
        f"Targets (issue 14): median <= {TARGETS['median']}, worst section <= "
        f"{TARGETS['worst_section']}, worst block <= {TARGETS['worst_block']}.",
        "",
    ]
    for kind, title in KINDS.items():
        if kind not in result["table"]:
            continue
        damaged = kind in ("fold", "wrong")
        if kind == "fold":
            lines += [f"Section {c['fold_at']} of each stack is folded (`{c['fold']}`) and its "
                      "defect mask is given to every method (`metroem.defects`: masked pixels "
                      "are no data, the section is aligned piece by piece); `(mask not given)` "
                      "is the same method without it. `after` is the median over the "
                      "sections after the folded one; the lost strip is not scored.", ""]
        if kind == "independent":
            lines += ["The same slices and section deformations as the first table, but each "
                      "section has its own offset about the reference's frame (sections picked "
                      "up and imaged one by one, as in ssTEM or ATUM) instead of a random walk: "
                      "the raw stack has no drift, so any drift in the aligned stack is the "
                      "aligner's.", ""]
        if kind == "long":
            lines += [f"{c['long_sections']} sections {c['gap']} slices apart from slice "
                      f"{c['long_start']} of each block (the whole block; the metroem rows "
                      "include slices some of the pyramid's training pairs came from), placed "
                      "as in the table before: what a serial aligner's drift becomes over a "
                      "longer stack, and what detrending takes out.", ""]
        if kind == "wrong":
            lines += [f"Section {c['fold_at']} of each stack shows a slice "
                      f"{stacks.WRONG_OFFSET} slices away (unrelated tissue: a misplaced or "
                      "ruined section; not scored, no field is right for it). `after` is the "
                      "median over the sections after it; `(guard off)` is the same method "
                      "with `--misaligned_ratio 0`.", ""]
        lines += [f"## {title}", "",
                  "| method | median | p95 | worst section | worst 64px block | slope px/section "
                  + ("| after " if damaged else "") +
                  "| drift-free median | flagged | s/section | targets met |",
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if damaged else "")]
        for name, a in result["table"][kind].items():
            met = all(a[k] <= v for k, v in TARGETS.items())
            lines.append(
                f"| {name} | {_f(a['median'])} | {_f(a['p95'])} | {_f(a['worst_section'])} | "
                f"{_f(a['worst_block'])} | {_f(a['slope'])} | "
                + (f"{_f(a['after'])} | " if damaged else "")
                + f"{_f(a['drift_free_median'])} | {a.get('flagged', 0)} | "
                f"{_f(a['seconds_per_section'], 2)} | {'yes' if met else 'no'} |")
        lines.append("")
    lines += ["`flagged`: sections the misalignment guard (`metroem.stack.MisalignmentGuard`, "
              "the default of `metroem align`) found misaligned and did not use as targets, "
              "summed over the blocks; three in a row would stop `metroem align`.", ""]
    lines += ["## The blocks' own apparent drift", "",
              "Phase correlation between consecutive *undeformed* slices of the stack (true "
              "field zero) finds a shift in the same direction section after section: the "
              "tissue itself moves through the block (oblique neurites), and an image-only "
              "serial aligner follows it. Per block, mean shift per section (x, y) and the "
              "total over the stack:", ""]
    for name, d in result["content_drift"].items():
        lines.append(f"- {name}: ({d['mean'][0]:+.2f}, {d['mean'][1]:+.2f}) px per section, "
                     f"({d['total'][0]:+.1f}, {d['total'][1]:+.1f}) px over the stack")
    lines.append("")
    return "\n".join(lines)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    q.set_threads(args.threads)
    t_start = time.perf_counter()
    blocks = nb.load_blocks(args.fibsem)
    if args.quick:
        blocks = dict(list(blocks.items())[:1])
    n = 5 if args.quick else SECTIONS
    start = blocks[next(iter(blocks))].shape[0] - 1 - (n - 1) * GAP
    if not args.quick and start != START:
        raise MetroemError(f"blocks of {start + 57} slices; the stack benchmark expects 250")
    fold_at = n // 2
    n_long = 9 if args.quick else LONG_SECTIONS
    long_start = blocks[next(iter(blocks))].shape[0] - 1 - (n_long - 1) * GAP

    def make(kind: str, b: str, v: torch.Tensor) -> stacks.KnownStack:
        if kind == "long":
            return stacks.make_stack(v, b, long_start, n_long, GAP, "neighbours",
                                     seed=args.seed, placement="independent")
        return stacks.make_stack(
            v, b, start, n, GAP, "neighbours" if kind in ("neighbours", "independent") else
            "same", seed=args.seed,
            placement="independent" if kind == "independent" else "walk",
            fold_at=fold_at if kind == "fold" else None,
            wrong_at=fold_at if kind == "wrong" else None)

    known = {(kind, b): make(kind, b, v) for kind in KINDS for b, v in blocks.items()}
    rows: dict[str, dict[str, list[dict]]] = {kind: {} for kind in KINDS}
    for kind in rows:
        rows[kind]["unaligned"] = [stacks.raw_errors(s) | {
            "drift_free_median": drift_free_median(s, [torch.zeros_like(t) for t in s.truth]),
            "seconds_per_section": 0.0} for (k, _), s in known.items() if k == kind]
    for name, (fn, k) in methods(args).items():
        t0 = time.perf_counter()
        for kind in rows:
            if kind == "long" and name not in LONG_METHODS:
                continue
            if kind in ("neighbours", "independent", "long"):  # serial, and detrended after
                both = [run_method(fn, k, s, detrend_sigma=DETREND)
                        for (kk, _), s in known.items() if kk == kind]
                rows[kind][name] = [b[0] for b in both]
                rows[kind][f"{name} detrend {DETREND:g}"] = [b[1] for b in both]
                continue
            rows[kind][name] = [run_method(fn, k, s) for (kk, _), s in known.items()
                                if kk == kind]
        if name == "metroem":  # the fold without its mask: what the mask buys
            rows["fold"]["metroem (mask not given)"] = [
                run_method(fn, k, s, masks=False) for (kk, _), s in known.items()
                if kk == "fold"]
        if name in ("metroem", "farneback+pc"):  # the wrong section without the guard
            rows["wrong"][f"{name} (guard off)"] = [
                run_method(fn, k, s, guard_ratio=0.0) for (kk, _), s in known.items()
                if kk == "wrong"]
        print(f"{name:44s} {time.perf_counter() - t0:7.1f} s", flush=True)
    drift = {}
    for (kind, b), s in known.items():
        if kind == "neighbours":  # the same slices as "independent"
            d = np.array(stacks.content_drift(s))
            drift[b] = {"mean": d.mean(0).tolist(), "total": d.sum(0).tolist()}
    first = next(iter(known.values()))
    result = {
        "config": {
            "command": "python benchmarks/stack.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.processor() or ''} "
                       f"({os.cpu_count()} CPUs)".replace("  ", " "),
            "threads": args.threads, "torch": torch.__version__,
            "blocks": ", ".join(blocks), "start": start, "sections": n, "gap": GAP,
            "size": "x".join(str(v) for v in first.sections[0].shape[-2:][::-1]),
            "deformation": repr(stacks.SECTION_DEFORMATION), "seed": args.seed,
            "long_start": long_start, "long_sections": n_long,
            "drift_step": stacks.DRIFT_STEP, "independent_offset": stacks.INDEPENDENT_OFFSET,
            "detrend_sections": DETREND,
            "fold_at": fold_at, "fold": repr(folds.FOLD),
            "pyramid": None if args.no_metroem else str(args.pyramid),
            "total_seconds": time.perf_counter() - t_start,
        },
        "targets": TARGETS,
        "table": {kind: {m: aggregate(r) for m, r in ms.items()} for kind, ms in rows.items()},
        "content_drift": drift,
        "rows": rows,
    }
    out = Path(args.out)
    q.write_results(out, "stack", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'stack.json'} and {out / 'stack.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
