"""Patch geometry shared by ``download_image`` / ``download_field`` and ``metroem generate``.

One snapping rule (:func:`snap_to_multiple`: exact halves round up) for patch centres
(:func:`snap_centre`), the per-pair translations removed from fields (:func:`remove_translation`)
and the source-window shifts; :func:`patch_origin` places a patch around its centre at a MIP.
See docs/datasets.md.
"""

from __future__ import annotations

import numpy as np
import torch

from metroem import fields

Tensor = torch.Tensor

__all__ = ["snap_to_multiple", "snap_centre", "remove_translation", "patch_origin"]


def snap_to_multiple(
    value: float | np.ndarray | Tensor, step: int
) -> int | np.ndarray | Tensor:
    """The multiple of ``step`` nearest to ``value``; exact halves round up (towards +inf).

    In units of ``step``: 0.5 -> 1, 1.5 -> 2, -0.5 -> 0, -2.5 -> -2. This is metroem's one
    snapping rule (docs/datasets.md): patch centres, the translations that ``download_field``
    and ``metroem generate`` remove, and the source-window shifts of ``download_image`` all use
    it. A Python or numpy scalar gives an ``int``; numpy arrays and tensors keep their kind
    (floating point, whole multiples of ``step``).
    """
    q = value / step
    whole = q // 1  # floor, for numbers, arrays and tensors alike
    whole = whole + ((q - whole) >= 0.5)  # exact: no rounding of q + 0.5 near a half
    out = whole * step
    if isinstance(out, (np.ndarray, torch.Tensor)):
        return out
    return int(out)


def snap_centre(x: int, y: int, coarsest_mip: int) -> tuple[int, int]:
    """Snap a MIP0 centre to the nearest multiple of ``2**coarsest_mip`` (shared integer grid)."""
    k = 2**coarsest_mip
    return snap_to_multiple(x, k), snap_to_multiple(y, k)


def remove_translation(
    field: Tensor, mip: int, coarsest_mip: int, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Split fields ``(N, 2, H, W)`` (px at ``mip``) into ``(field - t / 2**mip, t)``.

    ``t`` ``(N, 2)`` int64 is each field's mean displacement (over ``mask != 0`` if given) in
    MIP0 px, snapped with :func:`snap_to_multiple` to a multiple of ``2**coarsest_mip`` so that
    the moved source windows stay on the pixel grid of every MIP up to ``coarsest_mip``. Used by
    both ``download_field`` and ``metroem generate``.
    """
    if coarsest_mip < mip:
        raise ValueError(f"coarsest_mip {coarsest_mip} is finer than the field's MIP {mip}")
    mean_mip0 = fields.mean_translation(field, mask).double() * 2**mip
    t = snap_to_multiple(mean_mip0, 2**coarsest_mip).long()
    residual = field - (t.double() / 2**mip).to(field.dtype).view(-1, 2, 1, 1)
    return residual, t


def patch_origin(cx: int, cy: int, mip: int, size: int) -> tuple[int, int]:
    """First voxel (x, y) at ``mip`` of the ``size``-pixel patch centred on MIP0 ``(cx, cy)``."""
    k = 2**mip
    if cx % k or cy % k:
        raise ValueError(f"centre ({cx}, {cy}) is not on the MIP {mip} grid; snap it first")
    return cx // k - size // 2, cy // k - size // 2
