"""Write the golden fields of the shipped pyramids (``tests/golden/<pyramid>.npz``).

Run only when a shipped pyramid's weights or architecture change on purpose; the golden test
(tests/test_golden.py) then pins the new fields. The pairs are stored with the fields, so the
test does not depend on how the demo stack or the deformations are generated::

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from metroem import aligner, demo_volume, fields, synth

HERE = Path(__file__).resolve().parent
MODELS = HERE.parents[1] / "models"
PYRAMIDS = ("demo", "isbi")
SIZE = 192


def golden_pairs(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Two pairs ``(2, 1, SIZE, SIZE)`` uint8: a deformed copy of a section, and neighbours."""
    stack = demo_volume.procedural_stack(3, SIZE, SIZE, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    spec = synth.DeformationSpec(translation=3.0, rotation_deg=1.0, scale=0.01, shear=0.01,
                                 elastic=1.0, elastic_scale=32.0)
    deformation = synth.random_field(1, SIZE, SIZE, spec, generator=gen)
    moved = fields.warp_image(stack[1:2].float(), deformation).round().clamp(0, 255)
    src = torch.cat([moved, stack[0:1].float()]).to(torch.uint8)
    tgt = torch.cat([stack[1:2], stack[1:2]])
    return src.numpy(), tgt.numpy()


def pyramid_fields(pyramid: Path, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """The pyramid's saturated fields on the pairs, float32 ``(N, 2, H, W)``."""
    torch.manual_seed(0)
    model = aligner.load_aligner(pyramid, smoothing_nm=0)
    with torch.no_grad():
        field = model(torch.from_numpy(src), torch.from_numpy(tgt))
    return field.float().numpy()


def main() -> int:
    torch.set_num_threads(1)
    src, tgt = golden_pairs()
    for name in PYRAMIDS:
        field = pyramid_fields(MODELS / name, src, tgt)
        np.savez_compressed(HERE / f"{name}.npz", src=src, tgt=tgt, field=field)
        print(f"{name}: field max |u| {np.abs(field).max():.3f} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
