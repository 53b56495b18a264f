"""Train one pyramid stage: the training loop, validation, checkpoints, NaN policy, hooks.

The loop reads top to bottom in :func:`train_stage`: take a batch, augment it, predict the
saturated field, compute the loss terms, back-propagate, agree across ranks that loss and
gradients are finite (else skip the step) and whether a stop was requested, clip, step, log,
validate, checkpoint. A SIGTERM/SIGINT (see :class:`StopFlag`) finishes the current step, writes
a checkpoint and raises :class:`StopRequested` (preemption-friendly; ``--resume`` goes on).

Resuming is exact: every random choice of a step is a function of (seed, step, rank), the batch
order is restored from the checkpoint, and model, optimizer and scheduler states are saved
whole, so a resumed run ends with the same weights as an uninterrupted one (on the same device).

The loop calls a :class:`~metroem.training.faults.TrainingHooks` at the start of each step, on
each step's loss and around each checkpoint write (default: hooks that do nothing). Fault
injection for tests and drills (``METROEM_FAULT``) lives in :mod:`metroem.training.faults`; the
command line passes it in, the loop never reads the environment.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from metroem import augment as augment_mod
from metroem import config as config_mod
from metroem import losses, modules, nets
from metroem.atomic import remove_stale_temps_in
from metroem.errors import MetroemError
from metroem.training import checkpoint as ckpt
from metroem.training import distributed as dist
from metroem.training import stage_inputs
from metroem.training.batches import BatchStream, CropDataset, split_indices
from metroem.training.equivariance import forward_with_equivariance
from metroem.training.faults import TrainingHooks
from metroem.training.logger import RunLogger

Tensor = torch.Tensor

class StopRequested(Exception):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; the CLI exits 128 + signal
    (130 for Ctrl-C, 143 for SIGTERM), so a stopped run never looks like a finished one."""


@dataclass
class StageResult:
    stage: int
    mip: int
    steps: int
    skipped: int
    val: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    steps_per_s: float = 0.0  # of the training loop (batches, forward, backward, step)
    data_share: float = 0.0  # the part of the loop's time spent getting and augmenting batches


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a second signal is immediate)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._old = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- helpers --------------------------------------------------------------------------------


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}


def _grad_norm(model: torch.nn.Module) -> Tensor:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).norm()


def _epe(pred: Tensor, gt: Tensor, valid: Tensor | None) -> Tensor:
    """End-point error per pixel, flattened over valid pixels of the whole batch."""
    e = (pred - gt).norm(dim=1)
    if valid is not None:
        e = e[valid[:, 0] > 0]
    return e.flatten()


def _strain_median(field: Tensor, tgt: Tensor) -> float:
    """Median |grad f|_F (px/px) of the first item's field over the target's interior tissue
    (metroem.eval.metrics.gradient_norm_stats: 0 for a translation)."""
    from metroem.eval.metrics import gradient_norm_stats

    valid = tgt[0, 0].detach().cpu() != 0
    return gradient_norm_stats(field[:1].detach().cpu(), valid)["median"]


def _unsqueeze(item: dict, device: torch.device) -> dict:
    return _to({k: v.unsqueeze(0) for k, v in item.items() if isinstance(v, Tensor)}, device)


@torch.no_grad()
def validate(model, items, loss_for, device) -> dict[str, float]:
    """Mean loss terms and EPE percentiles (where ground truth exists) over validation pairs."""
    model.eval()
    sums: dict[str, float] = {}
    errs, strains = [], []
    for item in items:
        b = _unsqueeze(item, device)
        pred = model(b["src"], b["tgt"], src_agg_field=b.get("src_agg_field"))
        strains.append(_strain_median(pred, b["tgt"]))
        _, terms = loss_for(b)(b["src"], b["tgt"], pred, gt_field=b.get("field"),
                               features=model.pair_features, gt_known=b.get("field_known"))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if "field" in b and float(b.get("field_known", torch.ones(1)).min()) > 0:
            errs.append(_epe(pred, b["field"], (b["tgt"] != 0).float()).cpu())
    out = {k: v / max(len(items), 1) for k, v in sums.items()}
    finite = [v for v in strains if math.isfinite(v)]
    if finite:  # how much the fields bend: a stage that morphs neighbours shows it here
        out["strain_median"] = float(torch.tensor(finite).median())
    e = torch.cat(errs) if errs else torch.zeros(0)
    if e.numel():
        out["epe_median"] = float(e.median())
        out["epe_mean"] = float(e.mean())
        out["epe_p95"] = float(e.kthvalue(max(1, math.ceil(0.95 * e.numel()))).values)
    model.train()
    return out


