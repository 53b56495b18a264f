"""Neighbouring sections with a known answer: does a method align the sections or morph the tissue?

Pairs (``metroem.eval.neighbours``): held-out FIB-SEM slices (the last 50 of each block, 10 nm
isotropic, registered by construction) ``gap`` slices apart (10-80 nm), the later one deformed
by a known smooth field (drift up to +-48 px, rotation, scale, shear, elastic). The right
field is the synthetic deformation alone; the tissue change between the slices must be left
alone. For every method and gap it measures

* on deformed pairs: end-point error (EPE) against the truth (median over pairs of each pair's
  median, of each pair's p95, and the worst pair's median), folds (det J <= 0);
* on the undeformed pairs (truth: zero): the field's size, its non-affine part after a
  least-squares affine fit over the interior (the "morph") and its gradient norm (|grad f|_F,
  "strain");
* seconds per pair;

and on real ssTEM neighbours (ISBI, 4 nm px, held-out sections 1/0, 15/14, 29/28): the morph
and strain of the field on the undeformed consecutive pairs, next to the equivariance EPE on
the same sections deformed by the quality benchmark's ``mixed48`` misalignment.

``<method> reg <L>`` is that method followed by :func:`metroem.regularize.smooth_field` with a
smoothing length of L nm (10 nm px on FIB-SEM, 4 nm on ISBI): the trade-off curve of the
setting. Writes ``<out>/neighbours.json`` and ``<out>/neighbours.md``.

Examples::

    python benchmarks/neighbours.py                      # everything (about 10 min, 2 cores)
    python benchmarks/neighbours.py --quick --out /tmp/n # smoke run: 2 gaps, 1 pair each
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
import quality as q  # noqa: E402  (shared table helpers of the quality benchmark)

from metroem import regularize  # noqa: E402
from metroem.errors import MetroemError, cli_errors  # noqa: E402
from metroem.eval import baselines, metrics, pairs  # noqa: E402
from metroem.eval import neighbours as nb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYRAMID = REPO / "models" / "isbi"
DEFAULT_OUT = REPO / "benchmarks" / "results"
FIBSEM_NM = 10.0  # px size of the FIB-SEM blocks
ISBI_NM = 4.0  # px size of the ISBI ssTEM sections
PYRAMID_NM = 4.0  # MIP0 px size of a pyramid without pyramid.json (models/isbi has 4 there)
ISBI_PAIRS = (1, 15, 29)  # held-out ISBI sections; each is aligned onto the one before
INTERIOR = 16  # px dropped along the border for the morph and strain of undeformed pairs
BASELINES = ["identity", "farneback+pc", "dis+pc", "ilk+pc", "tvl1+pc", "elastix"]
LENGTHS_NM = [80.0, 160.0, 320.0, 640.0, 1280.0]  # smoothing lengths of the trade-off curve
FLOW_LENGTHS_NM = [320.0, 640.0]  # the same regulariser on Farneback, for comparison
GATED_LENGTHS_NM = [640.0, 1280.0]  # the regulariser with its match gate (regularize.GATE)
FLOW_SIGMA_PX = 32.0  # "a smoothed flow": Farneback Gaussian-blurred with this sigma (px)
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fibsem", default=None, help="folder of registered blocks "
                   f"(default {nb.default_data_dir()})")
    p.add_argument("--isbi", default=None, help="folder of consecutive ssTEM sections "
                   f"(default {pairs.default_data_dir()}); 'none' skips the ISBI part")
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid", default=None,
                   help="metroem pyramid; its MIP0 pixel size comes"
                   f" from its pyramid.json, else {PYRAMID_NM:g} nm (default {DEFAULT_PYRAMID})")
    p.add_argument("--no-metroem", action="store_true", help="baselines only")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"baselines to run (default: {' '.join(BASELINES)}, where installed)")
    p.add_argument("--lengths", nargs="*", type=float, default=LENGTHS_NM,
                   help="smoothing lengths (nm) applied to metroem and Farneback "
                   f"(default {LENGTHS_NM})")
    p.add_argument("--gaps", nargs="+", type=int, default=list(nb.GAPS))
    p.add_argument("--per-block", type=int, default=5,
                   help="target slices per block and gap (default 5: 10 pairs per gap and kind)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 methods, gaps 1 and 4, 1 pair per block, no ISBI")
    p.add_argument("--seed", type=int, default=0)
    return p


# --- methods: a base field function plus optional post-processing -------------------------------


def _regularized(length_nm: float) -> Callable:
    def post(field: torch.Tensor, src, tgt, px_nm: float) -> torch.Tensor:
        s, t = metrics.as_image(src), metrics.as_image(tgt)
        sigma = regularize.sigma_px(length_nm, px_nm)
        return regularize.smooth_field(field, sigma, regularize.data_weight(s, t, field))

    return post


def _gated(length_nm: float) -> Callable:
    def post(field: torch.Tensor, src, tgt, px_nm: float) -> torch.Tensor:
        s, t = metrics.as_image(src), metrics.as_image(tgt)
        return regularize.regularized_field(
            field, s, t, regularize.sigma_px(length_nm, px_nm), regularize.GATE,
            regularize.sigma_px(regularize.GATE_WINDOW_NM, px_nm))

    return post


def _gauss(sigma_px: float) -> Callable:
    def post(field: torch.Tensor, src, tgt, px_nm: float) -> torch.Tensor:
        s, t = metrics.as_image(src), metrics.as_image(tgt)
        w = regularize.data_weight(s, t, field).clamp_min(regularize.WEIGHT_FLOOR)
        blur = regularize._gaussian_blur
        return blur(field * w, sigma_px) / blur(w, sigma_px)

    return post


def methods(args) -> dict[str, tuple[str, Callable | None]]:
    """name -> (base method, post-processing or None); base fields are computed once."""
    names = args.methods or [m for m in BASELINES if m in baselines.available_methods()]
    if args.quick and args.methods is None:
        names = ["farneback+pc"]
    unknown = [n for n in names if n not in baselines.METHODS]
    if unknown:
        raise MetroemError(
            f"unknown method {unknown[0]!r}; choose from {', '.join(baselines.METHODS)}"
        )
    out: dict[str, tuple[str, Callable | None]] = {n: (n, None) for n in names}
    if "farneback+pc" in names:
        out[f"farneback+pc gauss {FLOW_SIGMA_PX:g}px"] = ("farneback+pc", _gauss(FLOW_SIGMA_PX))
        for length in [] if args.quick else FLOW_LENGTHS_NM:
            out[f"farneback+pc reg {length:g}nm"] = ("farneback+pc", _regularized(length))
        if not args.quick:
            out["farneback+pc reg 640nm gated"] = ("farneback+pc", _gated(640.0))
    if not args.no_metroem:
        out["metroem"] = ("metroem", None)
        out["metroem+pc"] = ("metroem+pc", None)
        for length in args.lengths[-1:] if args.quick else args.lengths:
            out[f"metroem+pc reg {length:g}nm"] = ("metroem+pc", _regularized(length))
        for length in GATED_LENGTHS_NM[:1] if args.quick else GATED_LENGTHS_NM:
            out[f"metroem+pc reg {length:g}nm gated"] = ("metroem+pc", _gated(length))
    return out


def base_functions(names: set[str], args) -> dict[str, baselines.FieldFn]:
    fns = {n: baselines.METHODS[n] for n in names if not n.startswith("metroem")}
    if any(n.startswith("metroem") for n in names):
        pyramid = args.pyramid or str(DEFAULT_PYRAMID)
        if not Path(pyramid).is_dir():
            raise MetroemError(f"pyramid {pyramid} not found; pass --pyramid_path DIR or "
                               "--no-metroem")
        # A pyramid runs on images at the MIP whose pixel size is closest to theirs, with the
        # stages at that MIP and coarser: the 10 nm FIB-SEM slices are MIP 1 (8 nm) of the
        # 4 nm ISBI pyramid, exactly as metroem align runs them (inference.pyramid_input).
        from metroem.inference import pyramid_input
        from metroem.modules import pyramid_settings

        if pyramid_settings(pyramid).get("resolution_nm"):
            fib_mip, fib_stages, _ = pyramid_input(pyramid, FIBSEM_NM, None, None)
        else:  # a pyramid that does not say its pixel size: assume PYRAMID_NM
            fib_mip = max(0, round(math.log2(FIBSEM_NM / PYRAMID_NM)))
            fib_stages = None
        fib_mip = args.fib_mip = fib_mip or 0
        for name, init in (("metroem", False), ("metroem+pc", True)):
            fns[name] = {  # the pyramid's own field (a default smoothing is a variant here)
                ISBI_NM: baselines.metroem_method(pyramid, translation_init=init,
                                                  smoothing_nm=0.0),
                FIBSEM_NM: baselines.metroem_method(pyramid, translation_init=init,
                                                    input_mip=fib_mip, smoothing_nm=0.0,
                                                    stages=fib_stages),
            }
    return fns


class FieldCache:
    """Runs each base method once per image pair and applies each variant's post-processing."""

    def __init__(self, bases: dict[str, baselines.FieldFn]):
        self.bases = bases
        self.cache: dict[tuple[str, str], tuple[torch.Tensor | None, float, str | None]] = {}

    def field(self, method: tuple[str, Callable | None], key: str, src, tgt, px_nm: float):
        base, post = method
        if (base, key) not in self.cache:
            fn = self.bases[base]
            fn = fn[px_nm] if isinstance(fn, dict) else fn  # per pixel size (the pyramids)
            self.cache[(base, key)] = q._timed(fn, src, tgt)
        field, dt, err = self.cache[(base, key)]
        if field is None or post is None:
            return field, dt, err
        t0 = time.perf_counter()
        field = post(field, src, tgt, px_nm)
        return field, dt + time.perf_counter() - t0, err


