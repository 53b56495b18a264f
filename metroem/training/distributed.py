"""Multi-process training through torchrun: process group setup and the few collectives we need.

A single process needs no torchrun: everything here degrades to no-ops when ``WORLD_SIZE`` is
unset or 1. CPU uses the gloo backend, CUDA uses NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from metroem.devices import parse_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank=rank, world_size=world, local_rank=local)
    dev = parse_device(device, local)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    return info, dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def agree(
    info: DistInfo, finite: bool, stop: bool, device: torch.device
) -> tuple[bool, bool]:
    """``(every rank is finite, some rank wants to stop)`` with one all-reduce.

    All ranks call this every step, so a NaN on one rank makes every rank skip the same step,
    and a SIGTERM that reaches the ranks at different moments stops them all at the same step.
    """
    if not info.enabled:
        return finite, stop
    flags = torch.tensor([0.0 if finite else 1.0, 1.0 if stop else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item() == 0.0), bool(flags[1].item() > 0.0)


def all_true(info: DistInfo, value: bool) -> bool:
    """True only if ``value`` is true on every rank (CPU tensor: works before a device is used,
    on gloo; NCCL needs the rank's GPU, which :func:`init` has set)."""
    if not info.enabled:
        return value
    on_gpu = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    flag = torch.tensor([0.0 if value else 1.0], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() == 0.0)


def mean_scalar(info: DistInfo, value: float, device: torch.device) -> float:
    """Average a Python float over ranks (for logging)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size
