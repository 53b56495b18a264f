"""Training hooks: the callbacks the training loop calls, and fault injection built on them.

:func:`metroem.training.engine.train_stage` takes a :class:`TrainingHooks` and calls it at the
start of every step (:meth:`~TrainingHooks.on_step`), on every step's loss
(:meth:`~TrainingHooks.on_loss`) and around every checkpoint write
(:meth:`~TrainingHooks.checkpoint_write`). The default hooks do nothing; the loop never reads the
environment.

:class:`FaultHooks` injects the faults of ``METROEM_FAULT`` (see docs/training.md) for tests and
drills, e.g. ``sigterm@step=5``, ``nan@step=3,rank=1``, ``nan@step=2+``,
``kill9@save=2,file=weights``. The command line (:mod:`metroem.training.cli`) builds it with
:meth:`FaultHooks.from_env` and passes it in.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from metroem import modules
from metroem.errors import MetroemError
from metroem.training import checkpoint as ckpt

FAULT_ENV = "METROEM_FAULT"


class TrainingHooks:
    """The callbacks of the training loop; each does nothing here. Steps are 1-based."""

    def on_step(self, stage: int, step: int, rank: int) -> None:
        """Called at the start of step ``step``, before its batch is taken."""

    def on_loss(self, stage: int, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """Called with step ``step``'s total loss; returns the loss to back-propagate."""
        return loss

    @contextlib.contextmanager
    def checkpoint_write(self, stage: int) -> Iterator[None]:
        """Held around one checkpoint write (weights, then training state)."""
        yield


# --- fault injection ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One ``ACTION@KEY=VALUE,...`` entry of ``METROEM_FAULT``."""

    action: str  # sigterm | kill9 | nan
    steps: tuple[int, float] | None = None  # inclusive range of 1-based step numbers
    stage: int | None = None
    rank: int | None = None
    save: int | None = None  # kill9: the N-th checkpoint write of this process
    file: str = "state"  # kill9@save: die before renaming the "state" or "weights" temp file

    def matches(self, stage: int, step: int | None, rank: int) -> bool:
        if self.stage is not None and self.stage != stage:
            return False
        if self.rank is not None and self.rank != rank:
            return False
        return step is not None and self.steps is not None and (
            self.steps[0] <= step <= self.steps[1]
        )


def parse_faults(text: str | None) -> list[Fault]:
    """Parse ``METROEM_FAULT``: entries separated by ``;``, e.g. ``nan@step=3-5,rank=1``."""
    out = []
    for entry in (text or "").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        bad = MetroemError(
            f"{FAULT_ENV} entry {entry!r} is not ACTION@KEY=VALUE[,KEY=VALUE] with ACTION "
            "sigterm|kill9|nan and keys step (N, N-M, N+), stage, rank, save, file"
        )
        action, _, rest = entry.partition("@")
        if action not in ("sigterm", "kill9", "nan") or not rest:
            raise bad
        kw: dict = {"action": action}
        for part in rest.split(","):
            key, _, value = part.strip().partition("=")
            try:
                if key == "step":
                    lo, dash, hi = value.partition("-")
                    if value.endswith("+"):
                        kw["steps"] = (int(value[:-1]), math.inf)
                    else:
                        kw["steps"] = (int(lo), int(hi) if dash else int(lo))
                elif key in ("stage", "rank", "save"):
                    kw[key] = int(value)
                elif key == "file" and value in ("state", "weights"):
                    kw["file"] = value
                else:
                    raise ValueError(key)
            except ValueError:
                raise bad from None
        has_step, has_save = "steps" in kw, "save" in kw
        if has_step == has_save or (has_save and action != "kill9"):
            raise bad  # exactly one trigger: step=... (any action) or save=N (kill9)
        out.append(Fault(**kw))
    return out


class FaultHooks(TrainingHooks):
    """Hooks that inject the faults of a ``METROEM_FAULT`` value (none when it is empty)."""

    def __init__(self, text: str | None = None):
        self.faults = parse_faults(text)
        self.saves = 0  # checkpoint writes by this process so far

    @classmethod
    def from_env(cls) -> FaultHooks:
        return cls(os.environ.get(FAULT_ENV))

    def on_step(self, stage: int, step: int, rank: int) -> None:
        """Signal this process at the start of step ``step`` if a fault says so."""
        for f in self.faults:
            if f.action in ("sigterm", "kill9") and f.save is None and f.matches(stage, step, rank):
                os.kill(os.getpid(), signal.SIGTERM if f.action == "sigterm" else signal.SIGKILL)

    def on_loss(self, stage: int, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """Make step ``step``'s loss NaN on this rank if a ``nan`` fault says so."""
        if any(f.action == "nan" and f.matches(stage, step, rank) for f in self.faults):
            return loss * float("nan")
        return loss

    @contextlib.contextmanager
    def checkpoint_write(self, stage: int) -> Iterator[None]:
        """``kill9@save=N`` dies once the N-th write's temp file is written, just before it
        would be renamed onto its final name (``file=state|weights``)."""
        self.saves += 1
        armed = [
            f for f in self.faults
            if f.action == "kill9" and f.save == self.saves and f.stage in (None, stage)
        ]
        if not armed:
            yield
            return
        suffix = ckpt.STATE_SUFFIX if armed[0].file == "state" else modules.WEIGHTS_SUFFIX
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if str(dst).endswith(suffix):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
        try:
            yield
        finally:
            os.replace = real_replace
