"""Training state beside a module's weights, so an interrupted run resumes exactly.

A checkpoint ``NAME`` of a module is two files in its ``model/`` folder:

* ``NAME.state.pth.tar``: the plain state_dict that ``create.py`` / modelhouse load;
* ``NAME.training.pt``: everything else a resume needs: format version, step, model, optimizer
  and scheduler state, RNG states (python, numpy, torch CPU and CUDA), the data loader's
  position, the resolved config and free ``extra`` data.

Both are written to a temporary file and ``os.replace``d, and both hold only tensors and plain
Python values, so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import metroem
from metroem import modules
from metroem.atomic import atomic_write_bytes
from metroem.errors import MetroemError

__all__ = [
    "FORMAT",
    "VERSION",
    "ResumeState",
    "capture_rng_states",
    "restore_rng_states",
    "save_training_state",
    "load_training_state",
    "training_state_path",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointStatus",
    "checkpoint_status",
]

FORMAT = "metroem-training-state"
VERSION = 1
STATE_SUFFIX = ".training.pt"


@dataclass
class ResumeState:
    """What :func:`load_training_state` hands back besides restoring objects in place."""

    step: int
    data_state: Any
    config: dict
    extra: dict = field(default_factory=dict)
    rng_states: dict = field(default_factory=dict)


def training_state_path(module_path: str | os.PathLike, checkpoint_name: str) -> Path:
    """``<module>/model/<checkpoint_name>.training.pt`` (beside its weights)."""
    weights = modules.weights_path(module_path, checkpoint_name)
    return weights.with_name(checkpoint_name + STATE_SUFFIX)


# --- RNG states ---------------------------------------------------------------------------------


def capture_rng_states() -> dict:
    """The python, numpy, torch CPU and CUDA RNG states as tensors and plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: Mapping) -> None:
    """Put back the states of :func:`capture_rng_states` (CUDA ones only when CUDA is here)."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    nps = states["numpy"]
    np.random.set_state(
        (
            nps["kind"],
            nps["keys"].numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"].to("cpu", torch.uint8))
    cuda = list(states.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in cuda])
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda)} devices, this machine has "
                f"{torch.cuda.device_count()}: CUDA random numbers will differ",
                stacklevel=2,
            )


# --- save / load ---------------------------------------------------------------------------------


def _check_plain(value, where: str) -> None:
    """Raise TypeError unless ``value`` is tensors / plain values that weights_only can load."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return  # exact types: str/int subclasses (e.g. torch's TorchVersion) do not load
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; training state holds only tensors, numbers, "
        "strings, None, lists and dicts (so it loads with weights_only=True)"
    )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / DataParallel, so keys carry no 'module.'."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def save_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    step: int,
    rng_states: Mapping | None,
    data_state: Any,
    config: Mapping,
    extra: Mapping | None = None,
) -> Path:
    """Write the resume state to ``path`` atomically (temp file + os.replace).

    ``rng_states`` is normally :func:`capture_rng_states` taken at the moment of saving;
    ``data_state``, ``config`` and ``extra`` must be tensors / plain values.
    """
    state = {
        "format": FORMAT,
        "version": VERSION,
        "metroem_version": metroem.__version__,
        "torch_version": str(torch.__version__),
        "step": int(step),
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": dict(rng_states) if rng_states is not None else None,
        "data_state": data_state,
        "config": dict(config),
        "extra": dict(extra or {}),
    }
    for key in (
        "metroem_version",
        "torch_version",
        "scheduler",
        "rng",
        "data_state",
        "config",
        "extra",
    ):
        _check_plain(state[key], key)
    path = Path(path)
    buffer = io.BytesIO()  # in memory first, so a full disk is a one-line error (atomic.py)
    torch.save(state, buffer)
    atomic_write_bytes(str(path), buffer.getvalue())
    return path


