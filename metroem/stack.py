"""Serial stack alignment: every section onto the already aligned sections before it.

The reference section (the first of the stack) stays where it is. Section ``z`` is aligned onto
the *aligned* section ``z - 1``, starting from section ``z - 1``'s field (drift carries over,
so each pair only has a residual to find), and the field that comes back is the whole field of
section ``z``: raw section ``z`` warped by it lands on the aligned stack. Each section is
rendered once, from its raw pixels; aligned images are never resampled again.

With ``predecessors = k > 1`` section ``z`` is aligned onto each of the ``k`` nearest aligned
sections that hold data, and the fields are combined by their per-pixel, per-component median:
one bad pair (a defect, a poor section) is outvoted instead of derailing every section after
it. Sections without data are skipped: their field is the previous one, their image stays
empty, and later sections align to the last section with data. Sections with defects (a
mask) are aligned, but later sections are aligned onto the undamaged sections before them
while there are enough, starting from the nearest one's field.

This module is the definition; :func:`align_stack` runs it on whole sections in memory, and
:mod:`metroem.inference` runs the same steps chunk by chunk over CloudVolume layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from metroem import fields

Tensor = torch.Tensor
PairFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(src, tgt, init) -> field``: images ``(1, 1, H, W)`` float, ``init`` and the result
``(1, 2, H, W)`` pull fields in pixels; the result includes ``init`` (it is the whole field)."""

__all__ = [
    "PairFn",
    "aligner_pair_fn",
    "align_stack",
    "combine_fields",
    "has_data",
    "image_pair_fn",
    "predecessor_indices",
    "render",
    "SectionProgress",
]

log = logging.getLogger(__name__)


def has_data(img: Tensor | np.ndarray) -> bool:
    """Whether a section holds any data (0 = no data)."""
    return bool((torch.as_tensor(np.asarray(img)) != 0).any())


def predecessor_indices(z: int, has: Sequence[bool], k: int,
                        damaged: Sequence[bool] | None = None) -> list[int]:
    """The ``k`` nearest indices before ``z`` whose sections hold data, nearest first.

    Sections marked ``damaged`` (a defect mask) come last: a later section is aligned onto the
    undamaged sections before it, so a fold's local error is not copied into every section
    after it; damaged ones are used only when there are not ``k`` others."""
    good, bad = [], []
    for j in range(z - 1, -1, -1):
        if has[j]:
            (bad if damaged is not None and damaged[j] else good).append(j)
            if len(good) == k:
                break
    return (good + bad)[:k]


def combine_fields(candidates: Sequence[Tensor]) -> Tensor:
    """Per-pixel, per-component median of candidate fields ``(1, 2, H, W)`` (the mean of the
    two middle values for an even count, so two candidates average)."""
    if len(candidates) == 1:
        return candidates[0]
    s = torch.stack(list(candidates), 0).sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def render(src: Tensor, field: Tensor, dtype: np.dtype | None = None) -> Tensor:
    """Raw section ``src`` ``(1, 1, H, W)`` warped by its whole field, rounded and clipped to
    ``dtype`` when that is an integer type (what an image layer stores)."""
    out = fields.warp_image(src.float(), field)
    if dtype is not None and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = out.round().clamp(info.min, info.max)
    return out


def aligner_pair_fn(aligner) -> PairFn:
    """A :class:`~metroem.aligner.PyramidAligner` as a :data:`PairFn` (``init`` goes in as
    ``src_agg_field``: the pyramid finds the residual on the source warped by it)."""

    def run(src: Tensor, tgt: Tensor, init: Tensor) -> Tensor:
        with torch.no_grad():
            return aligner(src, tgt, src_agg_field=init).float().cpu()

    return run


def image_pair_fn(method: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> PairFn:
    """A ``(src, tgt) -> field`` method on arrays (an optical-flow baseline) as a
    :data:`PairFn`: it aligns the source warped by ``init``, and the fields are composed."""

    def run(src: Tensor, tgt: Tensor, init: Tensor) -> Tensor:
        moved = fields.warp_image(src.float(), init)[0, 0].numpy()
        residual = np.asarray(method(np.ascontiguousarray(moved), tgt[0, 0].float().numpy()),
                              np.float32)
        return fields.compose(init, torch.from_numpy(residual)[None])

    return run


class SectionProgress:
    """One log line per section: ``section k/N (z Z) ... elapsed, ETA``."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True,
                 emit: Callable[[str], None] | None = None):
        self.total, self.done, self.enabled = total, done, enabled
        self.start_done, self.t0 = done, time.monotonic()
        self.emit = emit or log.info

    def step(self, z: int, note: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.monotonic() - self.t0
        ran = self.done - self.start_done
        eta = el / ran * (self.total - self.done) if ran else 0.0
        self.emit(f"section {self.done}/{self.total} (z {z}) done{note}; "
                  f"{_clock(el)} elapsed, ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def _pair(pair_fn: PairFn, src: Tensor, tgt: Tensor, init: Tensor, mask: Tensor | None,
          split: bool) -> Tensor:
    """One pair of a stack; with a defect mask, through :mod:`metroem.defects`."""
    if mask is None:
        return pair_fn(src, tgt, init)
    from metroem import defects

    return defects.align_with_defects(lambda s, t: pair_fn(s, t, init), src, tgt,
                                      src_mask=mask, split=split)


def align_stack(
    sections: Sequence[Tensor],
    pair_fn: PairFn,
    predecessors: int = 1,
    dtype: np.dtype | None = None,
    progress: bool = False,
    masks: Sequence[Tensor | None] | None = None,
    split_defects: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """Align ``sections`` (each ``(1, 1, H, W)``, raw values, 0 = no data) serially; the first
    is the reference. Returns ``(aligned, fields)``: aligned images ``(1, 1, H, W)`` (rounded to
    ``dtype`` when it is an integer type, as an image layer stores them, so later sections see
    the same targets as in :mod:`metroem.inference`) and whole fields ``(1, 2, H, W)``.

    ``masks`` (one defect mask or ``None`` per section, nonzero = defect) make those pixels no
    data, in the alignment and in the aligned image; with ``split_defects`` a section its
    defects cut apart is aligned piece by piece (:func:`metroem.defects.align_with_defects`)."""
    if predecessors < 1:
        raise ValueError(f"predecessors must be >= 1, got {predecessors}")
    if not sections:
        return [], []
    if masks is not None:
        from metroem import defects

        if len(masks) != len(sections):
            raise ValueError(f"{len(masks)} masks for {len(sections)} sections")
        sections = [defects.apply_mask(s.float(), m) for s, m in zip(sections, masks,
                                                                     strict=True)]
    h, w = sections[0].shape[-2:]
    has = [has_data(s) for s in sections]
    damaged = None if masks is None else [m is not None and bool((m > 0).any()) for m in masks]
    aligned = [sections[0].float()]
    out_fields = [torch.zeros(1, 2, h, w)]
    bar = SectionProgress(len(sections) - 1, enabled=progress)
    for z in range(1, len(sections)):
        targets = predecessor_indices(z, has, predecessors, damaged)
        init = out_fields[targets[0] if targets else z - 1]  # the nearest target's field
        if not has[z] or not targets:
            field = out_fields[z - 1].clone()
        else:
            src = sections[z].float()
            mask = None if masks is None else masks[z]
            field = combine_fields([_pair(pair_fn, src, aligned[j], init, mask, split_defects)
                                    for j in targets])
        out_fields.append(field)
        aligned.append(render(sections[z], field, dtype))
        bar.step(z)
    return aligned, out_fields
