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

import argparse
import logging
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from metroem import cliargs, datasets
from metroem.errors import MetroemError, cli_errors

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["write_registered_datasets", "resample_slices", "main"]

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
    plan = _plan(blocks, dst_folder, block_nm, resolution_nm, mips, gaps, z_slices, z_step)
    if not overwrite:  # refuse before writing anything, so a refusal leaves no partial set
        for item in plan:
            for path in (item["image"], item["truth"]):
                if os.path.exists(path):
                    raise MetroemError(f"{path} exists; pass --overwrite to replace it "
                                       "(overwrite=True from Python), or write into another "
                                       "folder")
    os.makedirs(dst_folder, exist_ok=True)
    written = []
    for item in plan:
        stack, zs, gap = blocks[item["block"]], item["zs"], item["gap"]
        need = sorted(set(zs) | {z + gap for z in zs})
        imgs = dict(zip(need, resample_slices(stack[need], item["scale"]), strict=True))
        pairs = np.stack([np.stack([imgs[z + gap].numpy(), imgs[z].numpy()])
                          for z in zs]).round().astype(np.uint8)
        size = pairs.shape[-1]
        attrs = {**item["attrs"], "patch_size": size}
        written.append(datasets.write_image_dataset(item["image"], pairs, attrs, overwrite))
        zeros = np.zeros((len(zs), 2, size, size), np.float32)
        written.append(datasets.write_field_dataset(
            item["truth"], zeros, np.zeros((len(zs), 2), int),
            {**attrs, "stage": 0, "tag": GROUND_TRUTH_TAG}, overwrite))
        log.info("wrote %d pairs of block %s, gap %d, MIP %d (%d px)", len(zs), item["block"],
                 gap, item["attrs"]["mip"], size)
    return written


def _plan(blocks, dst_folder, block_nm, resolution_nm, mips, gaps, z_slices, z_step) -> list:
    """Every (block, MIP, gap) file pair to write, checked before anything is written."""
    if block_nm <= 0 or resolution_nm <= 0:
        raise MetroemError("block_nm and resolution_nm must be > 0 (nm per pixel)")
    if not gaps or min(gaps) < 1 or z_step < 1:
        raise MetroemError("gaps must be >= 1 slices and z_step >= 1")
    if not blocks:
        raise MetroemError("no registered block given")
    plan = []
    for b, (name, stack) in enumerate(sorted(blocks.items())):
        if stack.shape[-1] != stack.shape[-2]:
            raise MetroemError(f"block {name} slices are {tuple(stack.shape[-2:])}; datasets "
                               "hold square pairs: crop the block to a square")
        rng = z_slices if z_slices is not None else range(stack.shape[0])
        if rng.stop > stack.shape[0]:
            raise MetroemError(f"block {name} has {stack.shape[0]} slices, not {rng.stop}")
        for mip in mips:
            for gap in gaps:
                zs = [z for z in range(rng.start, rng.stop, z_step) if z + gap < rng.stop]
                if not zs:
                    raise MetroemError(f"no target slice of block {name} has a slice {gap} "
                                       f"later in {rng}; use a smaller gap")
                x, y = -(b + 1), gap
                attrs = {"mip": mip, "x_offset": x, "y_offset": y, "z": zs,
                         "source": f"registered block {name} ({block_nm:g} nm px), gap {gap}"}
                plan.append({
                    "block": name, "gap": gap, "zs": zs,
                    "scale": block_nm / (resolution_nm * 2**mip), "attrs": attrs,
                    "image": os.path.join(dst_folder, datasets.image_filename(x, y, zs[0], mip)),
                    "truth": os.path.join(dst_folder, datasets.field_filename(
                        0, x, y, zs[0], mip, GROUND_TRUTH_TAG)),
                })
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="metroem registered",
        description="Write neighbour pairs of registered blocks (FIB-SEM) as training datasets "
        "with a known (zero) field, beside the pairs cut from a volume.")
    p.add_argument("--dst_folder", required=True,
                   help="h5 dataset folder (the one train.py --dataset_path reads)")
    p.add_argument("--blocks", default=None, metavar="DIR",
                   help="folder with one sub-folder of slice images per registered block "
                   "(default: $METROEM_FIBSEM_DATA or $METROEM_SHARED_DATA/fibsem)")
    p.add_argument("--block_nm", type=float, required=True, help="the blocks' pixel size in nm")
    p.add_argument("--resolution_nm", type=float, required=True,
                   help="MIP0 pixel size of the pyramid's data in nm (slices are resampled to "
                   "resolution_nm x 2^mip at every MIP)")
    p.add_argument("--mips", type=int, nargs="+", required=True, help="the pyramid's stage MIPs")
    p.add_argument("--gaps", type=int, nargs="+", default=[1, 2, 4],
                   help="slice gaps of the pairs (default 1 2 4)")
    p.add_argument("--z_step", type=int, default=4,
                   help="every z_step-th slice is a target (default 4)")
    p.add_argument("--held_out", type=int, default=50,
                   help="last slices of every block left out for benchmarks (default 50, the "
                   "neighbour benchmark's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    from metroem.eval.neighbours import load_blocks, split

    a = cliargs.parse_args(build_parser(), argv)
    blocks = load_blocks(a.blocks, flag="--blocks")
    lengths = {b.shape[0] for b in blocks.values()}
    if len(lengths) != 1:
        raise MetroemError(f"the blocks have different slice counts {sorted(lengths)}; give "
                           "blocks of one length or write them one at a time")
    train, _ = split(lengths.pop(), a.held_out)
    paths = write_registered_datasets(blocks, a.dst_folder, a.block_nm, a.resolution_nm,
                                      a.mips, tuple(a.gaps), train, a.z_step, a.overwrite)
    # the command's output on stdout: what was written where
    print(f"wrote {len(paths) // 2} image datasets of {len(blocks)} blocks (slices "
          f"{train.start}-{train.stop - 1}, gaps {a.gaps}, MIPs {a.mips}) with zero ground "
          f"truth to {os.path.abspath(a.dst_folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