def _center_crop(item: dict, size: int | None) -> dict:
    out = {}
    for k, v in item.items():
        if isinstance(v, Tensor) and v.dim() == 3 and size is not None:
            h, w = v.shape[-2:]
            y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
            v = v[:, y : y + size, x : x + size]
        out[k] = v
    return out


def remove_stale_temp_files(module_path) -> list[str]:
    """Delete hidden ``.NAME.tmp-PID-*`` files (see metroem.atomic) left in a module folder by
    a process that was killed mid-write (its pid is gone); returns what was removed."""
    removed = []
    for folder in (Path(module_path), Path(module_path) / "model"):
        removed += remove_stale_temps_in(str(folder))
    return removed


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _finetune_source(module_path, checkpoint_name: str):
    """Weights to start a finetune from: the named checkpoint if present, else the default."""
    path = modules.weights_path(module_path, checkpoint_name)
    return path if path.exists() else modules.choose_checkpoint(module_path, None)


def training_spec(module: modules.ModuleInfo, cfg: dict) -> dict:
    """The module's spec with the config's ``model.train_spec`` on top, checked to take the
    same weights (only parameter-free settings may differ while training)."""
    spec, _ = modules.read_spec(module.path)
    changes = dict(cfg.get("model", {}).get("train_spec") or {})
    try:
        nets.build_model(spec)
    except (ValueError, TypeError) as e:
        raise MetroemError(f"{module.path}: cannot build the model spec ({e}); fix it") from e
    if not changes:
        return spec
    try:
        nets.check_same_parameters(spec, {**spec, **changes})
    except (ValueError, TypeError) as e:
        raise MetroemError(
            f"model.train_spec {changes} does not fit stage {module.stage} ({module.name}): "
            f"{e}; only settings without parameters (e.g. {', '.join(nets.REFINEMENTS_OFF)}) "
            "may differ while training"
        ) from e
    return {**spec, **changes}


def _initial_model(module: modules.ModuleInfo, checkpoint_name: str, cfg: dict, resume: bool):
    """The stage's model from its spec (with ``model.train_spec``); finetune (not resuming)
    loads the existing weights.

    Finetuning is a config on the finetune preset: ``--train_mode finetune`` (the config loader
    makes its preset match the mode) or a custom config with ``preset: finetune``.
    """
    model = nets.build_model(training_spec(module, cfg))
    state_path = ckpt.training_state_path(module.path, checkpoint_name)
    if cfg["preset"] == "finetune" and not (resume and state_path.exists()):
        start = _finetune_source(module.path, checkpoint_name)
        if start is None:
            raise MetroemError(
                f"--train_mode finetune needs existing weights in {module.path}/model; "
                "train with --train_mode scratch first"
            )
        modules.load_state_dict(model, torch.load(start, weights_only=True), str(start))
    return model


def check_stage(
    module: modules.ModuleInfo,
    prev: modules.ModuleInfo | None,
    dataset_path: str,
    checkpoint_name: str,
    cfg: dict,
    resume: bool,
    inputs_ready: bool,
) -> None:
    """Raise what :func:`train_stage` would reject, before a run writes anything.

    ``inputs_ready``: the stage's incoming field files must exist already (they are not
    generated earlier in this run), so the whole stage dataset is checked.
    """
    if inputs_ready:
        ds = stage_inputs.stage_dataset(dataset_path, module.mip, prev, checkpoint_name)
        sizes = ds.patch_sizes()
    else:
        sizes = stage_inputs.check_images(dataset_path, module.mip)
    crop = int(cfg["data"]["crop_size"])
    if len(set(sizes)) > 1 and crop > min(sizes):
        raise MetroemError(
            f"stage {module.stage}: patches at MIP {module.mip} have sizes {sorted(set(sizes))} "
            f"and data.crop_size {crop} exceeds the smallest; set data.crop_size <= {min(sizes)} "
            f"(per_mip.{module.mip}.data.crop_size)"
        )
    model = _initial_model(module, checkpoint_name, cfg, resume)
    losses.check_embedding_levels(cfg["loss"], model.num_levels)
    _check_tissue_size(module, dataset_path, crop, min(sizes), model)
    state_path = ckpt.training_state_path(module.path, checkpoint_name)
    if resume and state_path.exists():
        ckpt.load_checkpoint(module.path, checkpoint_name, model, restore_rng=False)


