"""Train one pyramid stage: the training loop, validation, checkpoints, NaN policy.

The loop reads top to bottom in :func:`train_stage`: take a batch, augment it, predict the
saturated field, compute the loss terms, agree across ranks that everything is finite (else skip
the step), clip, step, log, validate, checkpoint. A SIGTERM/SIGINT finishes the current step,
writes a checkpoint and stops cleanly (preemption-friendly).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel

from metroem import augment as augment_mod
from metroem import config as config_mod
from metroem import losses, modules, nets
from metroem.errors import MetroemError
from metroem.training import checkpoint as ckpt
from metroem.training import distributed as dist
from metroem.training.data import BatchStream, CropDataset, split_indices
from metroem.training.logger import RunLogger
from metroem.training.stage_data import stage_dataset

Tensor = torch.Tensor


class StopRequested(Exception):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; the CLI exits 0."""


@dataclass
class StageResult:
    stage: int
    mip: int
    steps: int
    skipped: int
    val: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (a second signal is immediate)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
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

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


@torch.no_grad()
def validate(model, loader_items, loss_for, device) -> dict[str, float]:
    """Mean loss terms and EPE percentiles (where ground truth exists) over validation pairs."""
    model.eval()
    sums: dict[str, float] = {}
    errs = []
    n = 0
    for item in loader_items:
        b = _to({k: v.unsqueeze(0) for k, v in item.items() if isinstance(v, Tensor)}, device)
        pred = model(b["src"], b["tgt"], src_agg_field=b.get("src_agg_field"))
        _, terms = loss_for(b)(b["src"], b["tgt"], pred, gt_field=b.get("field"))
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if "field" in b:
            errs.append(_epe(pred, b["field"], (b["tgt"] != 0).float()).cpu())
        n += 1
    out = {k: v / max(n, 1) for k, v in sums.items()}
    if errs:
        e = torch.cat(errs)
        if e.numel():
            out["epe_median"] = float(e.median())
            out["epe_mean"] = float(e.mean())
            out["epe_p95"] = float(e.quantile(0.95)) if e.numel() < 16_000_000 else float("nan")
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


