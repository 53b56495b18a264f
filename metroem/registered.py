"""Training data from registered stacks: neighbour pairs whose right field is known (zero).

A registered block (FIB-SEM images one block face again and again) has slices whose content
changes like that of serial sections but whose right field is zero. Written as a pyramid's
image datasets with a zero ground-truth field beside each, such pairs teach a stage what to
ignore: the training's warp augmentation deforms the source by a known field and the
supervised term then asks for that field alone, however different the neighbouring tissue
looks (docs/training.md).

:func:`write_registered_datasets` resamples the slices from the block's pixel size to each
stage's (``resolution_nm x 2^mip``), so the tissue has its physical size at every MIP, and
writes, for every block and gap, one image dataset ``x{X}_y{Y}_z{Z}_MIP{m}.h5`` (source =
slice ``z + gap``, target = slice ``z``) and one ground-truth field dataset of zeros
(``field_0_..._groundtruth.h5``). ``X`` numbers the block and ``Y`` is the gap, so files never
collide with each other or with datasets cut from a volume (whose coordinates are positive
MIP0 pixel centres): X is negative.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from metroem import datasets
from metroem.errors import MetroemError

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["write_registered_datasets", "resample_slices"]

GROUND_TRUTH_TAG = "groundtruth"  # = metroem.training.stage_inputs.GROUND_TRUTH_TAG


def resample_slices(stack: Tensor, scale: float) -> Tensor:
    """``(Z, H, W)`` slices resized by ``scale`` (antialiased when shrinking), values kept >= 1
    so that no tissue pixel turns into no-data."""
    if scale == 1:
        return stack.float()
    h, w = stack.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(stack.float()[:, None], size=size, mode="bilinear", align_corners=False,
                        antialias=scale < 1)[:, 0]
    return out.clamp(1, 255)


def write_registered_datasets(
    blocks: dict[str, Tensor],
    dst_folder: str,
    block_nm: float,
    resolution_nm: float,
    mips: list[int],
    gaps: tuple[int, ...] = (1, 2, 4),
    z_slices: range | None = None,
    z_step: int = 4,
    overwrite: bool = False,
) -> list[str]:
    """Write neighbour pairs of registered ``blocks`` (``name -> (Z, H, W)``, pixel size
    ``block_nm``) as image + zero ground-truth datasets for stages at ``mips`` of a pyramid
    whose MIP0 pixels are ``resolution_nm``. Targets are every ``z_step``-th slice of
    ``z_slices`` (default: all) with ``z + gap`` inside it. Returns the written paths."""
    if block_nm <= 0 or resolution_nm <= 0:
        raise MetroemError("block_nm and resolution_nm must be > 0 (nm per pixel)")
    if not gaps or min(gaps) < 1 or z_step < 1:
        raise MetroemError("gaps must be >= 1 slices and z_step >= 1")
    os.makedirs(dst_folder, exist_ok=True)
    written = []
    for b, (name, stack) in enumerate(sorted(blocks.items())):
        if stack.shape[-1] != stack.shape[-2]:
            raise MetroemError(f"block {name} slices are {tuple(stack.shape[-2:])}; datasets "
                               "hold square pairs: crop the block to a square")
        rng = z_slices if z_slices is not None else range(stack.shape[0])
        if rng.stop > stack.shape[0]:
            raise MetroemError(f"block {name} has {stack.shape[0]} slices, not {rng.stop}")
        for mip in mips:
            scale = block_nm / (resolution_nm * 2**mip)
            for gap in gaps:
                zs = [z for z in range(rng.start, rng.stop, z_step) if z + gap < rng.stop]
                if not zs:
                    raise MetroemError(f"no target slice of block {name} has a slice {gap} "
                                       f"later in {rng}; use a smaller gap")
                need = sorted(set(zs) | {z + gap for z in zs})
                imgs = dict(zip(need, resample_slices(stack[need], scale), strict=True))
                pairs = np.stack([np.stack([imgs[z + gap].numpy(), imgs[z].numpy()])
                                  for z in zs]).round().astype(np.uint8)
                x, y, z0 = -(b + 1), gap, zs[0]
                size = pairs.shape[-1]
                attrs = {"mip": mip, "x_offset": x, "y_offset": y, "z": zs, "patch_size": size,
                         "source": f"registered block {name} ({block_nm:g} nm px), gap {gap}"}
                img = os.path.join(dst_folder, datasets.image_filename(x, y, z0, mip))
                written.append(datasets.write_image_dataset(img, pairs, attrs, overwrite))
                gt = os.path.join(dst_folder,
                                  datasets.field_filename(0, x, y, z0, mip, GROUND_TRUTH_TAG))
                zeros = np.zeros((len(zs), 2, size, size), np.float32)
                written.append(datasets.write_field_dataset(
                    gt, zeros, np.zeros((len(zs), 2), int),
                    {**attrs, "stage": 0, "tag": GROUND_TRUTH_TAG}, overwrite))
                log.info("wrote %d pairs of block %s, gap %d, MIP %d (%d px)", len(zs), name,
                         gap, mip, size)
    return written
