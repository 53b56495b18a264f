"""Run logging: tensorboard scalars and picture panels, a terminal progress bar, a log file.

Only the main process writes; other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import numpy as np
import torch

from metroem import fields, viz

log = logging.getLogger(__name__)


class _Tee:
    """Write to the terminal and a log file (``--no_redirect_stdout`` turns this off)."""

    def __init__(self, stream, path: str):
        self.stream = stream
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (closed by RunLogger.close)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RunLogger:
    """Tensorboard writer + tqdm bar + optional stdout/stderr tee into ``<log_dir>/train.log``."""

    def __init__(self, log_dir: str, enabled: bool = True, redirect_stdout: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        self.writer = None
        self._tees: list[_Tee] = []
        self._bar = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if redirect_stdout:
            path = os.path.join(log_dir, "train.log")
            self._orig = (sys.stdout, sys.stderr)
            sys.stdout = _Tee(sys.stdout, path)
            sys.stderr = _Tee(sys.stderr, path)
            self._tees = [sys.stdout, sys.stderr]

    def _tb(self, subdir: str):
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None or self._tb_dir != subdir:
            if self.writer is not None:
                self.writer.close()
            self._tb_dir = subdir
            self.writer = SummaryWriter(os.path.join(self.log_dir, subdir))
        return self.writer

    def start_stage(self, name: str, total_steps: int, start_step: int) -> None:
        """Open the stage's tensorboard run and a progress bar from ``start_step``."""
        if not self.enabled:
            return
        from tqdm import tqdm

        self._tb(name)
        self._t0 = time.time()
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc=name, dynamic_ncols=True,
            file=self._tees[1].stream if self._tees else sys.stderr, mininterval=1.0,
        )

    def step(self, n: int = 1) -> None:
        """Advance the progress bar by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def postfix(self, **values: float) -> None:
        """Show ``values`` (e.g. the latest loss) beside the progress bar."""
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled or self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def panel(self, step: int, tag: str, src, tgt, field, warped=None) -> None:
        """Source | target | warped source | |difference| | field colours | deformed grid."""
        if not self.enabled or self.writer is None:
            return
        src, tgt, field = src.detach().cpu(), tgt.detach().cpu(), field.detach().cpu().float()
        if warped is None:
            warped = fields.warp_image(src[None, None].float(), field[None])[0, 0]
        rgb = viz.side_by_side(
            viz.gray(src), viz.gray(tgt), viz.gray(warped), viz.difference(warped, tgt),
            viz.field_rgb(field), viz.field_grid(field, spacing=max(8, src.shape[-1] // 24)),
        )
        self.writer.add_image(tag, torch.from_numpy(np.ascontiguousarray(rgb)), step,
                              dataformats="HWC")

    def message(self, text: str) -> None:
        """Log ``text`` (INFO; main process only). The command's log lines go to stderr, so
        into ``train.log`` too, and are written between the progress bar's updates."""
        if self.enabled:
            log.info(text)

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.end_stage()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._tees:
            sys.stdout, sys.stderr = self._orig
            for t in self._tees:
                t.file.close()
            self._tees = []