def _check_tissue_size(module: modules.ModuleInfo, dataset_path: str, crop: int, patch: int,
                       model: torch.nn.Module) -> None:
    """Refuse a stage whose data at its MIP holds less tissue than it trains on.

    A pyramid meant for larger sections (e.g. MIP 8 of a 512 px stack: 2 px) would train on
    crops that are nearly all "no data" and learn nonsense. The tissue is measured on the
    first pair of every image dataset; tissue-free data (all 0) is left to the losses.
    """
    extent, where = stage_inputs.tissue_extent(dataset_path, module.mip)
    need = max(min(crop, patch), int(getattr(model, "stride", 1)))
    if 0 < extent < need:
        what = (f"data.crop_size {crop}" if crop <= patch else f"the {patch} px patches")
        stride = int(getattr(model, "stride", 1))
        if need == stride and stride > min(crop, patch):
            what = f"its network's coarsest level ({stride} px per cell)"
        raise MetroemError(
            f"stage {module.stage} ({module.name}): the tissue at MIP {module.mip} is only "
            f"{extent} px across (in {where}), smaller than {what}; this stage cannot learn "
            "from it: use a pyramid whose stages suit the data's size (finer MIPs), or set "
            f"per_mip.{module.mip}.data.crop_size <= {extent}"
        )


# --- the loop -------------------------------------------------------------------------------