def fibsem_pairs(blocks, gaps, per_block: int, seed: int) -> list[nb.NeighbourPair]:
    """The FIB-SEM pairs: deformed and undeformed neighbours per gap, and same-section ones."""
    out = nb.make_neighbour_pairs(blocks, tuple(gaps), per_block, seed=seed)
    return out + nb.make_same_pairs(blocks, per_block, seed=seed)


def isbi_benchmark_pairs(folder: str | None, seed: int) -> list[pairs.BenchmarkPair]:
    """The held-out ISBI neighbours, each undeformed and three times deformed (``mixed48``),
    and the same sections as same-section pairs (a deformed noisy copy, ``mixed48``)."""
    stack = pairs.load_stack(folder)
    out = list(pairs.make_pairs(stack, ["mixed48"], 3, kinds=("neighbour", "same"), draws=3,
                                seed=seed))
    if sorted({p.z for p in out}) != list(ISBI_PAIRS):
        raise MetroemError(f"the ISBI folder must hold 30 sections (held out {ISBI_PAIRS})")
    return out


def summary(fns: dict[str, baselines.FieldFn | dict], gaps=(1, 4), per_block: int = 5,
            seed: int = 0, isbi: bool = True) -> dict[str, dict]:
    """This benchmark's aggregates for plain methods (name -> field function, or a dict of them
    per pixel size in nm like :func:`base_functions` makes), on the default data: what
    ``speed.py`` puts beside each option's time. ``{name: {"fibsem": {gap: ...},
    "isbi": ...}}``; gap "0" is the same-section pairs."""
    blocks = nb.load_blocks(None)
    fib_pairs = fibsem_pairs(blocks, gaps, per_block, seed)
    isbi_pairs = isbi_benchmark_pairs(None, seed) if isbi else []
    cache = FieldCache(fns)
    out = {}
    for name in fns:
        fib = [score_fibsem(cache, (name, None), p) for p in fib_pairs]
        out[name] = {
            "fibsem": {str(g): aggregate_fibsem([r for r in fib if r["gap"] == g])
                       for g in [0, *gaps]},
            "isbi": aggregate_isbi([score_isbi(cache, (name, None), p) for p in isbi_pairs])
            if isbi_pairs else {},
        }
    return out


