"""Stacks with a known answer: a registered block, deformed section by section.

Take ``sections`` slices ``gap`` apart from a registered FIB-SEM block (40 nm apart for
``gap = 4`` on the 10 nm blocks) and deform every slice but the first by its own known field:
a drift that is a random walk (each section moves up to ``drift_step`` px per axis from the one
before), plus a small rotation, scale, shear and elastic part drawn afresh for each section.
The first section is the fixed reference. With ``placement="independent"`` the offset is
drawn afresh for each section instead (up to ``offset`` px per axis about the reference's
frame): sections picked up and imaged one by one (ssTEM, ATUM), whose raw stack has no drift
of its own, unlike a random walk (block-face stage drift). A serial aligner must return the
original block: the whole field of section ``i`` must equal ``invert(d_i)``.

Two kinds:

* ``neighbours``: consecutive slices of the block (the tissue changes between sections, as in
  a real stack: the aligner must remove the deformation and leave that change alone);
* ``same``: one slice repeated, each copy deformed and with noise (no change of content: what
  is left is the error a method accumulates by itself).

``fold_at=i`` folds section ``i`` before deforming it (:func:`metroem.synth.fold_section`,
:data:`metroem.eval.folds.FOLD`): its truth jumps across the fold, its defect mask comes with
the stack (``masks``), and the tissue lost into the fold is not scored (``lost``). Whether the
sections after it stay aligned is what a damaged section must not spoil.

:func:`stack_errors` scores the whole fields of a method against the truth.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from metroem import fields, synth
from metroem.errors import MetroemError
from metroem.eval import metrics
from metroem.eval.neighbours import NOISE_STD

Tensor = torch.Tensor

__all__ = [
    "BLOCK_PX",
    "DRIFT_STEP",
    "INDEPENDENT_OFFSET",
    "KnownStack",
    "SECTION_DEFORMATION",
    "content_drift",
    "make_stack",
    "raw_errors",
    "stack_errors",
]

WRONG_OFFSET = 120  # slices between a wrong section and the one it replaces (unrelated tissue)
DRIFT_STEP = 5.0  # px per axis per section: the random walk of the drift
INDEPENDENT_OFFSET = 15.0  # px per axis: each section's own offset, independent placement
PLACEMENTS = ("walk", "independent")
# Each section's own misalignment on top of the drift (pixels of the 10 nm slices).
SECTION_DEFORMATION = synth.DeformationSpec(
    rotation_deg=1.0, scale=0.01, shear=0.01, elastic=1.5, elastic_scale=96
)
BLOCK_PX = 64  # side of the blocks whose median error is bounded (the worst-block measure)
MARGIN = 8  # px along the border not scored (the inverse of a field is poor there)


@dataclass
class KnownStack:
    """Sections ``(1, 1, H, W)`` float32 (0 = no data), the true whole fields ``(1, 2, H, W)``
    (``truth[0]`` is zero: the reference) and the original slices."""

    kind: str
    block: str
    slices: list[int]
    sections: list[Tensor]
    truth: list[Tensor]
    originals: list[Tensor]
    masks: list[Tensor | None] = field(default_factory=list)  # defect masks (fold_at)
    lost: list[Tensor | None] = field(default_factory=list)  # target pixels without an answer
    fold_at: int | None = None
    wrong_at: int | None = None  # a wrong section (another part of the block): no answer
    placement: str = "walk"  # "walk" (drift random walk) or "independent" offsets

    @property
    def damaged_at(self) -> int | None:
        """The folded or wrong section, whose damage must not spread to later sections."""
        return self.fold_at if self.fold_at is not None else self.wrong_at

    @property
    def name(self) -> str:
        where = "" if self.placement == "walk" else f"_{self.placement}"
        return f"{self.kind}{where}_{self.block}_z{self.slices[0]}-{self.slices[-1]}"


def make_stack(
    block: Tensor,
    name: str,
    start: int,
    sections: int = 15,
    gap: int = 4,
    kind: str = "neighbours",
    seed: int = 0,
    drift_step: float = DRIFT_STEP,
    deformation: synth.DeformationSpec = SECTION_DEFORMATION,
    fold_at: int | None = None,
    wrong_at: int | None = None,
    placement: str = "walk",
    offset: float = INDEPENDENT_OFFSET,
) -> KnownStack:
    """A known-answer stack from ``block`` ``(Z, H, W)`` starting at slice ``start``; section
    ``fold_at`` (not the reference) folded; section ``wrong_at`` replaced by a slice
    :data:`WRONG_OFFSET` slices away (unrelated tissue: a misplaced or ruined section, which no
    field aligns and which is not scored)."""
    for at, what in ((fold_at, "fold_at"), (wrong_at, "wrong_at")):
        if at is not None and not 0 < at < sections:
            raise MetroemError(f"{what} must be a section after the reference "
                               f"(1..{sections - 1})")
    if placement not in PLACEMENTS:
        raise MetroemError(f"unknown placement {placement!r}; choose {' or '.join(PLACEMENTS)}")
    if kind not in ("neighbours", "same"):
        raise MetroemError(f"unknown stack kind {kind!r}; choose neighbours or same")
    slices = [start + i * gap for i in range(sections)] if kind == "neighbours" else \
        [start] * sections
    if sections < 2 or start < 0 or slices[-1] >= block.shape[0]:
        raise MetroemError(
            f"{sections} sections {gap} apart from slice {start} do not fit in a block of "
            f"{block.shape[0]} slices"
        )
    h, w = block.shape[-2:]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}{kind}".encode())
                                        % 99_991 + start)
    unit = torch.rand(sections, 2, generator=gen) * 2 - 1
    unit[0] = 0
    drift = (unit * drift_step).cumsum(0) if placement == "walk" else unit * offset
    out = KnownStack(kind, name, slices, [], [], [], fold_at=fold_at, wrong_at=wrong_at,
                     placement=placement)
    for i, z in enumerate(slices):
        if i == wrong_at:
            z = (z + WRONG_OFFSET) % block.shape[0] if z < WRONG_OFFSET else z - WRONG_OFFSET
        orig = block[z][None, None].float()
        mask = lost = None
        if i == 0:
            src, gt = orig.clone(), torch.zeros(1, 2, h, w)
        else:
            d = synth.random_field(1, h, w, deformation, generator=gen)
            d = d + drift[i].view(1, 2, 1, 1)
            if i == fold_at:
                from metroem.eval.folds import FOLD

                fo = synth.fold_section(orig, FOLD, gen)
                src = fields.warp_image(fo["folded"], d)
                gt = fields.compose(fields.invert(d), fo["field"])
                mask = (fields.warp_image(fo["defect"], d) > 0).float()
                lost = fo["lost"]
            else:
                src, gt = synth.deformed_pair(orig, d)
            if kind == "same":
                noise = torch.randn(src.shape, generator=gen) * NOISE_STD
                src = torch.where(src != 0, (src + noise).clamp(1, 255), torch.zeros_like(src))
        out.sections.append(src)
        out.truth.append(gt)
        out.originals.append(orig)
        out.masks.append(mask)
        out.lost.append(lost)
    return out


def _block_medians(err: Tensor, mask: Tensor, size: int) -> Tensor:
    """Median error of every ``size`` block with at least half its pixels scored."""
    h, w = err.shape
    meds = []
    for y in range(0, h - size // 2, size):
        for x in range(0, w - size // 2, size):
            m = mask[y : y + size, x : x + size]
            if m.float().mean() >= 0.5:
                meds.append(err[y : y + size, x : x + size][m].median())
    return torch.stack(meds) if meds else torch.zeros(0)


def stack_errors(stack: KnownStack, whole_fields: list[Tensor]) -> dict:
    """End-point error of each section's whole field against the truth (reference excluded).

    Scored where the true sample point lies inside the raw section's data, away from the border
    (:data:`MARGIN`). Returns the median over all scored pixels, each section's median (the
    worst is the ``worst_section``), the worst :data:`BLOCK_PX` block median, and the slope of
    the per-section median along z (px per section: growing error is drift)."""
    if len(whole_fields) != len(stack.truth):
        raise ValueError(f"{len(whole_fields)} fields for a stack of {len(stack.truth)}")
    h, w = stack.truth[0].shape[-2:]
    interior = metrics.interior_mask((h, w), MARGIN)
    per_section, scored, blocks, values = [], [], [], []
    for i in range(1, len(stack.truth)):
        gt, f = stack.truth[i], whole_fields[i].float()
        mask = interior & metrics.valid_after_warp(stack.sections[i], gt, margin=2)
        mask &= stack.originals[i][0, 0] != 0
        if stack.lost and stack.lost[i] is not None:  # a fold: no answer in the lost strip
            mask &= stack.lost[i][0, 0] == 0
            mask &= fields.warp_image(stack.masks[i], gt)[0, 0] == 0
        if i == stack.wrong_at:  # a wrong section has no right field
            mask &= False
        err = metrics.epe_map(f, gt)
        vals = err[mask]
        if not vals.numel():
            values.append(vals)
            continue
        values.append(vals)
        per_section.append(float(vals.median()))
        scored.append(i)
        blocks.append(_block_medians(err, mask, BLOCK_PX))
    allv = torch.cat(values)
    bl = torch.cat(blocks)
    zs = torch.tensor(scored, dtype=torch.float64)
    ps = torch.tensor(per_section, dtype=torch.float64)
    slope = float(((zs - zs.mean()) * (ps - ps.mean())).sum() / (zs - zs.mean()).pow(2).sum())
    return {
        "median": float(allv.median()),
        "p95": float(allv.quantile(0.95)) if allv.numel() < 2**24 else float("nan"),
        "worst_section": max(per_section),
        "worst_block": float(bl.max()) if bl.numel() else float("nan"),
        "slope": slope,
        "per_section": per_section,
        # after a folded or wrong section: does the damage spread to the sections after it?
        "after": float(torch.cat(values[stack.damaged_at:]).median())
        if stack.damaged_at is not None and stack.damaged_at < len(values) else float("nan"),
    }


def raw_errors(stack: KnownStack) -> dict:
    """The same measure for the unaligned stack (zero fields): where a method starts."""
    return stack_errors(stack, [torch.zeros_like(t) for t in stack.truth])


def content_drift(stack: KnownStack) -> list[tuple[float, float]]:
    """The apparent shift of the undeformed slices, section to section (phase correlation):
    what an image-only method sees as drift although the true field is zero."""
    from metroem import translation

    out = []
    for a, b in zip(stack.originals, stack.originals[1:], strict=False):
        s = translation.phase_translation(b, a)
        out.append((float(s[0, 0]), float(s[0, 1])))
    return out

