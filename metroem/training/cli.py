"""``train.py`` / ``metroem-train``: train the stages of a pyramid in order.

Single process::

    python train.py --pyramid_path models/demo --dataset_path demo_output/data \\
        --train_mode scratch --checkpoint_name demo

Several processes (DDP; gloo on CPU, NCCL on GPU)::

    torchrun --nproc_per_node 2 train.py --pyramid_path ... --dataset_path ... --device cpu

For each stage in ``--train_stages`` (default: all) the stage is trained, then (if it is in
``--generate_field_stages``, default: every trained stage that has a next stage) the fields that
feed the next stage are generated. ``--resume`` continues every stage from its last checkpoint.
Everything that can be checked up front (arguments, config, module folders, datasets, weights to
finetune, the device, a concurrent run on the same modules) is checked before anything is
written. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from metroem import cliargs, modules
from metroem import config as config_mod
from metroem.atomic import FileLock
from metroem.errors import MetroemError, cli_errors
from metroem.generate import check_outputs, generate_fields
from metroem.training import checkpoint as ckpt
from metroem.training import distributed as dist
from metroem.training.engine import (
    StageResult,
    StopFlag,
    StopRequested,
    check_stage,
    env_summary,
    train_stage,
    training_spec,
)
from metroem.training.faults import FaultHooks, TrainingHooks
from metroem.training.logger import RunLogger
from metroem.training.stage_inputs import GROUND_TRUTH_TAG, check_images

# Extra ``KEY=VALUE`` config overrides, separated by ';', applied before --set: for launchers
# whose command line is fixed (upstream scripts, job templates).
OVERRIDES_ENV = "METROEM_TRAIN_SET"


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="train.py", description="Train a multi-stage pyramid aligner, stage by stage."
    )
    cliargs.add_pyramid(p, help="pyramid folder (module folders <STAGE>_mip<MIP>in_<SUFFIX>)")
    p.add_argument("--dataset_path", required=True, help="folder of h5 image/field datasets")
    cliargs.add_checkpoint(p, required=True, help="name of the weights to write")
    p.add_argument("--train_mode", default=None, choices=config_mod.MODES,
                   help="default: the pyramid's own recipe PYRAMID/train.yaml (custom) when it "
                   "has one and no --train_params_path is given, else scratch")
    p.add_argument("--train_params_path", default=None, help="YAML/JSON config (custom mode)")
    p.add_argument("--train_stages", type=int, nargs="*", default=None,
                   help="stage numbers to train (default: all; none given: train nothing)")
    p.add_argument("--generate_field_stages", type=int, nargs="*", default=None,
                   help="stages after which to generate fields (default: every trained stage "
                        "that has a next stage)")
    cliargs.add_device(p, "--gpu", default=None,
                       help="cpu, gpu, cuda:N or N (default: cpu; --gpu is upstream's name)")
    p.add_argument("--no_redirect_stdout", action="store_true",
                   help="do not copy terminal output into the run's train.log")
    p.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="train again from scratch over an existing --checkpoint_name (and "
                   "replace the fields generated from it); without it or --resume, an existing "
                   "checkpoint of that name is refused")
    p.add_argument("--log_dir", default=None,
                   help="run logs + tensorboard (default: <pyramid_path>/_runs/<checkpoint_name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    cliargs.add_common(p)
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    env = os.environ.get(OVERRIDES_ENV, "")
    out = [o.strip() for o in env.replace("\n", ";").split(";") if o.strip()]
    out += list(args.overrides)
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    return out


def _check_checkpoint_name(name: str) -> None:
    if name == GROUND_TRUTH_TAG:
        raise MetroemError(
            f"--checkpoint_name {GROUND_TRUTH_TAG!r} is reserved for ground-truth field datasets; "
            "pick another name"
        )
    modules.weights_path(".", name)  # raises on names that cannot be a file name


def _check_not_replacing(module: modules.ModuleInfo, name: str, resume: bool,
                         overwrite: bool) -> None:
    """Refuse to train over an existing checkpoint unless --resume or --overwrite says how."""
    weights = modules.weights_path(module.path, name)
    state = ckpt.training_state_path(module.path, name)
    if resume or overwrite or not (weights.exists() or state.exists()):
        return
    status = ckpt.checkpoint_status(module.path, name)
    raise MetroemError(
        f"stage {module.stage}: {module.name} already has checkpoint {name!r} "
        f"({status.describe()}); pass --resume to continue it, --overwrite to train it again "
        "from scratch, or pick another --checkpoint_name"
    )


def _preflight(args, cfg, mods, train_numbers, gen_numbers) -> dict[int, dict]:
    """Check every stage to train and every generation; returns the per-stage configs."""
    if args.resume and args.overwrite:
        raise MetroemError("pass --resume (continue) or --overwrite (start again), not both")
    stage_cfgs = {}
    for i, m in enumerate(mods):
        if m.stage in train_numbers:
            stage_cfgs[m.stage] = config_mod.resolve(cfg, m.mip)
            prev = mods[i - 1] if i > 0 else None
            inputs_ready = prev is None or prev.stage not in gen_numbers
            check_stage(m, prev, args.dataset_path, args.checkpoint_name, stage_cfgs[m.stage],
                        args.resume, inputs_ready)
            _check_not_replacing(m, args.checkpoint_name, args.resume, args.overwrite)
        if m.stage in gen_numbers:
            if i + 1 < len(mods):
                check_images(args.dataset_path, mods[i + 1].mip)
            check_outputs(args.pyramid_path, args.dataset_path, args.checkpoint_name, m.stage,
                          overwrite=args.overwrite, own_ok=args.resume)
            for used in mods[: i + 1]:
                training_spec(used, config_mod.resolve(cfg, used.mip))  # fits the weights
                weights = modules.weights_path(used.path, args.checkpoint_name)
                if used.stage not in train_numbers and not weights.exists():
                    raise MetroemError(
                        f"generating fields after stage {m.stage} needs stage {used.stage}'s "
                        f"weights {weights}; train it (--train_stages {used.stage}) or use the "
                        "--checkpoint_name it was trained with"
                    )
    return stage_cfgs


def run(args: argparse.Namespace, hooks: TrainingHooks | None = None) -> list[StageResult]:
    """Train and generate as the arguments say; returns the per-stage results. ``hooks`` go to
    the training loop (:mod:`metroem.training.faults`; default: none)."""
    _check_checkpoint_name(args.checkpoint_name)
    info, device = dist.init(args.device)
    try:
        results = _run(args, info, device, hooks if hooks is not None else TrainingHooks())
        # every rank has finished before any tears the group down: a rank that destroys it
        # while another still saves its last checkpoint aborted once in CI at exit (gloo)
        dist.barrier(info)
        return results
    finally:
        dist.shutdown()


RECIPE_FILE = "train.yaml"  # a pyramid's own training recipe, used when no config is named


def _config_source(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """``(mode, params path, note)``: the pyramid's recipe when nothing else is named."""
    if args.train_mode is None and args.train_params_path is None:
        recipe = os.path.join(args.pyramid_path, RECIPE_FILE)
        if os.path.isfile(recipe):
            return "custom", recipe, (f"config: the pyramid's recipe {recipe} (pass --train_mode "
                                      "scratch or --train_params_path to train otherwise)")
    return args.train_mode or "scratch", args.train_params_path, None


