"""Training-loop throughput on CPU: steps per second and the share of it spent on data.

Builds the demo volume (:mod:`metroem.demo_volume`, a local CloudVolume) and its h5 datasets
in a temporary folder, as ``make demo`` does, then trains every stage of the demo pyramid
definition for ``--steps`` steps with each ``--workers`` count of DataLoader workers (the
field datasets between stages generated as in a real run). Each stage reports the loop's
steps per second and the part of that time spent getting and augmenting batches: the
``StageResult`` of :func:`metroem.training.cli.run`, the same numbers ``train.py`` logs as
``train/steps_per_s`` and ``train/data_share``.

Writes ``<out>/training_loop.json`` and ``<out>/training_loop.md``.

Examples::

    python benchmarks/training_loop.py                     # ~3 min on 2 cores
    python benchmarks/training_loop.py --quick --out /tmp/t
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (results writer, thread pinning)

from metroem import demo_pipeline, demo_volume, pretrained  # noqa: E402
from metroem.errors import cli_errors  # noqa: E402
from metroem.training import cli as train_cli  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per stage and run")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader worker counts to compare (default 0 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--sections", type=int, default=12, help="sections of the demo volume")
    p.add_argument("--size", type=int, default=512, help="side of the demo sections (MIP0 px)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, tiny volume")
    return p


def train_runs(root: str, steps: int, workers: list[int], sections: int, size: int) -> dict:
    """``{workers: [{stage, mip, steps_per_s, data_share, seconds}, ...]}``."""
    vol = demo_volume.build_demo_volume(os.path.join(root, "volume"), num_sections=sections,
                                        size=size, seed=0, overwrite=True)
    definition = str(pretrained.pyramid_path("demo"))
    out: dict = {}
    data_dir = os.path.join(root, "data")
    for w in workers:
        pyr = os.path.join(root, f"pyramid_w{w}")
        mods = demo_pipeline.copy_pyramid_definition(definition, pyr)
        if not os.path.isdir(data_dir):
            os.makedirs(data_dir)
            demo_pipeline.cut_datasets(vol, data_dir, sorted({m.mip for m in mods},
                                                             reverse=True))
        args = train_cli.build_parser().parse_args([
            "--pyramid_path", pyr, "--dataset_path", data_dir, "--checkpoint_name", f"bench_w{w}",
            "--train_mode", "custom", "--train_params_path", os.path.join(pyr, "train.yaml"),
            "--seed", "0", "--no_redirect_stdout",
            "--set", f"train.steps={steps}", "--set", f"data.num_workers={w}",
            "--set", f"train.val_every={steps}", "--set", f"train.checkpoint_every={steps}",
        ])
        results = train_cli.run(args)
        out[str(w)] = [{"stage": r.stage, "mip": r.mip, "steps": r.steps,
                        "steps_per_s": r.steps_per_s, "data_share": r.data_share,
                        "seconds": r.seconds} for r in results]
        for r in out[str(w)]:
            print(f"  workers {w} stage {r['stage']} (MIP {r['mip']}): "
                  f"{r['steps_per_s']:.2f} steps/s, data {100 * r['data_share']:.0f} %",
                  flush=True)
    return out


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "# Training loop: steps per second and data-loading share (CPU)", "",
        f"`{c['command']}` on {c['machine']}, {c['threads']} torch threads, torch {c['torch']}. "
        f"The demo pyramid definition trained from scratch on the demo volume "
        f"({c['sections']} sections of {c['size']}² px), {c['steps']} steps per stage with its "
        "own recipe (`models/demo/train.yaml`: batch and crop per stage there), once per "
        f"DataLoader worker count. Total {c['total_seconds']:.0f} s.", "",
        "steps/s is the loop (batch, augmentation, forward, loss, backward, optimiser step); "
        "data is the part of that time spent getting and augmenting the batch in the "
        "training process (`train/data_share` in tensorboard). Validation and checkpoints "
        "are outside both.", "",
        "| workers | stage | MIP | steps/s | data % |",
        "|---:|---:|---:|---:|---:|",
    ]
    for w, rows in result["runs"].items():
        for r in rows:
            lines.append(f"| {w} | {r['stage']} | {r['mip']} | {r['steps_per_s']:.2f} | "
                         f"{100 * r['data_share']:.0f} |")
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.steps, args.sections, args.size = 3, 6, 256
    q.set_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="metroem_trainloop_") as root:
        runs = train_runs(root, args.steps, args.workers, args.sections, args.size)
    result = {
        "config": {
            "command": "python benchmarks/training_loop.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
            "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
            "sections": args.sections, "size": args.size,
            "total_seconds": time.perf_counter() - t0,
        },
        "runs": runs,
    }
    out = Path(args.out)
    q.write_results(out, "training_loop", result, markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'training_loop.json'} and {out / 'training_loop.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