# --- measurements --------------------------------------------------------------------------------


def undeformed_metrics(field: torch.Tensor, shape: tuple[int, int], valid=None) -> dict:
    """Size, non-affine part (morph) and gradient norm of a field whose right answer is affine
    (zero for registered slices), over the interior."""
    mask = metrics.interior_mask(shape, INTERIOR)
    if valid is not None:
        mask &= valid
    mag = field.pow(2).sum(1).sqrt()[0][mask]
    return {
        "magnitude": float(mag.median()),
        "morph": metrics.nonaffine_stats(field, mask),
        "strain": metrics.gradient_norm_stats(field, mask),
    }


def score_fibsem(cache: FieldCache, method, pair: nb.NeighbourPair) -> dict:
    row: dict = {"pair": pair.name, "kind": pair.kind, "gap": pair.gap}
    field, dt, err = cache.field(method, pair.name, pair.src, pair.tgt, FIBSEM_NM)
    row.update(seconds=dt, error=err)
    if field is None:
        row["failed"] = True
        return row
    mask = nb.valid_mask(pair)
    row["epe"] = metrics.epe_stats(field, pair.gt[None], mask)
    err = (field - pair.gt[None])[0][:, mask]
    shift = err.median(dim=1).values.view(2, 1)
    row["epe_no_shift"] = float((err - shift).pow(2).sum(0).sqrt().median())
    row["folds"] = metrics.fold_stats(field, mask)
    if pair.kind == "undeformed":
        row.update(undeformed_metrics(field, tuple(pair.tgt.shape), pair.tgt != 0))
    row["failed"] = False
    return row