def train_stage(
    module: modules.ModuleInfo,
    prev: modules.ModuleInfo | None,
    dataset_path: str,
    checkpoint_name: str,
    cfg: dict,
    mode: str,
    resume: bool,
    device: torch.device,
    info: dist.DistInfo,
    logger: RunLogger,
) -> StageResult:
    """Train ``module`` on the stage's dataset with the resolved config ``cfg``."""
    t_start = time.time()
    tcfg, dcfg = cfg["train"], cfg["data"]
    seed = int(cfg["seed"])
    torch.manual_seed(seed + info.rank)

    # --- data ------------------------------------------------------------------------------
    base = stage_dataset(dataset_path, module.mip, prev, checkpoint_name)
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
    val_crop = 2 * crop
    val_items = [_center_crop(base[i], val_crop) for i in val_idx] if info.is_main else []

    # --- model, optimiser, schedule ---------------------------------------------------------
    spec, _ = modules.read_spec(module.path)
    model = nets.build_model(spec)
    weights = modules.weights_path(module.path, checkpoint_name)
    state_path = ckpt.training_state_path(module.path, checkpoint_name)
    if mode == "finetune" and not resume:
        start = _finetune_source(module.path, checkpoint_name)
        if start is None:
            raise MetroemError(
                f"--train_mode finetune needs existing weights in {module.path}/model; "
                "train with --train_mode scratch first"
            )
        modules.load_state_dict(model, torch.load(start, weights_only=True), str(start))
    model.to(device).train()
    optimizer = config_mod.build_optimizer(model.parameters(), cfg)
    scheduler = config_mod.build_scheduler(optimizer, cfg)
    steps = int(tcfg["steps"])
    step, skipped = 0, 0
    if resume and state_path.exists():
        restored = ckpt.load_training_state(
            state_path, model, optimizer, scheduler, map_location=device
        )
        step = int(restored.step)
        skipped = int((restored.extra or {}).get("skipped", 0))
        stream.load_state(restored.data_state or {})
        logger.message(f"stage {module.stage}: resumed at step {step} from {state_path}")
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
    max_skips = int(tcfg["nan_policy"]["max_skips"])
    clip = float(tcfg["grad_clip"])
    log_every, image_every = int(tcfg["log_every"]), int(tcfg["image_every"])
    val_every, ckpt_every = int(tcfg["val_every"]), int(tcfg["checkpoint_every"])

    def save(final: bool = False) -> None:
        if not info.is_main:
            return
        modules.refresh_code(module.path)
        modules.save_weights(module.path, checkpoint_name, model.state_dict())
        ckpt.save_training_state(
            state_path, model, optimizer, scheduler, step=step,
            rng_states=ckpt.capture_rng_states(), data_state=stream.state(), config=cfg,
            extra={"skipped": skipped, "final": final, "stage": module.stage},
        )

    name = f"stage{module.stage}_mip{module.mip}"
    logger.start_stage(name, steps, step)
    val_metrics: dict[str, float] = {}
    t_last, samples = time.time(), 0
    with _StopFlag() as stop:
        while step < steps:
            # One step: data -> augment -> forward -> loss -> (finite?) -> backward -> step.
            batch = _to(next(stream), device)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + info.rank)
            batch = aug(batch, gen)
            pred = net(batch["src"], batch["tgt"], src_agg_field=batch.get("src_agg_field"))
            total, terms = loss_for(batch)(
                batch["src"], batch["tgt"], pred, gt_field=batch.get("field"),
                src_mask=batch.get("src_defects"), tgt_mask=batch.get("tgt_defects"),
            )
            optimizer.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(total))
            if finite:
                total.backward()
                gnorm = _grad_norm(model)
                finite = bool(torch.isfinite(gnorm))
            if not dist.all_agree_finite(info, finite, device):
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                logger.message(f"step {step}: non-finite loss or gradient, skipped ({skipped})")
                if skipped > max_skips:
                    save()
                    raise MetroemError(
                        f"stage {module.stage}: {skipped} non-finite steps (limit {max_skips}); "
                        f"last good weights saved to {weights}; check the data for NaN/inf or "
                        "lower the learning rate"
                    )
                step += 1
                scheduler.step()
                continue
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            step += 1
            samples += batch["src"].shape[0] * info.world_size

            if step % log_every == 0 or step == steps:
                dt = time.time() - t_last
                values = {
                    k: dist.mean_scalar(info, float(v.detach()), device) for k, v in terms.items()
                }
                values.update(
                    loss=dist.mean_scalar(info, float(total.detach()), device),
                    lr=optimizer.param_groups[0]["lr"],
                    grad_norm=float(gnorm),
                    samples_per_s=samples / max(dt, 1e-9),
                )
                logger.scalars(step, values, prefix="train/")
                logger.step(log_every if step % log_every == 0 else step % log_every,
                            loss=values["loss"])
                t_last, samples = time.time(), 0
            if info.is_main and image_every > 0 and step % image_every == 0:
                logger.panel(step, "train/pair", batch["src"][0, 0], batch["tgt"][0, 0],
                             pred[0].detach())
            if info.is_main and val_items and (step % val_every == 0 or step == steps):
                val_metrics = validate(model, val_items, loss_for, device)
                logger.scalars(step, val_metrics, prefix="val/")
                v0 = _center_crop(val_items[0], None)
                with torch.no_grad():
                    vb = _to({k: v.unsqueeze(0) for k, v in v0.items()
                              if isinstance(v, Tensor)}, device)
                    vp = model.eval()(vb["src"], vb["tgt"], src_agg_field=vb.get("src_agg_field"))
                    model.train()
                logger.panel(step, "val/pair", vb["src"][0, 0], vb["tgt"][0, 0], vp[0])
                if "epe_median" in val_metrics:
                    logger.message(
                        f"{name} step {step}: val EPE median {val_metrics['epe_median']:.3f} px"
                    )
            if ckpt_every > 0 and step % ckpt_every == 0:
                save()
            if stop.requested:
                save()
                logger.end_stage()
                raise StopRequested(f"stopped at step {step}; checkpoint written; --resume goes on")
    save(final=True)
    dist.barrier(info)
    logger.end_stage()
    if not math.isfinite(sum(val_metrics.values())) if val_metrics else False:
        logger.message(f"{name}: validation produced non-finite metrics {val_metrics}")
    return StageResult(module.stage, module.mip, step, skipped, val_metrics,
                       time.time() - t_start)


def _finetune_source(module_path, checkpoint_name: str):
    """Weights to start a finetune from: the named checkpoint if present, else the default."""
    path = modules.weights_path(module_path, checkpoint_name)
    if path.exists():
        return path
    _, default = modules.read_spec(module_path)
    if default:
        p = modules.weights_path(module_path, default)
        if p.exists():
            return p
    names = modules.checkpoint_names(module_path)
    return modules.weights_path(module_path, names[-1]) if names else None


def env_summary(device: torch.device, info: dist.DistInfo) -> str:
    threads = torch.get_num_threads()
    return (f"device {device}, world size {info.world_size}, torch {torch.__version__}, "
            f"{threads} CPU threads, pid {os.getpid()}")