def _read_state(path: Path, map_location) -> dict:
    try:
        state = torch.load(path, weights_only=True, map_location=map_location)
    except FileNotFoundError:
        raise MetroemError(
            f"no training state at {path}; start without resuming or pick another checkpoint"
        ) from None
    except Exception as e:
        detail = (str(e).strip().splitlines() or ["no details"])[0]
        raise MetroemError(
            f"training state {path} is unreadable ({type(e).__name__}: {detail}); it may be "
            "truncated or corrupt: resume from another checkpoint"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MetroemError(f"{path} is not a metroem training state; pass a *{STATE_SUFFIX} file")
    if state.get("version") != VERSION:
        raise MetroemError(
            f"{path} has training-state version {state.get('version')}, this metroem reads "
            f"{VERSION}; resume it with the metroem version that wrote it"
        )
    return state


def load_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> ResumeState:
    """Restore what is given (model, optimizer, scheduler, RNG states) from ``path``.

    Returns the step to continue from, the data loader state, the saved config and extras.
    Build the optimizer and scheduler exactly as for the original run before calling this.
    """
    path = Path(path)
    state = _read_state(path, map_location)
    if model is not None:
        modules.load_state_dict(_unwrap(model), state["model"], str(path))
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise MetroemError(
                f"{path}: optimizer state does not fit this optimizer ({e}); build the "
                "optimizer from the saved config"
            ) from e
    if scheduler is not None:
        if state["scheduler"] is None:
            raise MetroemError(f"{path} holds no scheduler state; resume without a scheduler")
        scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng") or {}
    if restore_rng and rng:
        restore_rng_states(rng)
    return ResumeState(
        step=int(state["step"]),
        data_state=state["data_state"],
        config=state["config"],
        extra=state["extra"],
        rng_states=rng,
    )


def save_checkpoint(
    module_path: str | os.PathLike,
    checkpoint_name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    step: int,
    data_state: Any,
    config: Mapping,
    extra: Mapping | None = None,
    make_default: bool = True,
) -> tuple[Path, Path]:
    """Save checkpoint ``checkpoint_name`` of a module: plain weights, then the training state.

    Returns ``(weights_path, training_state_path)``. RNG states are captured here.
    """
    weights = modules.save_weights(
        module_path, checkpoint_name, _unwrap(model).state_dict(), make_default=make_default
    )
    state = save_training_state(
        training_state_path(module_path, checkpoint_name),
        model,
        optimizer,
        scheduler,
        step,
        capture_rng_states(),
        data_state,
        config,
        extra,
    )
    return weights, state


def load_checkpoint(
    module_path: str | os.PathLike,
    checkpoint_name: str,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> ResumeState:
    """:func:`load_training_state` of a module's checkpoint ``checkpoint_name``."""
    return load_training_state(
        training_state_path(module_path, checkpoint_name),
        model,
        optimizer,
        scheduler,
        restore_rng=restore_rng,
        map_location=map_location,
    )


# --- status: finished or not ---------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointStatus:
    """What the training state beside a checkpoint says about the run that wrote it."""

    name: str
    step: int | None = None  # None: no training state (e.g. shipped or exported weights)
    steps: int | None = None  # the run's train.steps
    finished: bool = True  # a checkpoint without a training state counts as finished

    def describe(self) -> str:
        if self.step is None:
            return "no training record"
        if self.step < 0:
            return "UNFINISHED: its training state is unreadable"
        if self.finished:
            return f"finished, {self.step} steps"
        of = f" of {self.steps}" if self.steps else ""
        return f"UNFINISHED: stopped at step {self.step}{of}"


def checkpoint_status(module_path: str | os.PathLike, checkpoint_name: str) -> CheckpointStatus:
    """Whether checkpoint ``checkpoint_name`` of a module comes from a finished training run.

    Reads only the header of the training state (memory-mapped); an unreadable state counts as
    unfinished.
    """
    path = training_state_path(module_path, checkpoint_name)
    if not path.exists():
        return CheckpointStatus(checkpoint_name)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        extra = state.get("extra") or {}
        steps = ((state.get("config") or {}).get("train") or {}).get("steps")
        return CheckpointStatus(checkpoint_name, int(state["step"]),
                                int(steps) if steps is not None else None,
                                bool(extra.get("final", False)))
    except Exception:  # a torn or foreign state: not a finished run
        return CheckpointStatus(checkpoint_name, step=-1, finished=False)