def train_stage(
    module: modules.ModuleInfo,
    prev: modules.ModuleInfo | None,
    dataset_path: str,
    checkpoint_name: str,
    cfg: dict,
    resume: bool,
    device: torch.device,
    info: dist.DistInfo,
    logger: RunLogger,
    stop: StopFlag | None = None,
    hooks: TrainingHooks | None = None,
) -> StageResult:
    """Train ``module`` on the stage's dataset with the resolved config ``cfg``; ``hooks`` (see
    :mod:`metroem.training.faults`) are called at each step, loss and checkpoint write."""
    t_start = time.time()
    stop = stop if stop is not None else StopFlag()
    hooks = hooks if hooks is not None else TrainingHooks()
    tcfg, dcfg = cfg["train"], cfg["data"]
    seed = int(cfg["seed"])
    torch.manual_seed(seed + info.rank)

    # --- data ------------------------------------------------------------------------------
    base = stage_inputs.stage_dataset(
        dataset_path, module.mip, prev, checkpoint_name, float(dcfg["cache_mb"])
    )
    train_idx, val_idx = split_indices(len(base), float(dcfg["val_fraction"]), seed)
    crop = int(dcfg["crop_size"])
    stream = BatchStream(
        CropDataset(base, train_idx, crop, seed),
        batch_size=int(dcfg["batch_size"]),
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=int(dcfg["num_workers"]),
    )
    val_items = [_center_crop(base[i], 2 * crop) for i in val_idx] if info.is_main else []

    # --- model, optimiser, schedule, resume -------------------------------------------------
    model = _initial_model(module, checkpoint_name, cfg, resume)
    weights = modules.weights_path(module.path, checkpoint_name)
    state_path = ckpt.training_state_path(module.path, checkpoint_name)
    model.to(device).train()
    optimizer = config_mod.build_optimizer(model.parameters(), cfg)
    scheduler = config_mod.build_scheduler(optimizer, cfg)
    steps = int(tcfg["steps"])
    step, skipped = 0, 0
    val_metrics: dict[str, float] = {}
    if resume and state_path.exists():
        restored = ckpt.load_checkpoint(
            module.path, checkpoint_name, model, optimizer, scheduler, map_location=device
        )
        step = int(restored.step)
        extra = restored.extra or {}
        skipped = int(extra.get("skipped", 0))
        val_metrics = dict(extra.get("val") or {})
        stream.load_state(restored.data_state or {})
        logger.message(f"stage {module.stage}: resumed at step {step} from {state_path}")
        changed = config_mod.differences(restored.config, cfg)
        if changed:  # allowed (e.g. more steps), but never silently
            logger.message(f"stage {module.stage}: the config differs from the checkpoint's "
                           f"({'; '.join(changed)}); resuming with the new values")
    elif resume:
        logger.message(f"stage {module.stage}: no training state at {state_path}; starting fresh")
    net = DistributedDataParallel(model) if info.enabled else model

    # Batches with a known field (ground truth or synthetic same-section pairs) get the
    # supervised term; the others are trained self-supervised only.
    loss_sup = losses.build_loss(cfg["loss"], cfg["masks"])
    loss_self = losses.build_loss({**cfg["loss"], "supervised_weight": 0.0}, cfg["masks"])

    def loss_for(batch: dict):
        return loss_sup if "field" in batch else loss_self

    aug = augment_mod.build_augment(cfg["augment"])
    eq_weight = float(cfg["loss"]["equivariance_weight"])
    eq_spec = augment_mod.deformation_spec(cfg["augment"]["warp"])
    max_skips = int(tcfg["nan_policy"]["max_skips"])
    clip = float(tcfg["grad_clip"])
    log_every, image_every = int(tcfg["log_every"]), int(tcfg["image_every"])
    val_every, ckpt_every = int(tcfg["val_every"]), int(tcfg["checkpoint_every"])
    entry_written = False

    def save(final: bool = False) -> None:
        nonlocal entry_written
        if not info.is_main:
            return
        with hooks.checkpoint_write(module.stage):
            if not entry_written:  # the current create.py (older folders carry frozen code)
                modules.write_entry_point(module.path)
                entry_written = True
            # Only a finished run's weights become the module's default checkpoint: a
            # stopped run's never do (loading then names them or refuses, see aligner.py).
            ckpt.save_checkpoint(
                module.path, checkpoint_name, model, optimizer, scheduler, step=step,
                data_state=stream.state(), config=cfg, make_default=False,
                extra={"skipped": skipped, "final": final, "stage": module.stage,
                       "val": {k: float(v) for k, v in val_metrics.items()}},
            )
            if final:
                modules.set_default_checkpoint(module.path, checkpoint_name)

    if info.is_main:  # we hold the module's lock: leftovers of a killed run can go
        for path in remove_stale_temp_files(module.path):
            logger.message(f"removed {path}, left by an interrupted run")
    name = f"stage{module.stage}_mip{module.mip}"
    logger.start_stage(name, steps, step)
    t_last, samples = time.time(), 0
    # seconds spent since the last log line: getting and augmenting batches, and whole steps
    data_s, busy_s, timed_steps = 0.0, 0.0, 0
    total_data_s, total_busy_s, total_steps = 0.0, 0.0, 0
    while step < steps:
        # One step: data -> augment -> forward -> loss -> backward -> agree -> step.
        hooks.on_step(module.stage, step + 1, info.rank)
        t_step = time.perf_counter()
        batch = _to(next(stream), device)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + info.rank)
        batch = aug(batch, gen)
        dt_data = time.perf_counter() - t_step
        data_s += dt_data
        total_data_s += dt_data
        if eq_weight > 0:
            pred, eq_term = forward_with_equivariance(net, batch, eq_spec, gen)
        else:
            pred = net(batch["src"], batch["tgt"], src_agg_field=batch.get("src_agg_field"))
        total, terms = loss_for(batch)(
            batch["src"], batch["tgt"], pred, gt_field=batch.get("field"),
            src_mask=batch.get("src_defects"), tgt_mask=batch.get("tgt_defects"),
            features=model.pair_features,  # the embedding term's encoder (outside DDP's forward)
            gt_known=batch.get("field_known"),
        )
        if eq_weight > 0:
            terms["equivariance"] = eq_term
            total = total + eq_weight * eq_term
        total = hooks.on_loss(module.stage, step + 1, info.rank, total)
        optimizer.zero_grad(set_to_none=True)
        # Every rank back-propagates, even a non-finite loss, so DDP's gradient all-reduce
        # always pairs up; the verdict below is shared, so all ranks skip the same steps.
        total.backward()
        gnorm = _grad_norm(model)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(gnorm))
        all_finite, stop_now = dist.agree(info, finite, stop.requested, device)
        step += 1
        if all_finite:
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        else:
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            logger.message(f"{name} step {step}: non-finite loss or gradient, skipped "
                           f"({skipped} of at most {max_skips})")
            if skipped > max_skips:
                save()
                logger.end_stage()
                raise MetroemError(
                    f"stage {module.stage}: {skipped} non-finite steps (limit "
                    f"train.nan_policy.max_skips={max_skips}); last good weights saved to "
                    f"{weights}; check the data for NaN/inf or lower the learning rate"
                )
        scheduler.step()
        samples += batch["src"].shape[0] * info.world_size
        logger.step(1)
        dt_step = time.perf_counter() - t_step
        busy_s += dt_step
        total_busy_s += dt_step
        timed_steps += 1
        total_steps += 1

        if all_finite and (_every(step, log_every) or step == steps):
            dt = time.time() - t_last
            values = {
                k: dist.mean_scalar(info, float(v.detach()), device) for k, v in terms.items()
            }
            values.update(
                loss=dist.mean_scalar(info, float(total.detach()), device),
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(gnorm),
                samples_per_s=samples / max(dt, 1e-9),
                # steps/s of the training loop itself, and the share of it spent getting and
                # augmenting batches (data-bound when it is large: add loader workers)
                steps_per_s=dist.mean_scalar(info, timed_steps / max(busy_s, 1e-9), device),
                data_share=dist.mean_scalar(info, data_s / max(busy_s, 1e-9), device),
            )
            logger.scalars(step, values, prefix="train/")
            logger.postfix(loss=values["loss"])
            t_last, samples = time.time(), 0
            data_s, busy_s, timed_steps = 0.0, 0.0, 0
        if info.is_main and _every(step, image_every):
            logger.panel(step, "train/pair", batch["src"][0, 0], batch["tgt"][0, 0],
                         pred[0].detach())
        if info.is_main and val_items and (_every(step, val_every) or step == steps):
            val_metrics = validate(model, val_items, loss_for, device)
            logger.scalars(step, val_metrics, prefix="val/")
            with torch.no_grad():
                vb = _unsqueeze(val_items[0], device)
                vp = model.eval()(vb["src"], vb["tgt"], src_agg_field=vb.get("src_agg_field"))
                model.train()
            logger.panel(step, "val/pair", vb["src"][0, 0], vb["tgt"][0, 0], vp[0])
            if "epe_median" in val_metrics:
                logger.message(
                    f"{name} step {step}: val EPE median {val_metrics['epe_median']:.3f} px"
                )
        if step < steps and (_every(step, ckpt_every) or stop_now):
            save()
        if stop_now and step < steps:
            logger.end_stage()
            raise StopRequested(
                f"stage {module.stage} stopped at step {step}; checkpoint written to "
                f"{state_path}; run again with --resume to go on"
            )
    save(final=True)
    dist.barrier(info)
    logger.end_stage()
    if val_metrics and not all(math.isfinite(v) for v in val_metrics.values()):
        logger.message(f"{name}: validation produced non-finite metrics {val_metrics}")
    return StageResult(module.stage, module.mip, step, skipped, val_metrics,
                       time.time() - t_start, total_steps / max(total_busy_s, 1e-9),
                       total_data_s / max(total_busy_s, 1e-9))


def env_summary(device: torch.device, info: dist.DistInfo) -> str:
    threads = torch.get_num_threads()
    return (f"device {device}, world size {info.world_size}, torch {torch.__version__}, "
            f"{threads} CPU threads, pid {os.getpid()}")
