"""Appearance changes with a known answer: is a method still right when the two images of a
pair differ in brightness, contrast, illumination, focus or noise?

Real stacks are imaged over days or months: the beam current, the detector's gain, the focus
and the dwell time (noise) change from section to section, and a same-section pair (a section
imaged twice, the overlap of two tiles) is rarely two identical exposures. This benchmark
changes the source of known-answer pairs in such ways and measures the error against the
truth, every method on the same pairs:

* ISBI (4 nm px): held-out sections 1, 15 and 29, each with three deformations (``mixed48``:
  drift up to 48 px, rotation, scale, shear, elastic), against themselves (noise of 8 grey
  levels added, as in ``benchmarks/quality.py``);
* FIB-SEM (10 nm px): held-out slices against themselves (``same``), and against the slice 4
  before (40 nm apart: the tissue changes too), deformed as in ``benchmarks/neighbours.py``.

Changes of the source (its no-data pixels stay 0, grey levels stay in 1-255): see
:data:`CHANGES`. Scores: the median over pairs of each pair's median end-point error (px), the
worst pair's, seconds per pair. Writes ``<out>/appearance.json`` and ``<out>/appearance.md``.

Examples::

    python benchmarks/appearance.py                       # everything (about 3 min, 2 cores)
    python benchmarks/appearance.py --quick --out /tmp/a  # smoke run: two pairs per table
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (shared helpers: results files, threads, number format)

from metroem.errors import MetroemError, cli_errors  # noqa: E402
from metroem.eval import baselines, metrics, pairs  # noqa: E402
from metroem.eval import neighbours as nb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYRAMID = REPO / "models" / "isbi"
DEFAULT_OUT = REPO / "benchmarks" / "results"
ISBI_NM, FIBSEM_NM = 4.0, 10.0
ISBI_DRAWS = 3  # deformations per held-out ISBI section (sections 1, 15, 29)
FIB_PER_BLOCK = 5
FOCUS_NM = 8.0  # the out-of-focus source: a Gaussian blur of this standard deviation
NOISE = 25.0  # grey levels of extra Gaussian noise (the benchmark pairs already have 8)
PEERS = ["farneback+pc", "dis+pc"]
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))

Change = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _ramp(img: np.ndarray, nm: float, rng: np.random.Generator) -> np.ndarray:
    return img * np.linspace(0.6, 1.4, img.shape[-1])[None, :]


def _vignette(img: np.ndarray, nm: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return img * (1.3 - 0.3 * (xx**2 + yy**2))  # 1.3 at the centre, 0.7 in the corners


def _focus(img: np.ndarray, nm: float, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(img, FOCUS_NM / nm)


def _noise(img: np.ndarray, nm: float, rng: np.random.Generator) -> np.ndarray:
    return img + rng.normal(0.0, NOISE, img.shape)


CHANGES: dict[str, tuple[str, Change]] = {
    "none": ("the pair as it is", lambda a, nm, rng: a),
    "low contrast": ("0.5 x + 40: half the contrast, darker", lambda a, nm, rng: 0.5 * a + 40),
    "brighter": ("1.3 x + 30: brighter, the brightest membranes' surroundings saturate",
                 lambda a, nm, rng: 1.3 * a + 30),
    "gamma 0.5": ("255 (x / 255)^0.5: a different detector response",
                  lambda a, nm, rng: 255 * (np.clip(a, 0, 255) / 255) ** 0.5),
    "uneven illumination": ("x times a ramp from 0.6 (left) to 1.4 (right)", _ramp),
    "vignetting": ("x times a bowl of gain: 1.3 at the centre, 1.0 at the edges' midpoints, "
                   "0.7 in the corners", _vignette),
    "out of focus": (f"Gaussian blur of {FOCUS_NM:g} nm (2 px on ISBI, 0.8 px on FIB-SEM)",
                     _focus),
    "noisier": (f"Gaussian noise of {NOISE:g} grey levels", _noise),
    "out of focus, noisier": ("both", lambda a, nm, rng: _noise(_focus(a, nm, rng), nm, rng)),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid", default=str(DEFAULT_PYRAMID),
                   help="metroem pyramid (MIP0 pixel size from its pyramid.json)")
    p.add_argument("--no-metroem", action="store_true", help="peers only")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: two pairs per table")
    p.add_argument("--seed", type=int, default=0)
    return p


def changed(img: torch.Tensor, change: str, nm: float, seed: int) -> torch.Tensor:
    """``img`` ``(H, W)`` with one of :data:`CHANGES` applied to its data pixels (0 stays 0,
    the rest is kept in 1-255 as a uint8 image would be)."""
    a = img.numpy().astype(np.float64)
    out = CHANGES[change][1](a, nm, np.random.default_rng(seed))
    return torch.from_numpy(np.where(a != 0, np.clip(out, 1, 255), 0).astype(np.float32))


def methods(args) -> dict[str, dict[float, baselines.FieldFn]]:
    """Row name -> pixel size (nm) -> ``(src, tgt) -> field`` on ``(H, W)`` arrays."""
    out = {name: {ISBI_NM: baselines.METHODS[name], FIBSEM_NM: baselines.METHODS[name]}
           for name in PEERS}
    if args.no_metroem:
        return out
    from metroem.inference import pyramid_input
    from metroem.modules import pyramid_settings

    settings = pyramid_settings(args.pyramid)
    pyramid_nm = settings.get("resolution_nm")
    if not pyramid_nm:
        raise MetroemError(f"{args.pyramid} does not say its pixel size (resolution_nm in its "
                           "pyramid.json); the benchmark runs it on 4 and 10 nm pixels")
    mip, stages, _ = pyramid_input(args.pyramid, FIBSEM_NM, None, None)
    mip = mip or 0
    default_nm = float(settings.get("smoothing_nm") or 0.0)
    rows = {"metroem": default_nm, "metroem raw": 0.0} if default_nm else {"metroem": 0.0}
    for name, length in rows.items():
        out[name] = {
            ISBI_NM: baselines.metroem_method(args.pyramid, smoothing_nm=length,
                                              resolution_nm=pyramid_nm),
            FIBSEM_NM: baselines.metroem_method(args.pyramid, input_mip=mip, stages=stages,
                                                smoothing_nm=length,
                                                resolution_nm=FIBSEM_NM / 2**mip),
        }
    return out


def tables(args) -> dict[str, tuple[float, list[tuple[torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]]]]:
    """Table name -> (pixel size in nm, pairs as ``(src, tgt, truth, valid mask)``)."""
    isbi = pairs.load_stack(None)
    if isbi.shape[0] < 30:
        raise MetroemError("the ISBI folder must hold 30 sections (held out 1, 15, 29)")
    ip = pairs.make_pairs(isbi, ["mixed48"], per_difficulty=3, kinds=("same",),
                          seed=args.seed, draws=ISBI_DRAWS)
    blocks = nb.load_blocks(None)
    fs = nb.make_same_pairs(blocks, per_block=FIB_PER_BLOCK, seed=args.seed)
    fn = nb.make_neighbour_pairs(blocks, gaps=(4,), per_block=FIB_PER_BLOCK, seed=args.seed,
                                 kinds=("deformed",))
    out = {
        "ISBI, same section": (ISBI_NM, [(p.src, p.tgt, p.gt, pairs.gt_valid_mask(p))
                                         for p in ip]),
        "FIB-SEM, same slice": (FIBSEM_NM, [(p.src, p.tgt, p.gt, nb.valid_mask(p))
                                            for p in fs]),
        "FIB-SEM, 40 nm neighbours": (FIBSEM_NM, [(p.src, p.tgt, p.gt, nb.valid_mask(p))
                                                  for p in fn]),
    }
    if args.quick:
        out = {k: (nm, ps[:2]) for k, (nm, ps) in out.items()}
    return out


def score(fn: baselines.FieldFn, nm: float, pair_list, change: str, seed: int) -> dict:
    errs, secs = [], []
    for i, (src, tgt, gt, valid) in enumerate(pair_list):
        s = changed(src, change, nm, seed * 1000 + i)
        t0 = time.perf_counter()
        with torch.no_grad():
            field = baselines.align(fn, s, tgt)
        secs.append(time.perf_counter() - t0)
        errs.append(float(metrics.epe_map(field, gt)[valid].median()))
    return {"median": float(np.median(errs)), "worst": float(np.max(errs)),
            "seconds": float(np.mean(secs)), "pairs": len(errs)}


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Appearance changes with a known answer",
        "",
        f"Generated by `{cfg['command']}` on {cfg['machine']}, {cfg['threads']} threads, "
        f"torch {cfg['torch']}, {cfg['total_seconds']:.0f} s. The source of each pair is "
        "changed as the row says (its no-data pixels stay 0, grey levels stay in 1-255); the "
        "target is not. Cells: median over pairs of each pair's median end-point error (px) "
        "against the truth / the worst pair's. `metroem` is the shipped pyramid as `metroem "
        "align` runs it (its default field smoothing with the match gate); `metroem raw` its "
        "own field (`--smoothing_nm 0`). The pixel size of the images sets the blur (nm).",
        "",
    ]
    for title, block in result["tables"].items():
        names = list(next(iter(block.values())).keys())
        n = next(iter(next(iter(block.values())).values()))["pairs"]
        lines += [f"## {title}", "", f"{n} pairs.", "",
                  "| change | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for change, rows in block.items():
            lines.append(f"| {change} | " + " | ".join(
                f"{q._fmt(rows[m]['median'], 3)} / {q._fmt(rows[m]['worst'], 3)}"
                for m in names) + " |")
        secs = {m: np.mean([block[c][m]["seconds"] for c in block]) for m in names}
        lines += ["| s per pair | " + " | ".join(f"{secs[m]:.2f}" for m in names) + " |", ""]
    lines += ["## Changes", ""] + [f"- `{c}`: {d}" for c, d in cfg["changes"].items()]
    lines += ["", "## Methods", ""] + [f"- `{m}`: {d}" for m, d in cfg["methods"].items()]
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    q.set_threads(args.threads)
    t_start = time.perf_counter()
    all_tables = tables(args)
    fns = methods(args)
    result: dict = {"tables": {}}
    for title, (nm, pair_list) in all_tables.items():
        block: dict = {}
        for change in CHANGES:
            block[change] = {}
            for name, by_nm in fns.items():
                block[change][name] = score(by_nm[nm], nm, pair_list, change, args.seed)
                print(f"{title} | {change} | {name}: {block[change][name]['median']:.3f}",
                      file=sys.stderr)
        result["tables"][title] = block
    described = {name: baselines.method_params(name) for name in PEERS}
    described.update({"metroem": "models/isbi with its default smoothing (pyramid.json) and "
                      "match gate; FIB-SEM slices through the stages metroem align uses for "
                      "10 nm pixels", "metroem raw": "the same, --smoothing_nm 0"})
    result["config"] = {
        "command": "python benchmarks/appearance.py" + (" " + " ".join(argv) if argv else ""),
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
        "threads": args.threads, "torch": torch.__version__,
        "changes": {c: d for c, (d, _) in CHANGES.items()},
        "methods": {m: described.get(m, m) for m in fns},
        "total_seconds": time.perf_counter() - t_start,
    }
    q.write_results(Path(args.out), "appearance", result, markdown(result))
    print(f"wrote {Path(args.out) / 'appearance.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