def _run(args: argparse.Namespace, info: dist.DistInfo, device,
         hooks: TrainingHooks) -> list[StageResult]:
    mode, params, note = _config_source(args)
    cfg = config_mod.load_config(mode, params, _overrides(args))
    mods = modules.discover(args.pyramid_path)
    train_numbers = [m.stage for m in modules.select_stages(mods, args.train_stages)]
    last = mods[-1].stage
    if args.generate_field_stages is None:
        gen_numbers = [s for s in train_numbers if s != last]
    else:
        gen_numbers = [m.stage for m in modules.select_stages(mods, args.generate_field_stages)]
    log_dir = args.log_dir or os.path.join(args.pyramid_path, "_runs", args.checkpoint_name)
    results: list[StageResult] = []
    with contextlib.ExitStack() as stack:
        # Checks and locks come first and are agreed on by all ranks: bad input stops every
        # process with one line and leaves nothing behind.
        error = None
        try:
            if info.is_main:
                for m in mods:
                    if m.stage in train_numbers:
                        stack.enter_context(FileLock(str(m.path)))
            stage_cfgs = _preflight(args, cfg, mods, train_numbers, gen_numbers)
        except MetroemError as e:
            error = e
        if not dist.all_true(info, error is None):
            raise error or MetroemError("another process of this run failed its checks (above)")
        stop = stack.enter_context(StopFlag())
        logger = RunLogger(log_dir, enabled=info.is_main,
                           redirect_stdout=not args.no_redirect_stdout)
        stack.callback(logger.close)
        logger.message(f"metroem train: {env_summary(device, info)}; logs in {log_dir}")
        if note:
            logger.message(note)
        if info.is_main:
            config_mod.save_resolved(cfg, os.path.join(log_dir, "config.yaml"))
        try:
            _stages(args, info, device, mods, train_numbers, gen_numbers, cfg, stage_cfgs, stop,
                    hooks, logger, results)
        except StopRequested as e:
            e.signum = stop.signum
            logger.message(f"training stopped: {e}")  # the last line: not finished
            raise
        logger.message(_finished_line(args.checkpoint_name, train_numbers, gen_numbers))
    return results


