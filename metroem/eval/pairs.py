"""Benchmark pairs with known answers, built from real sections with fixed seeds.

Two kinds of pair, at several difficulties (:data:`DIFFICULTIES`):

* ``same``: a deformed, noisy copy of section z against section z. The ground-truth field is
  known exactly (``invert(d)`` for the deformation ``d``, see :func:`metroem.synth.deformed_pair`),
  so end-point error (EPE) measures accuracy.
* ``neighbour``: section z, deformed, against section z-1. The true field between neighbours is
  unknown, but the synthetic part is: a method's field on the deformed pair should equal
  ``compose(h, f0)`` where ``f0`` is its field on the undeformed pair and ``h = invert(d)``
  (:func:`metroem.eval.metrics.equivariance_target`). That gap is the equivariance EPE.

Sections come from a folder of images (default :func:`default_data_dir`:
``$METROEM_BENCH_DATA``, else the ISBI ssTEM stack in ``$METROEM_SHARED_DATA/isbi``); everything
else is drawn from seeds, so a pair list is the same on every machine.
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
    "DIFFICULTIES",
    "BenchmarkPair",
    "default_data_dir",
    "load_stack",
    "make_pairs",
    "gt_valid_mask",
]

# Deformation of the source at each difficulty, in pixels of the 512 x 512 sections.
DIFFICULTIES: dict[str, synth.DeformationSpec] = {
    "shift8": synth.DeformationSpec(translation=8),
    "shift48": synth.DeformationSpec(translation=48),
    "affine": synth.DeformationSpec(translation=8, rotation_deg=3, scale=0.04, shear=0.03),
    # Everything at once at the magnitudes of real section distortions: the full +-48 px drift,
    # the affine part and an elastic part of ~5 % local strain (skimage ILK: ~0.6 px
    # equivariance EPE here, near the ~0.7 px the quality target was set against).
    "mixed48": synth.DeformationSpec(
        translation=48, rotation_deg=3, scale=0.04, shear=0.03, elastic=1.5, elastic_scale=96
    ),
    # A stress test: twice that elastic amplitude (~8-9 % strain median, 16-18 % p95).
    "elastic": synth.DeformationSpec(
        translation=8, rotation_deg=3, scale=0.04, shear=0.03, elastic=3.0, elastic_scale=96
    ),
}
NOISE_STD = 8.0  # grey levels of Gaussian noise added to same-section sources (uint8 scale)


@dataclass
class BenchmarkPair:
    """One benchmark pair; images ``(H, W)`` float32 with raw values, 0 = no data.

    ``gt`` (``(2, H, W)``) is the field aligning ``src`` to ``tgt`` for ``same`` pairs. For
    ``neighbour`` pairs ``src_undeformed`` is section z itself and ``h = invert(d)`` undoes the
    deformation, for the equivariance check; ``gt`` is None.
    """

    kind: str
    difficulty: str
    z: int
    src: Tensor
    tgt: Tensor
    deformation: Tensor
    h: Tensor
    gt: Tensor | None = None
    src_undeformed: Tensor | None = None
    draw: int = 0  # which of the deformations drawn for this section (make_pairs ``draws``)

    @property
    def name(self) -> str:
        suffix = f"_d{self.draw}" if self.draw else ""
        return f"{self.kind}_{self.difficulty}_z{self.z:02d}{suffix}"


def default_data_dir() -> Path:
    """``$METROEM_BENCH_DATA`` if set, else ``$METROEM_SHARED_DATA/isbi`` (one-line error if
    neither is set)."""
    return shared_data.shared_dir("isbi", "METROEM_BENCH_DATA")


def load_stack(
    data_dir: str | os.PathLike | None = None, num_sections: int | None = None
) -> Tensor:
    """The benchmark sections as ``(Z, H, W)`` float32 (values >= 1; 0 stays reserved)."""
    from metroem.images import load_sections

    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    if not folder.is_dir():
        raise MetroemError(
            f"benchmark sections not found at {folder}; pass --data DIR (a folder of consecutive "
            "section images) or set METROEM_BENCH_DATA or METROEM_SHARED_DATA"
        )
    stack = load_sections(folder, num_sections)
    if stack.shape[0] < 2:
        raise MetroemError(f"{folder} has {stack.shape[0]} section(s); neighbour pairs need >= 2")
    return stack[:, 0].float()


def _seed(kind: str, difficulty: str, z: int, seed: int, draw: int) -> int:
    """Generator seed of one pair. It depends on the difficulty's name, not its place in
    :data:`DIFFICULTIES`, so adding a difficulty leaves every other pair as it was."""
    k = 0 if kind == "same" else 1
    d = zlib.crc32(difficulty.encode()) % 9_973
    return seed * 1_000_003 + draw * 100_019 + k * 10_007 + d * 101 + z


def _one(
    stack: Tensor, kind: str, difficulty: str, z: int, seed: int, crop: int | None, draw: int
) -> BenchmarkPair:
    gen = torch.Generator().manual_seed(_seed(kind, difficulty, z, seed, draw))
    section = stack[z]
    target = section if kind == "same" else stack[z - 1]
    if crop is not None:
        section, target = section[:crop, :crop], target[:crop, :crop]
    h, w = section.shape
    d = synth.random_field(1, h, w, DIFFICULTIES[difficulty], generator=gen)
    src, h_field = synth.deformed_pair(section[None, None], d)
    src = src[0, 0]
    if kind == "same":
        noise = torch.randn(src.shape, generator=gen) * NOISE_STD
        src = torch.where(src != 0, (src + noise).clamp(1, 255), torch.zeros_like(src))
    return BenchmarkPair(
        kind=kind,
        difficulty=difficulty,
        z=z,
        src=src,
        tgt=target.clone(),
        deformation=d[0],
        h=h_field[0],
        gt=h_field[0] if kind == "same" else None,
        src_undeformed=section.clone() if kind == "neighbour" else None,
        draw=draw,
    )


def make_pairs(
    stack: Tensor,
    difficulties: list[str] | None = None,
    per_difficulty: int = 3,
    kinds: tuple[str, ...] = ("same", "neighbour"),
    seed: int = 0,
    crop: int | None = None,
    draws: int = 1,
) -> list[BenchmarkPair]:
    """``per_difficulty`` sections, evenly spread; on each, ``draws`` random deformations per
    kind and difficulty (more pairs from the same held-out sections, for steadier medians).

    ``crop`` keeps only the top-left ``crop x crop`` pixels (smoke runs). Same seed, same pairs.
    """
    names = list(DIFFICULTIES) if difficulties is None else list(difficulties)
    unknown = [n for n in names if n not in DIFFICULTIES]
    if unknown:
        raise MetroemError(
            f"unknown difficulty {unknown[0]!r}; choose from {', '.join(DIFFICULTIES)}"
        )
    nz = stack.shape[0]
    if per_difficulty < 1 or per_difficulty > nz - 1:
        raise MetroemError(f"per_difficulty must be in [1, {nz - 1}] for {nz} sections")
    if draws < 1:
        raise MetroemError(f"draws must be >= 1, got {draws}")
    zs = torch.linspace(1, nz - 1, per_difficulty).round().long().tolist()
    return [
        _one(stack, kind, diff, z, seed, crop, draw)
        for diff in names
        for kind in kinds
        for draw in range(draws)
        for z in zs
    ]


def gt_valid_mask(pair: BenchmarkPair, margin: int = 4) -> Tensor:
    """Tissue pixels of the target whose ground-truth sample point lies in the source data."""
    from metroem.eval.metrics import valid_after_warp

    gt = pair.gt if pair.gt is not None else pair.h
    ok = valid_after_warp(pair.src, gt, margin=margin)
    return ok & (pair.tgt != 0)
