"""Fold pairs with a known answer: a section folded along a curve, against its unfolded self or
its neighbour.

A fold (:func:`metroem.synth.fold_section`) loses a strip of tissue and pulls both sides toward
it, so the true field jumps across the fold. The source is the folded section, moved by a
moderate smooth deformation ``d`` (:data:`DEFORMATION`); the target is the unfolded section
(``gap`` 0, with noise on the source) or the section ``gap`` slices before it in a registered
FIB-SEM block. The truth at a target pixel ``p`` goes through the fold first, then through
``invert(d)``; target pixels whose tissue went into the fold have no answer (``lost``). The
source's defect mask (the dark folded-over line) comes with the pair, as a user would give it.

:func:`fold_errors` scores a field by distance from the fold: near it a smooth field is off by
up to half the jump; far from it the pair is an ordinary one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metroem import fields, synth

Tensor = torch.Tensor

__all__ = ["DEFORMATION", "FOLD", "NEAR_PX", "FoldPair", "fold_errors", "fold_pair", "make_pairs"]

DEFORMATION = synth.DeformationSpec(
    translation=8, rotation_deg=1, scale=0.01, shear=0.01, elastic=1.5, elastic_scale=96
)
FOLD = synth.FoldSpec(width=16.0, line=3.0, radius=1200.0, spread=0.15)
NEAR_PX = 16  # "near the fold": within this many target pixels of the lost strip
NOISE_STD = 8.0  # grey levels of noise on same-section (gap 0) sources
BORDER = 16  # px dropped along the image border


@dataclass
class FoldPair:
    """One pair; images ``(1, 1, H, W)`` raw (0 = no data), ``gt`` ``(1, 2, H, W)``, masks
    ``(1, 1, H, W)`` float (1 = yes)."""

    name: str
    gap: int
    src: Tensor
    tgt: Tensor
    gt: Tensor
    src_defect: Tensor  # the fold line in the source
    lost: Tensor  # target pixels without an answer (their tissue is in the fold)


def _seed(name: str, seed: int) -> int:
    return seed * 1_000_003 + zlib.crc32(name.encode()) % 999_983


def fold_pair(name: str, tgt: Tensor, section: Tensor, gap: int, seed: int = 0,
              fold: synth.FoldSpec = FOLD,
              deformation: synth.DeformationSpec = DEFORMATION) -> FoldPair:
    """Fold ``section`` (``(H, W)``, registered with ``tgt``) and deform it into the source;
    draws come from a seed keyed by ``name``."""
    g = torch.Generator().manual_seed(_seed(name, seed))
    h, w = tgt.shape[-2:]
    fo = synth.fold_section(section.reshape(1, 1, h, w).float(), fold, g)
    d = synth.random_field(1, h, w, deformation, generator=g)
    src = fields.warp_image(fo["folded"], d)
    if gap == 0:
        noise = torch.randn(src.shape, generator=g) * NOISE_STD
        src = torch.where(src != 0, (src + noise).clamp(1, 255), src)
    gt = fields.compose(fields.invert(d), fo["field"])
    defect = (fields.warp_image(fo["defect"], d) > 0).float()
    return FoldPair(name, gap, src, tgt.reshape(1, 1, h, w).float().clone(), gt, defect,
                    fo["lost"])


def make_pairs(sections: dict[str, Tensor], zs: dict[str, list[int]], gaps: tuple[int, ...],
               seed: int = 0) -> list[FoldPair]:
    """Fold pairs for every stack in ``sections`` (name -> ``(Z, H, W)``), target slice in
    ``zs[name]`` and gap: the source is slice ``z + gap`` folded."""
    out = []
    for block, stack in sections.items():
        for gap in gaps:
            for z in zs[block]:
                name = f"{block}_z{z:03d}_gap{gap}"
                out.append(fold_pair(name, stack[z], stack[z + gap], gap, seed))
    return out


def fold_errors(field: Tensor, pair: FoldPair) -> dict[str, float]:
    """Median end-point error near the fold (within :data:`NEAR_PX` of the lost strip), its
    p95, and the median away from it; lost pixels, pixels whose answer lies in the source's
    defect or outside its data, and the border are left out."""
    err = (field.float() - pair.gt).norm(dim=1, keepdim=True)
    n = NEAR_PX
    near = F.max_pool2d(pair.lost, 2 * n + 1, 1, n) > 0
    usable = (pair.lost == 0) & (fields.warp_image(pair.src_defect, pair.gt) == 0)
    usable &= fields.warp_image((pair.src != 0).float(), pair.gt) > 0.999
    usable[..., :BORDER, :] = usable[..., -BORDER:, :] = False
    usable[..., :BORDER] = usable[..., -BORDER:] = False
    e_near, e_far = err[near & usable], err[~near & usable]
    return {
        "near": float(e_near.median()) if e_near.numel() else float("nan"),
        "near_p95": float(torch.quantile(e_near, 0.95)) if e_near.numel() else float("nan"),
        "far": float(e_far.median()) if e_far.numel() else float("nan"),
    }