def _finished_line(name: str, trained: list[int], generated: list[int]) -> str:
    """The last line of a run that finished everything it was asked to do."""
    parts = []
    if trained:
        parts.append(f"stage(s) {', '.join(map(str, trained))} trained to checkpoint {name!r}")
    if generated:
        parts.append(f"fields generated after stage(s) {', '.join(map(str, generated))}")
    return "training finished: " + ("; ".join(parts) if parts else "nothing to do")


def _stages(args, info, device, mods, train_numbers, gen_numbers, cfg, stage_cfgs, stop, hooks,
            logger, results) -> None:
    """Train and generate stage by stage (the body of :func:`run`)."""
    for i, m in enumerate(mods):
        if m.stage in train_numbers:
            prev = mods[i - 1] if i > 0 else None
            logger.message(f"stage {m.stage} ({m.name}): training at MIP {m.mip}")
            res = train_stage(m, prev, args.dataset_path, args.checkpoint_name,
                              stage_cfgs[m.stage], args.resume, device,
                              info, logger, stop=stop, hooks=hooks)
            results.append(res)
            epe = res.val.get("epe_median")
            logger.message(
                f"stage {m.stage} done: {res.steps} steps ({res.skipped} skipped) in "
                f"{res.seconds:.0f} s ({res.steps_per_s:.2f} steps/s, "
                f"{100 * res.data_share:.0f} % of it on data)"
                + (f", validation EPE median {epe:.3f} px" if epe is not None else "")
            )
        if m.stage in gen_numbers:
            if info.is_main:
                t0 = time.time()
                changes = {u.stage: config_mod.resolve(cfg, u.mip)["model"]["train_spec"]
                           for u in mods[: i + 1]}
                generate_fields(args.pyramid_path, args.dataset_path, args.checkpoint_name,
                                m.stage, device=device, overwrite=args.overwrite,
                                own_ok=args.resume, spec_changes=changes)
                logger.message(f"fields after stage {m.stage} in {time.time() - t0:.0f} s")
            dist.barrier(info)
        later = [s for s in train_numbers + gen_numbers if s > m.stage]
        if later and not dist.all_true(info, not stop.requested):
            raise StopRequested(
                f"stopped after stage {m.stage}; its checkpoint is complete; run again "
                "with --resume to go on"
            )


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = cliargs.parse_args(build_parser(), argv)  # the run header says how many threads
    hooks = FaultHooks.from_env()  # METROEM_FAULT: fault injection for tests and drills
    try:
        run(args, hooks)
    except StopRequested as e:  # already reported by the run's logger, as its last line
        signum = getattr(e, "signum", None) or signal.SIGTERM
        return 128 + int(signum)  # 130 after Ctrl-C, 143 after SIGTERM: not finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
