"""Serial stack alignment: every section onto the already aligned sections before it.

The reference section (the first of the stack) stays where it is. Section ``z`` is aligned onto
the *aligned* section ``z - 1``, starting from section ``z - 1``'s field (drift carries over,
so each pair only has a residual to find), and the field that comes back is the whole field of
section ``z``: raw section ``z`` warped by it lands on the aligned stack. Each section is
rendered once, from its raw pixels; aligned images are never resampled again.

With ``predecessors = k > 1`` section ``z`` is aligned onto each of the ``k`` nearest aligned
sections that hold data, every alignment starting from the nearest one's field (the drift
carries over), and the fields are combined by their per-pixel, per-component median: one bad
pair (a defect, a poor section) is outvoted instead of derailing every section after it. A
section whose whole field is far off (a wrong section, a lost pair) pushes every vote off
through that start; keeping it out of the targets is :class:`MisalignmentGuard`'s job.
Sections without data are skipped: their field is the previous one, their image stays empty,
and later sections align to the last section with data. Sections with defects (a
mask) are aligned, but later sections are aligned onto the undamaged sections before them
while there are enough, starting from the nearest one's field.

Every aligned section is checked against its nearest target (:class:`MisalignmentGuard`): a
section whose correlation with it falls below half the stack's recent level is *misaligned*
(a wrong or ruined section, a pair the aligner lost) and, like a damaged one, is not a target
for the sections after it, so one bad section cannot drag the rest of the stack along; several
misaligned sections in a row are a runaway, and the run stops with
:class:`RunawayMisalignment` instead of writing the rest of the stack out of alignment.

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
from metroem.errors import MetroemError

Tensor = torch.Tensor
PairFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(src, tgt, init) -> field``: images ``(1, 1, H, W)`` float, ``init`` and the result
``(1, 2, H, W)`` pull fields in pixels; the result includes ``init`` (it is the whole field)."""

__all__ = [
    "PairFn",
    "aligner_pair_fn",
    "align_stack",
    "as_stored",
    "combine_fields",
    "has_data",
    "image_pair_fn",
    "MisalignmentGuard",
    "RunawayMisalignment",
    "pearson",
    "similarity_sums",
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


MISALIGNED_RATIO = 0.5  # below this fraction of the stack's recent correlation: misaligned
RUNAWAY_STOP = 3  # this many misaligned sections in a row stop the run
GUARD_HISTORY = 8  # how many recent well-aligned sections set the stack's level
GUARD_MIN_HISTORY = 2  # no verdict before this many well-aligned sections
# The guard judges a section warped by its field averaged over blocks of this many pixels (one
# translation per block): a smooth, real distortion survives that, but a field that bends a
# wrong section's tissue into its target's shapes (morphing) does not.
GUARD_BLOCK = 32


def block_mean_field(field: Tensor, block: int = GUARD_BLOCK) -> Tensor:
    """``field`` ``(N, 2, H, W)`` replaced by its mean over ``block`` x ``block`` cells counted
    from its origin (the cells at the bottom and right edges may be smaller). A chunk whose
    origin is a multiple of ``block`` gets the same cells as the whole field."""
    h, w = field.shape[-2:]
    cells = torch.nn.functional.avg_pool2d(field, block, ceil_mode=True)
    return cells.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :h, :w]


class RunawayMisalignment(MetroemError):
    """Several sections in a row came out misaligned: the run stops (the stack before them is
    complete)."""


def similarity_sums(aligned: Tensor | np.ndarray, target: Tensor | np.ndarray) -> np.ndarray:
    """``[n, sum a, sum b, sum a², sum b², sum ab]`` over pixels where both images have data
    (nonzero), in float64: chunks add up to the section's sums (:func:`pearson`)."""
    a = torch.as_tensor(np.asarray(aligned, dtype=np.float64) if not torch.is_tensor(aligned)
                        else aligned).double().reshape(-1)
    b = torch.as_tensor(np.asarray(target, dtype=np.float64) if not torch.is_tensor(target)
                        else target).double().reshape(-1)
    both = (a != 0) & (b != 0)
    a, b = a[both], b[both]
    return np.array([float(a.numel()), float(a.sum()), float(b.sum()), float((a * a).sum()),
                     float((b * b).sum()), float((a * b).sum())])


def pearson(sums: np.ndarray) -> float | None:
    """Pearson correlation from :func:`similarity_sums`; ``None`` with under 16 pixels or a
    flat image (no verdict possible)."""
    n, sa, sb, saa, sbb, sab = (float(v) for v in sums)
    if n < 16:
        return None
    va, vb = saa - sa * sa / n, sbb - sb * sb / n
    if va <= 1e-9 * max(1.0, saa) or vb <= 1e-9 * max(1.0, sbb):
        return None
    return (sab - sa * sb / n) / float(np.sqrt(va * vb))


