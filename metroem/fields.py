"""Displacement fields: the one place that defines metroem's field convention.

Convention (see docs/conventions.md):

* A field is a float tensor of shape ``(N, 2, H, W)``. Channel 0 displaces along the last
  tensor axis (x, columns), channel 1 along the second-to-last (y, rows).
* Values are **pixels at the tensor's own MIP**. One MIP coarser halves values and grid.
* Pull (Eulerian) warping: ``warped(p) = src(p + f(p))`` with bilinear sampling,
  ``align_corners=False``; zeros padding for images, border padding for fields and masks.
* Composition: warping by ``first`` and then by ``second`` equals one warp by
  ``h(p) = second(p) + first(p + second(p))`` (see :func:`compose`).
* A field that aligns a pair is *saturated*: the complete field from the raw source to the
  target, any incoming field included.

Pixel ``i`` has its centre at coordinate ``i``; with ``align_corners=False`` that centre sits at
normalised coordinate ``(2 i + 1) / W - 1``, so a displacement of ``d`` pixels along x is
``2 d / W`` normalised units (and ``2 d / H`` along y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = [
    "identity",
    "check_field",
    "to_normalized",
    "from_normalized",
    "sampling_grid",
    "warp",
    "warp_image",
    "warp_field",
    "compose",
    "compose_many",
    "fill_nodata",
    "downsample_image",
    "downsample_field",
    "upsample_field",
    "resample_field",
    "resample_image",
    "mean_translation",
    "jacobian_determinant",
    "invert",
    "transpose_xy",
    "to_torchfields",
    "from_torchfields",
]


def identity(
    n: int,
    h: int,
    w: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The zero field (identity mapping) of shape ``(n, 2, h, w)``."""
    return torch.zeros(n, 2, h, w, device=device, dtype=dtype)


def check_field(field: Tensor, name: str = "field") -> None:
    """Raise ``ValueError`` unless ``field`` is a floating ``(N, 2, H, W)`` tensor."""
    if not isinstance(field, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(field).__name__}")
    if field.dim() != 4 or field.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2, H, W), got {tuple(field.shape)}")
    if not field.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {field.dtype}")


def _scale(h: int, w: int, field: Tensor) -> Tensor:
    """Per-channel factor pixels -> normalised units, shaped to broadcast over ``field``."""
    return torch.tensor([2.0 / w, 2.0 / h], device=field.device, dtype=field.dtype).view(
        1, 2, 1, 1
    )


def to_normalized(field: Tensor) -> Tensor:
    """Pixels -> ``grid_sample`` normalised units (x by W/2, y by H/2; right for non-square)."""
    h, w = field.shape[-2:]
    return field * _scale(h, w, field)


def from_normalized(field: Tensor) -> Tensor:
    """Normalised ``grid_sample`` units -> pixels. Inverse of :func:`to_normalized`."""
    h, w = field.shape[-2:]
    return field / _scale(h, w, field)


