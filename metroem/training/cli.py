"""``train.py`` / ``metroem-train``: train the stages of a pyramid in order.

Single process::

    python train.py --pyramid_path models/demo --dataset_path demo_output/data \\
        --train_mode scratch --checkpoint_name demo

Several processes (DDP; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 2 train.py --pyramid_path ... --dataset_path ... --device cpu

For each stage in ``--train_stages`` (default: all) the stage is trained, then (if it is in
``--generate_field_stages``, default: every trained stage that has a next stage) the fields that
feed the next stage are generated. ``--resume`` continues every stage from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from metroem import config as config_mod
from metroem import modules
from metroem.errors import cli_errors
from metroem.generate import generate_fields
from metroem.training import distributed as dist
from metroem.training.engine import StageResult, StopRequested, env_summary, train_stage
from metroem.training.logger import RunLogger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a multi-stage pyramid aligner, stage by stage."
    )
    p.add_argument("--pyramid_path", required=True, help="folder of <STAGE>_mip<MIP>in_<SUFFIX>")
    p.add_argument("--dataset_path", required=True, help="folder of h5 image/field datasets")
    p.add_argument("--checkpoint_name", required=True, help="name of the weights to write")
    p.add_argument("--train_mode", default="scratch", choices=config_mod.MODES)
    p.add_argument("--train_params_path", default=None, help="YAML/JSON config (custom mode)")
    p.add_argument("--train_stages", type=int, nargs="*", default=None,
                   help="stage numbers to train (default: all; none given: train nothing)")
    p.add_argument("--generate_field_stages", type=int, nargs="*", default=None,
                   help="stages after which to generate fields (default: every trained stage)")
    p.add_argument("--device", default=None, help="cpu, gpu, cuda:N or N (default: cpu)")
    p.add_argument("--gpu", default=None, help="alias of --device N (upstream name)")
    p.add_argument("--no_redirect_stdout", action="store_true",
                   help="do not copy terminal output into the run's train.log")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    p.add_argument("--log_dir", default=None,
                   help="run logs + tensorboard (default: <pyramid_path>/_runs/<checkpoint_name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    return p


def run(args: argparse.Namespace) -> list[StageResult]:
    """Train and generate as the arguments say; returns the per-stage results."""
    device_name = args.device if args.device is not None else args.gpu
    info, device = dist.init(device_name)
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = config_mod.load_config(args.train_mode, args.train_params_path, overrides)
    mods = modules.discover(args.pyramid_path)
    to_train = modules.select_stages(mods, args.train_stages)
    train_numbers = [m.stage for m in to_train]
    last = mods[-1].stage
    if args.generate_field_stages is None:
        gen_numbers = [s for s in train_numbers if s != last]
    else:
        gen_numbers = [m.stage for m in modules.select_stages(mods, args.generate_field_stages)]
    log_dir = args.log_dir or os.path.join(args.pyramid_path, "_runs", args.checkpoint_name)
    logger = RunLogger(log_dir, enabled=info.is_main, redirect_stdout=not args.no_redirect_stdout)
    results: list[StageResult] = []
    try:
        logger.message(f"metroem train: {env_summary(device, info)}; logs in {log_dir}")
        if info.is_main:
            config_mod.save_resolved(cfg, os.path.join(log_dir, "config.yaml"))
        for i, m in enumerate(mods):
            if m.stage in train_numbers:
                stage_cfg = config_mod.resolve(cfg, m.mip)
                prev = mods[i - 1] if i > 0 else None
                logger.message(f"stage {m.stage} ({m.name}): training at MIP {m.mip}")
                res = train_stage(m, prev, args.dataset_path, args.checkpoint_name, stage_cfg,
                                  args.train_mode, args.resume, device, info, logger)
                results.append(res)
                epe = res.val.get("epe_median")
                logger.message(
                    f"stage {m.stage} done: {res.steps} steps in {res.seconds:.0f} s"
                    + (f", validation EPE median {epe:.3f} px" if epe is not None else "")
                )
            if m.stage in gen_numbers:
                if info.is_main:
                    t0 = time.time()
                    generate_fields(args.pyramid_path, args.dataset_path, args.checkpoint_name,
                                    m.stage, device=device, log=logger.message)
                    logger.message(f"fields after stage {m.stage} in {time.time() - t0:.0f} s")
                dist.barrier(info)
    finally:
        logger.close()
        dist.shutdown()
    return results


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except StopRequested as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
