"""Self-supervised vs supervised training terms, measured on held-out real neighbouring sections.

One stage at MIP 2 (the coarse stage of ``models/isbi``: its spec, its recipe
``models/isbi/train.yaml``, its data) is trained from scratch with the same steps, seed and data
under each loss/augmentation variant:

* ``self``: self-supervised only (``augment.same_section.p=0``, ``loss.supervised_weight=0``):
  real neighbour pairs, sources deformed by ``augment.warp``, masked MSE + rigidity + folds;
* ``supervised``: supervised only (``same_section.p=1``, ``loss.similarity_weight=0``):
  deformed copies of a section with their exact field (EPE) + rigidity + folds;
* ``both``: the recipe as written (``same_section.p=0.5``, similarity and supervised weights 1);
* ``embedding``: ``both`` plus the embedding term (``loss.embedding_weight``).

Every trained stage is then scored on the quality benchmark's held-out pairs
(:func:`metroem.eval.pairs.make_pairs`, the same scoring as ``benchmarks/quality.py``): MIP0
images in, the aligner resamples them to MIP 2, field back at MIP0. The sections of those pairs
are left out of the training volume. Writes ``<out>/supervision.json`` and ``supervision.md``.

Examples::

    python benchmarks/supervision.py                      # 4 variants x 600 steps
    python benchmarks/supervision.py --steps 2000 --seeds 0 1 2
    python benchmarks/supervision.py --quick --out /tmp/sup   # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metroem import download, ingest, modules
from metroem.errors import MetroemError, cli_errors
from metroem.eval import baselines, pairs
from metroem.training import cli as train_cli

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
RECIPE = REPO / "models" / "isbi"
MIP, PATCH, CHECKPOINT = 2, 128, "supervision"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "self": ("self-supervised only", ["augment.same_section.p=0", "loss.supervised_weight=0"]),
    "supervised": ("supervised only", ["augment.same_section.p=1", "loss.similarity_weight=0",
                                       "loss.supervised_weight=1"]),
    "both": ("the recipe: both terms", []),
    "embedding": ("both + embedding term", []),  # + loss.embedding_weight (see --embedding-weight)
}
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _quality():
    """benchmarks/quality.py as a module (its pair scoring and table aggregation)."""
    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).with_name(
        "quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per variant "
                   "(the recipe trains MIP 2 for 2000)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds; every variant is trained once per seed")
    p.add_argument("--embedding-weight", type=float, default=0.5,
                   help="loss.embedding_weight of the 'embedding' variant (untuned; tests use 0.5)")
    p.add_argument("--data", default=None, help="folder of consecutive section images "
                   f"(default {pairs.default_data_dir()})")
    p.add_argument("--per-difficulty", type=int, default=3,
                   help="held-out pairs of each kind per difficulty (the quality benchmark's 3)")
    p.add_argument("--work", default=None, help="folder for the volume, data and pyramids "
                   "(default: a temporary one, deleted at the end)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and OpenCV")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 steps, batch 2, "
                   "1 training pair, 1 held-out pair per kind at shift8 and elastic")
    return p


def variant_overrides(name: str, steps: int, embedding_weight: float, quick: bool) -> list[str]:
    """``--set`` overrides of ``models/isbi/train.yaml`` for one variant."""
    out = [f"per_mip.{MIP}.train.steps={steps}", *VARIANTS[name][1]]
    if name == "embedding":
        out.append(f"loss.embedding_weight={embedding_weight}")
    if quick:
        out.append("data.batch_size=2")
    return out


def held_out_sections(eval_pairs: list[pairs.BenchmarkPair]) -> list[int]:
    """Every section an evaluation pair reads (z and its neighbour z-1)."""
    return sorted({p.z for p in eval_pairs} | {p.z - 1 for p in eval_pairs})


def prepare_data(sections: Path, work: Path, exclude: list[int], quick: bool) -> tuple[str, int]:
    """Ingest the stack without ``exclude`` and cut MIP 2 pairs as ``make isbi`` does."""
    vol = str(work / "volume")
    manifest = ingest.ingest_images(str(sections), vol, num_mips=MIP + 1, exclude=exclude,
                                    overwrite=True)
    z_end = 2 if quick else len(manifest["sections"])
    size = manifest["size"]
    download.download_image(vol, str(work / "data"), 1, z_end, size[0] // 2, size[1] // 2,
                            [MIP], [PATCH], overwrite=True, progress=False)
    return str(work / "data"), z_end - 1


def recipe_stage() -> modules.ModuleInfo:
    """The MIP 2 stage of models/isbi (only its spec is read)."""
    src = [m for m in modules.discover(RECIPE) if m.mip == MIP]
    if not src:
        raise MetroemError(f"{RECIPE} has no MIP {MIP} stage to copy the spec from")
    return src[0]


def stage_pyramid(path: Path) -> str:
    """A fresh one-stage pyramid with the recipe's MIP 2 spec and train.yaml.

    The parameter-free refinements (Lucas-Kanade step, residual blur) are switched off, as they
    were when the shipped weights were trained: the variants differ only in what they learn.
    """
    spec, _ = modules.read_spec(recipe_stage().path)
    spec = {**spec, "lk_iterations": 0, "residual_sigma": 0.0}
    modules.create_module(path, 0, MIP, "bench", spec)
    shutil.copy(RECIPE / "train.yaml", path / "train.yaml")
    return str(path)


def train(pyr: str, data: str, seed: int, overrides: list[str]) -> dict:
    argv = ["--pyramid_path", pyr, "--dataset_path", data, "--checkpoint_name", CHECKPOINT,
            "--train_mode", "custom", "--train_params_path", os.path.join(pyr, "train.yaml"),
            "--seed", str(seed), "--no_redirect_stdout", "--device", "cpu"]
    for o in overrides:
        argv += ["--set", o]
    (res,) = train_cli.run(train_cli.build_parser().parse_args(argv))
    return {"steps": res.steps, "skipped": res.skipped, "seconds": res.seconds,
            "val": {k: float(v) for k, v in res.val.items()}}


def evaluate(q, fn, eval_pairs: list[pairs.BenchmarkPair], diffs: list[str]) -> dict:
    """Per-pair rows, per-difficulty table and the all-difficulty summary of one method."""
    f0_cache: dict = {}
    rows = [q.score_pair(fn, p, f0_cache, q.FAIL_PX) for p in eval_pairs]
    table = {d: q.aggregate([r for r in rows if r["difficulty"] == d]) for d in diffs}
    return {"overall": q.aggregate(rows), "table": table, "pairs": rows}


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Supervision benchmark: which training terms work on real neighbouring sections",
        "",
        f"`{cfg['command']}` on {cfg['machine']}, {cfg['threads']} threads, torch "
        f"{cfg['torch']}. One stage at MIP {MIP} (spec of `{cfg['spec_from']}`, recipe "
        f"`models/isbi/train.yaml`), {cfg['steps']} steps per variant, seeds {cfg['seeds']}, "
        f"{cfg['train_pairs']} training pairs of MIP {MIP} {PATCH} px patches; sections "
        f"{cfg['held_out']} held out. Evaluated on {cfg['eval_pairs']} held-out quality-benchmark"
        f" pairs ({', '.join(cfg['difficulties'])}), MIP0 in and out. Total "
        f"{cfg['total_seconds']:.0f} s.",
        "",
        "EPE = median over same-section pairs of each pair's median end-point error (MIP0 px) "
        "against the exact field; equiv. = the same for the equivariance EPE on neighbour pairs; "
        "r = mean chunked Pearson after alignment; folds = median % of pixels with det J <= 0; "
        f"fail = pairs above {cfg['fail_px']} px; train s = wall seconds of training (with its "
        "validation and checkpoints). Same-section EPE scores the task the supervised term "
        "trains directly; equiv. and r are the measures on real neighbours.",
        "",
    ]
    if len(cfg["seeds"]) == 1:
        lines += ["One seed: a difference between variants smaller than the seed-to-seed spread "
                  "is not established; run `--seeds 0 1 2` to see that spread.", ""]
    lines += [
        "| variant | seed | EPE | EPE p95 | equiv. | r | folds % | fail | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        t = run["overall"]
        lines.append(
            f"| {run['variant']} | {_fmt(run['seed'], 0)} | {_fmt(t['epe_median'])} | "
            f"{_fmt(t['epe_p95'])} | {_fmt(t['equivariance_median'])} | "
            f"{_fmt(t['pearson_mean'], 3)} | {_fmt(100 * t['fold_fraction'], 3)} | "
            f"{t['failures']}/{t['pairs']} | {_fmt(run['train']['seconds'], 0)} |"
        )
    lines += ["", "## By difficulty (EPE / equiv., MIP0 px)", "",
              "| variant | seed | " + " | ".join(cfg["difficulties"]) + " |",
              "|---|---:|" + "---:|" * len(cfg["difficulties"])]
    for run in result["runs"]:
        cells = [f"{_fmt(run['table'][d]['epe_median'])} / "
                 f"{_fmt(run['table'][d]['equivariance_median'])}" for d in cfg["difficulties"]]
        lines.append(f"| {run['variant']} | {_fmt(run['seed'], 0)} | " + " | ".join(cells) + " |")
    lines += ["", "## Variants", ""]
    for name, v in result["variants"].items():
        sets = ", ".join(f"`{o}`" for o in v["overrides"]) or "none"
        lines.append(f"- `{name}`: {v['description']}; overrides: {sets}")
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    q = _quality()
    q.set_threads(args.threads)
    if args.quick:
        args.steps, args.per_difficulty = 20, 1
    if args.steps < 1:
        raise MetroemError(f"--steps {args.steps} must be at least 1")
    t_start = time.perf_counter()
    diffs = ["shift8", "elastic"] if args.quick else list(pairs.DIFFICULTIES)
    sections = Path(args.data) if args.data else pairs.default_data_dir()
    eval_pairs = pairs.make_pairs(pairs.load_stack(sections), diffs, args.per_difficulty, seed=0)
    held_out = held_out_sections(eval_pairs)
    work = Path(args.work or tempfile.mkdtemp(prefix="metroem-supervision-")).resolve()
    try:
        data, n_train = prepare_data(sections, work, held_out, args.quick)
        variants = {n: {"description": VARIANTS[n][0], "overrides": variant_overrides(
            n, args.steps, args.embedding_weight, args.quick)} for n in args.variants}
        runs = [{"variant": "identity", "seed": None, "train": {"seconds": 0.0},
                 **evaluate(q, baselines.METHODS["identity"], eval_pairs, diffs)}]
        for seed in args.seeds:
            for name, v in variants.items():
                print(f"== {name} (seed {seed}): {' '.join(v['overrides'])}", flush=True)
                pyr = stage_pyramid(work / f"{name}_seed{seed}")
                trained = train(pyr, data, seed, v["overrides"])
                fn = baselines.metroem_method(pyr, CHECKPOINT, input_mip=0, smoothing_nm=0.0)
                runs.append({"variant": name, "seed": seed, "train": trained,
                             **evaluate(q, fn, eval_pairs, diffs)})
                t = runs[-1]["overall"]
                print(f"   EPE {t['epe_median']:.3f}  equiv. {t['equivariance_median']:.3f}  "
                      f"train {trained['seconds']:.0f} s", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "config": {
            "command": "python benchmarks/supervision.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} {platform.processor() or ''} "
                       f"({os.cpu_count()} CPUs)".replace("  ", " "),
            "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
            "seeds": args.seeds, "data": str(sections), "held_out": held_out,
            "train_pairs": n_train, "eval_pairs": len(eval_pairs), "difficulties": diffs,
            "spec_from": f"models/isbi/{recipe_stage().name}",
            "embedding_weight": args.embedding_weight, "fail_px": q.FAIL_PX,
            "total_seconds": time.perf_counter() - t_start,
        },
        "variants": variants,
        "runs": runs,
    }
    out = Path(args.out)
    q.write_results(out, "supervision", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'supervision.json'} and {out / 'supervision.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