def score_isbi(cache: FieldCache, method, pair: pairs.BenchmarkPair) -> dict:
    """Morph of the field on the undeformed pair and equivariance on the deformed one; EPE on
    a same-section pair."""
    row: dict = {"pair": pair.name, "z": pair.z, "kind": pair.kind}
    if pair.kind == "same":
        field, dt, err = cache.field(method, pair.name, pair.src, pair.tgt, ISBI_NM)
        row.update(seconds=dt, error=err, failed=field is None)
        if field is not None:
            row["epe"] = metrics.epe_stats(field, pair.gt[None], pairs.gt_valid_mask(pair))
        return row
    f0, dt0, err0 = cache.field(method, f"isbi_z{pair.z}", pair.src_undeformed, pair.tgt,
                                ISBI_NM)
    field, dt, err = cache.field(method, pair.name, pair.src, pair.tgt, ISBI_NM)
    row.update(seconds=(dt + dt0) / 2, error=err or err0)
    if f0 is None or field is None:
        row["failed"] = True
        return row
    row.update(undeformed_metrics(f0, tuple(pair.tgt.shape)))
    target = metrics.equivariance_target(f0, pair.h)
    mask = (pair.tgt != 0) & metrics.valid_after_warp(pair.src, target, margin=4)
    row["equivariance"] = metrics.epe_stats(field, target, mask)
    row["folds"] = metrics.fold_stats(field, mask)
    row["failed"] = False
    return row


def _med(rows, *path) -> float:
    def get(r):
        for k in path:
            r = r.get(k) if isinstance(r, dict) else None
        return r

    return q._median(get(r) for r in rows)


def aggregate_fibsem(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r["failed"]]
    dfm = [r for r in ok if r["kind"] in ("deformed", "same")]
    und = [r for r in ok if r["kind"] == "undeformed"]
    worst = max((r["epe"]["median"] for r in dfm), default=math.nan)
    return {
        "epe_median": _med(dfm, "epe", "median"),
        "epe_p95": _med(dfm, "epe", "p95"),
        "epe_worst": worst,
        "epe_no_shift": _med(dfm, "epe_no_shift"),
        "zero_magnitude": _med(und, "magnitude"),
        "morph_median": _med(und, "morph", "median"),
        "strain_median": _med(und, "strain", "median"),
        "strain_p95": _med(und, "strain", "p95"),
        "fold_fraction": max((r["folds"]["fraction"] for r in ok), default=math.nan),
        "failures": len(rows) - len(ok),
        "pairs": len(rows),
        "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
    }


def aggregate_isbi(rows: list[dict]) -> dict:
    same = [r for r in rows if r.get("kind") == "same" and not r["failed"]]
    rows = [r for r in rows if r.get("kind") != "same"]
    ok = [r for r in rows if not r["failed"]]
    return {
        "same_epe_median": _med(same, "epe", "median"),
        "same_epe_worst": max((r["epe"]["median"] for r in same), default=math.nan),
        "equivariance_median": _med(ok, "equivariance", "median"),
        "morph_median": _med(ok, "morph", "median"),
        "strain_median": _med(ok, "strain", "median"),
        "fold_fraction": max((r["folds"]["fraction"] for r in ok), default=math.nan),
        "failures": len(rows) - len(ok),
        "pairs": len(rows),
        "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
    }