class MisalignmentGuard:
    """Judges each aligned section by its correlation ``r`` with its nearest target (the section
    warped by :func:`block_mean_field` of its field, so that morphing cannot fake a match).

    A section is *misaligned* when ``r`` is below ``ratio`` times the median ``r`` of the last
    :data:`GUARD_HISTORY` well-aligned sections (no verdict before
    :data:`GUARD_MIN_HISTORY` of them). ``stop`` misaligned sections in a row raise
    :class:`RunawayMisalignment` (``stop = 0``: never). ``ratio = 0`` turns it off. The verdicts
    depend only on the sections' ``r`` in order, so a resumed run replays them exactly.
    """

    def __init__(self, ratio: float = MISALIGNED_RATIO, stop: int = RUNAWAY_STOP):
        if not 0 <= ratio < 1:
            raise MetroemError(f"--misaligned_ratio must be in [0, 1), got {ratio}")
        if stop < 0:
            raise MetroemError(f"--runaway_stop must be >= 0, got {stop}")
        self.ratio, self.stop = float(ratio), int(stop)
        self.good: list[float] = []
        self.flagged: set[int] = set()
        self.run: list[int] = []  # the current streak of misaligned sections
        self.records: list[dict] = []

    def level(self) -> float | None:
        """The stack's recent correlation (median of the last well-aligned sections)."""
        if len(self.good) < GUARD_MIN_HISTORY:
            return None
        return float(np.median(self.good[-GUARD_HISTORY:]))

    def judge(self, z: int, r: float | None, target: int | None = None) -> bool:
        """Record section ``z``'s correlation ``r`` with its target; ``True`` if misaligned.
        Raises :class:`RunawayMisalignment` when the streak reaches ``stop``."""
        level = self.level()
        bad = (self.ratio > 0 and r is not None and level is not None
               and r < self.ratio * level)
        self.records.append({"z": z, "target": target, "r": r, "level": level,
                             "misaligned": bad})
        if r is None:
            return False
        if not bad:
            self.good.append(r)
            self.run = []
            return False
        self.flagged.add(z)
        self.run.append(z)
        log.warning("z %d: correlation %.3f with z %s is below %.2f x the stack's %.3f: "
                    "misaligned, not a target for later sections", z, r, target, self.ratio,
                    level)
        if self.stop and len(self.run) >= self.stop:
            zs = ", ".join(map(str, self.run))
            raise RunawayMisalignment(
                f"runaway misalignment: z {zs} all correlate under {self.ratio:g} x the "
                f"stack's {level:.3f} with their targets; stopped, the stack before z "
                f"{self.run[0]} is complete. Look at those sections (a defect mask: "
                "--mask_path), or go on with --resume --runaway_stop 0")
        return True

    def is_flagged(self, z: int) -> bool:
        return z in self.flagged


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
    return as_stored(fields.warp_image(src.float(), field), dtype)


def as_stored(img: Tensor, dtype: np.dtype | str | None) -> Tensor:
    """``img`` rounded and clipped as an image layer of ``dtype`` stores it (unchanged for a
    float type or ``None``)."""
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(np.dtype(dtype))
        img = img.round().clamp(info.min, info.max)
    return img


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
    guard: MisalignmentGuard | None = None,
    detrend_sections: float | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Align ``sections`` (each ``(1, 1, H, W)``, raw values, 0 = no data) serially; the first
    is the reference. Returns ``(aligned, fields)``: aligned images ``(1, 1, H, W)`` (rounded to
    ``dtype`` when it is an integer type, as an image layer stores them, so later sections see
    the same targets as in :mod:`metroem.inference`) and whole fields ``(1, 2, H, W)``.

    ``masks`` (one defect mask or ``None`` per section, nonzero = defect) make those pixels no
    data, in the alignment and in the aligned image; with ``split_defects`` a section its
    defects cut apart is aligned piece by piece (:func:`metroem.defects.align_with_defects`).

    ``guard`` (default a :class:`MisalignmentGuard` with its defaults; pass one to read its
    ``records`` or ``MisalignmentGuard(0)`` for none) judges each aligned section against its
    nearest target; misaligned sections are not targets for later ones.

    ``detrend_sections`` (sigma in sections; ``None``: off) removes the trend of the stack's
    placement along z afterwards (:mod:`metroem.detrend`; sections without data and
    misaligned ones are left out of the fit) and renders every section again from its raw
    pixels: for sections that were placed independently, never for block-face stacks."""
    from metroem import detrend

    detrend_sections = detrend.check_sigma(detrend_sections)
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
    guard = MisalignmentGuard() if guard is None else guard
    aligned = [sections[0].float()]
    out_fields = [torch.zeros(1, 2, h, w)]
    bar = SectionProgress(len(sections) - 1, enabled=progress)
    for z in range(1, len(sections)):
        avoid = [(damaged is not None and damaged[j]) or guard.is_flagged(j) for j in range(z)]
        targets = predecessor_indices(z, has, predecessors, avoid)
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
        if has[z] and targets:
            judged = render(sections[z], block_mean_field(field), dtype)
            guard.judge(z, pearson(similarity_sums(judged, aligned[targets[0]])), targets[0])
        bar.step(z)
    if detrend_sections is not None:
        skip = [z for z in range(len(sections)) if not has[z] or guard.is_flagged(z)]
        out_fields = detrend.detrend_fields(out_fields, aligned, detrend_sections, skip)
        aligned = [render(s, f, dtype) for s, f in zip(sections, out_fields, strict=True)]
    return aligned, out_fields