def _base_grid(n: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Normalised coordinates of pixel centres, shape ``(n, h, w, 2)`` in (x, y) order."""
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0).expand(n, h, w, 2)


def sampling_grid(field: Tensor) -> Tensor:
    """The ``grid_sample`` grid ``(N, H, W, 2)`` that pulls from ``p + field(p)``."""
    check_field(field)
    n, _, h, w = field.shape
    base = _base_grid(n, h, w, field.device, field.dtype)
    return base + to_normalized(field).permute(0, 2, 3, 1)


def warp(
    src: Tensor, field: Tensor, padding: str = "zeros", mode: str = "bilinear"
) -> Tensor:
    """Pull-warp ``src`` ``(N, C, H, W)`` by ``field``: ``out(p) = src(p + field(p))``.

    ``field`` must have the same H and W as ``src`` and N equal to it (or 1, broadcast).
    """
    check_field(field)
    if src.dim() != 4:
        raise ValueError(f"src must have shape (N, C, H, W), got {tuple(src.shape)}")
    if src.shape[-2:] != field.shape[-2:]:
        raise ValueError(
            f"src spatial size {tuple(src.shape[-2:])} != field spatial size "
            f"{tuple(field.shape[-2:])}; resample one of them first"
        )
    if field.shape[0] != src.shape[0] and field.shape[0] != 1:
        raise ValueError(f"batch sizes differ: src {src.shape[0]}, field {field.shape[0]}")
    if not src.is_floating_point():
        grid = sampling_grid(field.expand(src.shape[0], -1, -1, -1))
        out = F.grid_sample(
            src.to(grid.dtype), grid, mode=mode, padding_mode=padding, align_corners=False
        )
        return out.round().clamp(0, torch.iinfo(src.dtype).max).to(src.dtype)
    if field.shape[0] != src.shape[0]:
        field = field.expand(src.shape[0], -1, -1, -1)
    grid = sampling_grid(field.to(src.dtype))
    return F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=False)


def warp_image(img: Tensor, field: Tensor, mode: str = "bilinear") -> Tensor:
    """Warp an image: zeros padding, so pixels pulled from outside become 0 (no data)."""
    return warp(img, field, padding="zeros", mode=mode)


def warp_field(field_to_move: Tensor, field: Tensor) -> Tensor:
    """Warp a field or mask: border padding, values are resampled, not re-scaled."""
    return warp(field_to_move, field, padding="border")


def compose(first: Tensor, second: Tensor) -> Tensor:
    """The single field equal to warping by ``first`` and then by ``second``.

    ``warp(warp(src, first), second)(p) = src(p + second(p) + first(p + second(p)))``, so the
    result is ``h(p) = second(p) + first(p + second(p))``. In a pyramid, ``first`` is the
    incoming (aggregate) field and ``second`` the residual a later stage predicts on the source
    already warped by ``first``.
    """
    check_field(first, "first")
    check_field(second, "second")
    return second + warp_field(first, second)


def compose_many(fields: list[Tensor]) -> Tensor:
    """Compose fields applied in list order (``fields[0]`` first)."""
    if not fields:
        raise ValueError("compose_many needs at least one field")
    out = fields[0]
    for f in fields[1:]:
        out = compose(out, f)
    return out


def fill_nodata(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` ``(N, C, H, W)`` with every pixel where ``mask`` ``(N, 1, H, W)`` is 0 set to the
    nearest pixel with data in its row, and in rows without data to the nearest filled row in
    its column; unchanged where an item has no data at all.

    Around a rectangle of data this is exactly replicate padding, so a field extended into
    surrounding no-data behaves at the data's edge as a field at the image's edge does (bilinear
    upsampling, ``border`` warps).
    """
    valid = mask > 0.5
    if not torch.compiler.is_exporting() and bool(valid.all()):
        return x  # nothing to fill (an exported program always runs the fill: same result)
    x = _fill_along(x, valid, -1)
    rows = valid.any(-1, keepdim=True).expand_as(mask)
    return _fill_along(x, rows, -2)


def _fill_along(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Fill ``x`` where ``valid`` (bool, one channel) is false from the nearest valid entry
    along ``dim`` (the earlier one on ties); lines without a valid entry stay as they are."""
    n = x.shape[dim]
    shape = [1, 1, 1, 1]
    shape[dim] = n
    idx = torch.arange(n, device=x.device).view(shape).expand_as(valid)
    before = torch.where(valid, idx, -1).cummax(dim).values  # last valid index <= i
    after = torch.where(valid, idx, n).flip(dim).cummin(dim).values.flip(dim)  # first >= i
    use_before = (before >= 0) & ((after >= n) | (idx - before <= after - idx))
    source = torch.where(use_before, before, after).clamp(0, n - 1)
    filled = torch.gather(x, dim, source.expand_as(x))
    keep = valid | ~valid.any(dim, keepdim=True)
    return torch.where(keep.expand_as(x), x, filled)


def _check_levels(levels: int) -> int:
    if int(levels) != levels or levels < 0:
        raise ValueError(f"MIP difference must be a non-negative integer, got {levels}")
    levels = int(levels)
    return levels


def downsample_image(img: Tensor, levels: int = 1, masked: bool = True) -> Tensor:
    """Downsample an image ``levels`` MIPs by 2x2 box averaging.

    With ``masked=True``, 0 means no data: a coarse pixel averages only its valid fine pixels
    and stays 0 only if none is valid, so tissue borders do not fade towards 0.
    """
    levels = _check_levels(levels)
    if levels == 0:
        return img
    k = 1 << levels
    x = img if img.is_floating_point() else img.float()
    if not masked:
        out = F.avg_pool2d(x, k)
    else:
        valid = (x != 0).to(x.dtype)
        total = F.avg_pool2d(x, k)
        frac = F.avg_pool2d(valid, k)
        out = torch.where(frac > 0, total / frac.clamp_min(1e-12), torch.zeros_like(total))
    if not img.is_floating_point():
        out = out.round().to(img.dtype)
    return out


def downsample_field(field: Tensor, levels: int = 1) -> Tensor:
    """Downsample a field ``levels`` MIPs: 2x2 box average of vectors, values divided by 2."""
    levels = _check_levels(levels)
    check_field(field)
    if levels == 0:
        return field
    k = 1 << levels
    return F.avg_pool2d(field, k) / k


def upsample_field(
    field: Tensor, levels: int = 1, size: tuple[int, int] | None = None
) -> Tensor:
    """Upsample a field ``levels`` MIPs: bilinear (align_corners=False), values times 2^levels.

    ``size`` overrides the output H, W (for odd sizes); it must be the finer grid's size.
    """
    levels = _check_levels(levels)
    check_field(field)
    if levels == 0 and size is None:
        return field
    k = 1 << levels
    if size is None:
        size = (field.shape[-2] * k, field.shape[-1] * k)
    out = F.interpolate(field, size=[size[0], size[1]], mode="bilinear", align_corners=False)
    return out * k


def resample_field(field: Tensor, from_mip: int, to_mip: int) -> Tensor:
    """Move a field from ``from_mip`` to ``to_mip`` (grid and values)."""
    if to_mip >= from_mip:
        return downsample_field(field, to_mip - from_mip)
    return upsample_field(field, from_mip - to_mip)


def resample_image(img: Tensor, from_mip: int, to_mip: int) -> Tensor:
    """Move an image between MIPs: masked box average down, bilinear up."""
    if to_mip >= from_mip:
        return downsample_image(img, to_mip - from_mip)
    k = 1 << (from_mip - to_mip)
    x = img if img.is_floating_point() else img.float()
    out = F.interpolate(x, scale_factor=float(k), mode="bilinear", align_corners=False)
    return out if img.is_floating_point() else out.round().to(img.dtype)


def mean_translation(field: Tensor, mask: Tensor | None = None) -> Tensor:
    """Average displacement per item, shape ``(N, 2)``; over ``mask != 0`` pixels if given.

    Items whose mask is empty get translation 0.
    """
    check_field(field)
    if mask is None:
        return field.mean(dim=(2, 3))
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    m = (mask != 0).to(field.dtype)
    if m.shape[-2:] != field.shape[-2:]:
        raise ValueError(f"mask size {tuple(m.shape[-2:])} != field size {tuple(field.shape[-2:])}")
    count = m.sum(dim=(2, 3))
    total = (field * m).sum(dim=(2, 3))
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def jacobian_determinant(field: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``p -> p + field(p)``, shape ``(N, H-1, W-1)``.

    Forward differences on the pixel grid; values ``<= 0`` mark folds.
    """
    check_field(field)
    dx = field[:, :, :-1, 1:] - field[:, :, :-1, :-1]  # d/dx of (u, v)
    dy = field[:, :, 1:, :-1] - field[:, :, :-1, :-1]  # d/dy of (u, v)
    dudx, dvdx = dx[:, 0], dx[:, 1]
    dudy, dvdy = dy[:, 0], dy[:, 1]
    return (1 + dudx) * (1 + dvdy) - dudy * dvdx


def invert(field: Tensor, steps: int = 50, tol: float = 1e-4) -> Tensor:
    """Approximate inverse ``g`` of a smooth pull field ``f`` so that ``compose(f, g) ~ 0``.

    Fixed-point iteration of ``g(p) = -f(p + g(p))`` for at most ``steps`` steps (stops once
    no pixel moves by ``tol``); exact enough for fold-free smooth fields with small gradients
    (|grad f| < 1), which is what synthetic deformations are.
    """
    check_field(field)
    inv = -field
    for _ in range(steps):
        nxt = -warp_field(field, inv)
        delta = (nxt - inv).abs().max()
        inv = nxt
        if delta < tol:
            break
    return inv


def transpose_xy(tensor: Tensor, is_field: bool = False) -> Tensor:
    """Swap the H and W axes; for a field also swap its x and y channels."""
    out = tensor.transpose(-1, -2)
    if is_field:
        check_field(tensor)
        out = out.flip(1)
    return out


def to_torchfields(field: Tensor):
    """Our pixel field -> ``torchfields.DisplacementField`` in torchfields' normalised units.

    torchfields samples with ``align_corners=False`` in (x, y) order, the same as ours, so only
    the units change. Its own ``from_pixels`` divides both channels by W (wrong when H != W), so
    we convert here instead.
    """
    import torchfields  # noqa: F401  (registers Tensor.field)

    return to_normalized(field).field()


def from_torchfields(tf_field) -> Tensor:
    """``torchfields.DisplacementField`` (normalised units) -> plain pixel tensor."""
    return from_normalized(torch.Tensor(tf_field).as_subclass(torch.Tensor))