def apparent_shift(pair_list: list[nb.NeighbourPair]) -> dict[int, float]:
    """Median |phase-correlation shift| between undeformed slices per gap: how far the tissue
    seems to move between registered slices (its truth is 0)."""
    out: dict[int, list[float]] = {}
    for p in pair_list:
        if p.kind == "undeformed":
            dx, dy = baselines.phase_translation(p.src.numpy(), p.tgt.numpy())
            out.setdefault(p.gap, []).append(math.hypot(dx, dy))
    return {g: float(np.median(v)) for g, v in out.items()}


# --- report --------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    cfg = result["config"]
    f = q._fmt
    lines = [
        "# Neighbour benchmark: alignment against a known answer",
        "",
        f"`{cfg['command']}` on {cfg['machine']}, {cfg['threads']} threads, torch "
        f"{cfg['torch']}. Total {cfg['total_seconds']:.0f} s.",
        "",
        f"FIB-SEM: held-out slices of `{cfg['fibsem']}` (last {nb.HELD_OUT} of each block, "
        f"{FIBSEM_NM:g} nm px, {cfg['fibsem_size']} px), {cfg['pairs_per_gap']} pairs per gap "
        f"and kind. Deformation `{cfg['deformation']}` (local strain median "
        f"{100 * cfg['deformation_strain']['median']:.1f} %, p95 "
        f"{100 * cfg['deformation_strain']['p95']:.1f} %).",
        "",
        "EPE = median over deformed pairs of each pair's median end-point error (px) against the "
        "truth (p95: of each pair's 95th percentile; worst: the worst pair's median; -shift: "
        "the median EPE once the error's own median translation is taken out, i.e. how well "
        "the shape of the deformation is found whatever the shift). On the "
        "undeformed pairs, whose truth is 0: |f| = median field size, morph = median of what is "
        f"left after a least-squares affine fit (interior, {INTERIOR} px border dropped), "
        "strain = median |grad f|_F (p95 after the slash). folds = largest % of pixels with "
        "det J <= 0 over the pairs; s = seconds per pair.",
        "",
        "Apparent tissue shift between the undeformed slices (median |phase correlation|, px; "
        "the truth is 0): "
        + ", ".join(f"gap {g}: {v:.2f}" for g, v in result["apparent_shift"].items())
        + ".",
        "",
    ]
    for gap, table in result["fibsem"].items():
        title = (f"## FIB-SEM, gap {gap} ({int(gap) * FIBSEM_NM:g} nm)" if gap != "0" else
                 "## FIB-SEM same-section (a deformed noisy copy of the slice; no undeformed "
                 "pairs)")
        lines += [title, "",
                  "| method | EPE | EPE p95 | worst | -shift | \\|f\\| on 0 | morph | strain "
                  "| folds % | fail | s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, t in table.items():
            lines.append(
                f"| {m} | {f(t['epe_median'])} | {f(t['epe_p95'])} | {f(t['epe_worst'])} | "
                f"{f(t['epe_no_shift'])} | "
                f"{f(t['zero_magnitude'])} | {f(t['morph_median'])} | "
                f"{f(t['strain_median'], 3)} / {f(t['strain_p95'], 3)} | "
                f"{f(100 * t['fold_fraction'], 3)} | {t['failures']}/{t['pairs']} | "
                f"{f(t['seconds_per_pair'])} |"
            )
        lines.append("")
    if result.get("isbi"):
        lines += [
            f"## Real ssTEM neighbours (ISBI, {ISBI_NM:g} nm px, 512 x 512)", "",
            "Undeformed consecutive held-out pairs (sections "
            + ", ".join(f"{z} onto {z - 1}" for z in ISBI_PAIRS)
            + "): morph and strain of the field as above (the stack's own misalignment is "
            "small and close to affine). equiv. = median equivariance EPE (px) on the same "
            f"sections deformed by `mixed48` ({cfg['isbi_pairs']} pairs). same = EPE on "
            "same-section pairs of the same sections (a `mixed48`-deformed noisy copy against "
            "the section; median over pairs of each pair's median, and the worst pair's).",
            "",
            "| method | same | same worst | equiv. | morph | strain | folds % | fail | s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m, t in result["isbi"].items():
            lines.append(
                f"| {m} | {f(t['same_epe_median'], 3)} | {f(t['same_epe_worst'], 3)} | "
                f"{f(t['equivariance_median'])} | {f(t['morph_median'])} | "
                f"{f(t['strain_median'], 3)} | {f(100 * t['fold_fraction'], 3)} | "
                f"{t['failures']}/{t['pairs']} | {f(t['seconds_per_pair'])} |"
            )
        lines.append("")
    lines += ["## Methods", ""]
    lines += [f"- `{m}`: {p}" for m, p in result["methods"].items()]
    return "\n".join(lines) + "\n"


def _describe(name: str, fib_mip: int | None) -> str:
    if name.startswith("metroem"):
        base = (f"trained pyramid; FIB-SEM slices given as its MIP {fib_mip} (the closest "
                "pixel size), its stages at that MIP and coarser (as metroem align)")
        if name.startswith("metroem+pc"):
            base += ", started from a phase-correlation translation (translation_init)"
    else:
        base = baselines.method_params(name.split(" ")[0])
    if name.endswith(" gated"):
        base += ("; then metroem.regularize.regularized_field over "
                 + name.split(" reg ")[1].removesuffix(" gated") + " with the match gate "
                 f"{regularize.GATE} ({regularize.GATE_WINDOW_NM:g} nm window)")
    elif " reg " in name:
        base += "; then metroem.regularize.smooth_field over " + name.split(" reg ")[1]
    if " gauss " in name:
        base += f"; then a Gaussian blur of sigma {FLOW_SIGMA_PX:g} px (weighted by data)"
    return base


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    q.set_threads(args.threads)
    t_start = time.perf_counter()
    variants = methods(args)
    cache = FieldCache(base_functions({b for b, _ in variants.values()}, args))
    gaps = [1, 4] if args.quick else args.gaps
    per_block = 1 if args.quick else args.per_block
    blocks = nb.load_blocks(args.fibsem)
    fib_pairs = fibsem_pairs(blocks, gaps, per_block, args.seed)
    skip_isbi = args.quick or args.isbi == "none"
    isbi_pairs = [] if skip_isbi else isbi_benchmark_pairs(args.isbi, args.seed)
    rows: dict[str, dict[str, list[dict]]] = {}
    for name, method in variants.items():
        t0 = time.perf_counter()
        rows[name] = {
            "fibsem": [score_fibsem(cache, method, p) for p in fib_pairs],
            "isbi": [score_isbi(cache, method, p) for p in isbi_pairs],
        }
        print(f"{name:28s} {time.perf_counter() - t0:7.1f} s", flush=True)
    deformed = [p for p in fib_pairs if p.kind != "undeformed"]
    strain = [metrics.strain_stats(p.gt, nb.valid_mask(p)) for p in deformed]
    result = {
        "config": {
            "command": "python benchmarks/neighbours.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.processor() or ''} "
                       f"({os.cpu_count()} CPUs)".replace("  ", " "),
            "threads": args.threads,
            "torch": torch.__version__,
            "fibsem": str(args.fibsem or nb.default_data_dir()),
            "fibsem_size": "x".join(str(s) for s in fib_pairs[0].tgt.shape[::-1]),
            "pairs_per_gap": per_block * len(blocks),
            "deformation": repr(nb.DEFORMATION),
            "deformation_strain": {"median": q._median(s["median"] for s in strain),
                                   "p95": q._median(s["p95"] for s in strain)},
            "isbi_pairs": sum(p.kind == "neighbour" for p in isbi_pairs),
            "seed": args.seed,
            "total_seconds": time.perf_counter() - t_start,
        },
        "apparent_shift": apparent_shift(fib_pairs),
        "fibsem": {
            str(g): {m: aggregate_fibsem([r for r in rows[m]["fibsem"] if r["gap"] == g])
                     for m in variants}
            for g in [0, *gaps]
        },
        "isbi": {m: aggregate_isbi(rows[m]["isbi"]) for m in variants} if isbi_pairs else {},
        "methods": {m: _describe(m, getattr(args, "fib_mip", None)) for m in variants},
        "pairs": rows,
    }
    out = Path(args.out)
    q.write_results(out, "neighbours", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'neighbours.json'} and {out / 'neighbours.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
