"""Neighbour pairs with a known answer, cut from registered stacks (FIB-SEM).

A FIB-SEM block images one block face again and again without moving the sample, so its slices
are registered by construction: the right field between slice ``z`` and slice ``z + gap`` is
zero, although their content differs the way serial sections ``gap x slice thickness`` apart
do (neurites move, appear and end). Deform the later slice by a known smooth field ``d`` and
the pair ``(warp(slice[z + gap], d), slice[z])`` has the exact answer ``invert(d)``. An aligner
that bends the membranes of one slice onto the other's ("morphing") shows up as error here,
which same-section pairs and equivariance cannot see.

Two kinds per gap:

* ``deformed``: the source deformed by a random :data:`DEFORMATION`; ``gt = invert(d)``.
* ``undeformed``: the raw slices; ``gt = 0``. What a method returns here is its morph.

and, for comparison, ``same`` pairs (:func:`make_same_pairs`): a slice deformed the same way
plus noise against itself, no change of content (``gap`` 0).

Blocks come from a folder of blocks, one sub-folder of slice images per block (default
:func:`default_data_dir`: ``$METROEM_FIBSEM_DATA``, else ``$METROEM_SHARED_DATA/fibsem``). The
last :data:`HELD_OUT` slices of every block are held out for benchmarks; :func:`split` gives the
training range.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from metroem import shared_data, synth
from metroem.errors import MetroemError

Tensor = torch.Tensor

__all__ = [
    "DEFORMATION",
    "GAPS",
    "HELD_OUT",
    "NeighbourPair",
    "default_data_dir",
    "load_blocks",
    "make_neighbour_pairs",
    "make_same_pairs",
    "split",
]

NOISE_STD = 8.0  # grey levels of noise on same-section sources (as metroem.eval.pairs)
HELD_OUT = 50  # last slices of each block kept out of training (benchmarks only)
GAPS = (1, 2, 4, 8)  # slices apart: 10, 20, 40, 80 nm on the 10 nm FIB-SEM blocks
# Drift, affine and an elastic part of a few percent local strain (median ~4 % on 250 px
# slices): the misalignment between real sections, in pixels of the 10 nm slices.
DEFORMATION = synth.DeformationSpec(
    translation=48, rotation_deg=3, scale=0.03, shear=0.02, elastic=1.5, elastic_scale=96
)


@dataclass
class NeighbourPair:
    """One pair; images ``(H, W)`` float32 with raw values (0 = no data), ``gt`` ``(2, H, W)``."""

    kind: str  # "deformed" or "undeformed"
    block: str
    z: int  # the target slice; the source is slice z + gap
    gap: int
    src: Tensor
    tgt: Tensor
    gt: Tensor

    @property
    def name(self) -> str:
        return f"{self.kind}_gap{self.gap}_{self.block}_z{self.z:03d}"


def default_data_dir() -> Path:
    """``$METROEM_FIBSEM_DATA`` if set, else ``$METROEM_SHARED_DATA/fibsem`` (one-line error if
    neither is set)."""
    return shared_data.shared_dir("fibsem", "METROEM_FIBSEM_DATA")


def load_blocks(data_dir: str | os.PathLike | None = None,
                flag: str = "--fibsem") -> dict[str, Tensor]:
    """Every block under ``data_dir`` as ``name -> (Z, H, W)`` float32 (values >= 1); ``flag``
    is the option that names the folder in the caller's command line (for the error)."""
    from metroem.images import load_sections

    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    if not folder.is_dir():
        raise MetroemError(
            f"registered blocks not found at {folder}; pass {flag} DIR (a folder with one "
            "sub-folder of slice images per block) or set METROEM_FIBSEM_DATA or "
            "METROEM_SHARED_DATA"
        )
    blocks = {
        d.name: load_sections(d)[:, 0].float() for d in sorted(folder.iterdir()) if d.is_dir()
    }
    if not blocks:
        raise MetroemError(f"{folder} has no block sub-folders of slice images")
    return blocks


def split(num_slices: int, held_out: int = HELD_OUT) -> tuple[range, range]:
    """``(training slices, held-out slices)`` of a block: the last ``held_out`` are held out."""
    if not 0 < held_out < num_slices:
        raise MetroemError(f"held_out must be in [1, {num_slices - 1}], got {held_out}")
    return range(0, num_slices - held_out), range(num_slices - held_out, num_slices)


def _seed(block: str, gap: int, z: int, seed: int) -> int:
    return seed * 1_000_003 + (zlib.crc32(block.encode()) % 9_973) * 101 + gap * 10_007 + z


def make_neighbour_pairs(
    blocks: dict[str, Tensor],
    gaps: tuple[int, ...] = GAPS,
    per_block: int = 5,
    seed: int = 0,
    held_out: int = HELD_OUT,
    kinds: tuple[str, ...] = ("deformed", "undeformed"),
    deformation: synth.DeformationSpec = DEFORMATION,
) -> list[NeighbourPair]:
    """``per_block`` target slices spread over each block's held-out range, for every gap and
    kind. Deformations are drawn from seeds keyed by block name, gap and slice: same seed, same
    pairs on every machine."""
    bad = [k for k in kinds if k not in ("deformed", "undeformed")]
    if bad:
        raise MetroemError(f"unknown pair kind {bad[0]!r}; choose deformed or undeformed")
    out = []
    for name, stack in blocks.items():
        held = split(stack.shape[0], held_out)[1]
        for gap in gaps:
            if gap < 1 or gap >= len(held):
                raise MetroemError(f"gap must be in [1, {len(held) - 1}], got {gap}")
            last = held.stop - 1 - gap
            zs = torch.linspace(held.start, last, per_block).round().long().tolist()
            for z in zs:
                tgt, raw = stack[z], stack[z + gap]
                h, w = tgt.shape
                for kind in kinds:
                    if kind == "undeformed":
                        src, gt = raw.clone(), torch.zeros(2, h, w)
                    else:
                        gen = torch.Generator().manual_seed(_seed(name, gap, z, seed))
                        d = synth.random_field(1, h, w, deformation, generator=gen)
                        s, g = synth.deformed_pair(raw[None, None], d)
                        src, gt = s[0, 0], g[0]
                    out.append(NeighbourPair(kind, name, z, gap, src, tgt.clone(), gt))
    return out


def make_same_pairs(
    blocks: dict[str, Tensor],
    per_block: int = 5,
    seed: int = 0,
    held_out: int = HELD_OUT,
    deformation: synth.DeformationSpec = DEFORMATION,
) -> list[NeighbourPair]:
    """Same-section pairs of the held-out slices: ``warp(slice, d)`` plus Gaussian noise
    (:data:`NOISE_STD`) against the slice itself; ``gt = invert(d)``; ``gap`` 0."""
    out = []
    for name, stack in blocks.items():
        held = split(stack.shape[0], held_out)[1]
        zs = torch.linspace(held.start, held.stop - 1, per_block).round().long().tolist()
        for z in zs:
            gen = torch.Generator().manual_seed(_seed(name, 0, z, seed))
            tgt = stack[z]
            d = synth.random_field(1, *tgt.shape, deformation, generator=gen)
            s, g = synth.deformed_pair(tgt[None, None], d)
            src = s[0, 0]
            noise = torch.randn(src.shape, generator=gen) * NOISE_STD
            src = torch.where(src != 0, (src + noise).clamp(1, 255), torch.zeros_like(src))
            out.append(NeighbourPair("same", name, z, 0, src, tgt.clone(), g[0]))
    return out


def valid_mask(pair: NeighbourPair, margin: int = 4) -> Tensor:
    """Target pixels whose true sample point lies in the source's data (EPE is counted there)."""
    from metroem.eval.metrics import valid_after_warp

    return valid_after_warp(pair.src, pair.gt, margin=margin) & (pair.tgt != 0)
