"""Aligning sections with defects (folds, cracks): masked pixels are no data, and a section the
defects cut apart is aligned piece by piece, so the field may jump across a fold.

A fold loses a strip of tissue and pulls the tissue on either side toward it: the right field
is smooth on each side and discontinuous across the fold. Masking the fold (its pixels become
no data, 0) keeps its dark line out of the matching, but one field over the whole section is
still smooth across the fold, because every network and flow method mixes both sides near it.

:func:`align_with_defects` therefore splits the source's data into its connected pieces
(4-connected, after removing the masked pixels) and, when there are at least two large ones,
aligns each piece on its own, in two passes:

1. each piece (the rest of the source blank) onto the whole target; the target pixels a piece
   covers after warping are that piece's *share* of the target;
2. each piece again onto its share alone (the rest of the target blank), so neither side of the
   fold sees the other's tissue.

Every target pixel then takes the field of the piece that covers it. Pieces smaller than
``min_fraction`` of the data stay with the largest one. Sections the masks do not cut apart
take one pass, as without defects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from metroem.errors import MetroemError

Tensor = torch.Tensor
PairAlign = Callable[[Tensor, Tensor], Tensor]
"""``(src, tgt) -> field``: raw images ``(1, 1, H, W)`` (0 = no data) to a pull field
``(1, 2, H, W)`` in pixels."""

__all__ = [
    "MIN_PIECE_FRACTION",
    "PairAlign",
    "MaskedSource",
    "PieceMap",
    "PieceSource",
    "ShareSource",
    "align_with_defects",
    "apply_mask",
    "combine_by_coverage",
    "combined_window",
    "coverage",
    "piece_map",
    "share_mask",
]

log = logging.getLogger(__name__)

MIN_PIECE_FRACTION = 0.02  # pieces below this share of the section's data are not split off
COVER_STEPS = 64  # coverage is compared in steps of 1/64
BRIDGE_PX = 32  # pixels no piece covers are bridged when pieces lie within this distance
MAX_LABEL_PIXELS = 4096**2  # pieces are found on a grid this small (a coarser MIP if needed)


def apply_mask(img: Tensor, mask: Tensor | None, threshold: float = 0.0) -> Tensor:
    """``img`` with pixels where ``mask > threshold`` set to 0 (no data); shapes must match."""
    if mask is None:
        return img
    if tuple(mask.shape[-2:]) != tuple(img.shape[-2:]):
        raise MetroemError(
            f"defect mask is {tuple(mask.shape[-2:])} but the image is "
            f"{tuple(img.shape[-2:])}; give a mask of the image's size"
        )
    return torch.where(mask.to(img.device) > threshold, torch.zeros_like(img), img)


@dataclass
class PieceMap:
    """The pieces of a section's data: ``labels`` ``(h, w)`` int32 at ``level`` MIPs above the
    section (0 = no piece, ``k`` = piece ``k``, largest first), ``count`` pieces."""

    labels: np.ndarray
    level: int
    count: int

    def mask(self, k: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Bool window ``[y0, y0 + h) x [x0, x0 + w)`` (section pixels) of piece ``k``; False
        outside the section."""
        f = 2**self.level
        ys = np.arange(y0, y0 + h) // f
        xs = np.arange(x0, x0 + w) // f
        iy = (ys >= 0) & (ys < self.labels.shape[0])
        ix = (xs >= 0) & (xs < self.labels.shape[1])
        out = np.zeros((h, w), dtype=bool)
        if iy.any() and ix.any():
            block = self.labels[np.ix_(ys[iy], xs[ix])] == k
            out[np.ix_(iy, ix)] = block
        return out


def piece_map(src, height: int, width: int, min_fraction: float = MIN_PIECE_FRACTION,
              max_pixels: int | None = MAX_LABEL_PIXELS) -> PieceMap:
    """The 4-connected pieces of the data of ``src`` (a source with ``read(y0, x0, h, w)``,
    masked pixels already 0) over ``height x width``, labelled on a grid of at most
    ``max_pixels`` (``None``: the section's own), where a cell has data only if all its pixels
    do. Pieces under ``min_fraction`` of the data join the largest; ``count`` < 2 means the
    section is in one piece."""
    from scipy import ndimage

    level = 0
    while max_pixels is not None and -(-height // 2**level) * -(-width // 2**level) > max_pixels:
        level += 1
    f = 2**level
    ch, cw = -(-height // f), -(-width // f)
    valid = np.empty((ch, cw), dtype=bool)
    rows = max(1, (2**24 // max(1, width)) // f) * f  # strips of about 16 M pixels
    for y in range(0, height, rows):
        n = min(rows, height - y)
        strip = np.asarray(src.read(y, 0, n, width)) != 0
        pad = np.ones((-(-n // f) * f, cw * f), dtype=bool)  # outside the section: no veto
        pad[:n, :width] = strip
        valid[y // f : y // f + pad.shape[0] // f] = pad.reshape(-1, f, cw, f).all(axis=(1, 3))
    labels, n = ndimage.label(valid)
    total = int(valid.sum())
    out = np.zeros_like(labels, dtype=np.int32)
    if n == 0 or total == 0:
        return PieceMap(out, level, 0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    big = [int(k) for k in order if sizes[k - 1] >= min_fraction * total]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[1:] = 1  # small pieces join the largest
    for i, k in enumerate(big, start=1):
        lut[k] = i
    return PieceMap(lut[labels], level, len(big))


class MaskedSource:
    """A source read with the pixels where ``mask`` (a source of the same grid) is above
    ``threshold`` set to 0 (no data)."""

    def __init__(self, src, mask, threshold: float = 0.0):
        self.src, self.mask, self.threshold = src, mask, threshold
        self.shape, self.dtype = getattr(src, "shape", None), getattr(src, "dtype", None)

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        a = np.asarray(self.src.read(y0, x0, h, w))
        m = np.asarray(self.mask.read(y0, x0, h, w))
        return np.where(m > self.threshold, np.zeros((), a.dtype), a)


class PieceSource:
    """A source with everything outside piece ``k`` read as 0."""

    def __init__(self, src, pieces: PieceMap, k: int):
        self.src, self.pieces, self.k = src, pieces, k
        self.shape, self.dtype = getattr(src, "shape", None), getattr(src, "dtype", None)

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        a = np.asarray(self.src.read(y0, x0, h, w))
        return np.where(self.pieces.mask(self.k, y0, x0, h, w), a, np.zeros((), a.dtype))


class _PieceMaskSource:
    def __init__(self, pieces: PieceMap, k: int):
        self.pieces, self.k = pieces, k

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return self.pieces.mask(self.k, y0, x0, h, w).astype(np.float32)


def coverage(pieces: PieceMap, k: int, field: Tensor, y0: int = 0, x0: int = 0) -> Tensor:
    """``(1, 1, h, w)`` share in [0, 1] of each pixel of the target window at ``(y0, x0)`` that
    piece ``k`` lands on when warped by the window's ``field`` ``(1, 2, h, w)``."""
    from metroem import tiling

    c = tiling.Chunk(0, y0, x0, field.shape[-2], field.shape[-1])
    return tiling.warp_chunk(_PieceMaskSource(pieces, k), field.float().cpu(), c)


def _levels(cover: Tensor) -> Tensor:
    """Coverage in steps of 1/:data:`COVER_STEPS`: float noise (a tiled run against the whole
    image) must not flip a choice between two pieces that cover a pixel equally."""
    return torch.round(cover * COVER_STEPS)


def combine_by_coverage(candidates: list[Tensor], covers: list[Tensor]) -> Tensor:
    """Per target pixel, the candidate field whose piece covers it most (the first on ties,
    coverage compared in steps of 1/:data:`COVER_STEPS`)."""
    best = candidates[0]
    score = _levels(covers[0])
    for f, c in zip(candidates[1:], covers[1:], strict=True):
        c = _levels(c)
        take = c > score
        best = torch.where(take, f, best)
        score = torch.maximum(score, c)
    return best


def share_mask(pieces: PieceMap, k: int, window_fields: list[Tensor], y0: int, x0: int) -> Tensor:
    """Bool ``(1, 1, h, w)``: target pixels of the window that piece ``k`` covers most (and more
    than half), from every piece's first-pass field on the window."""
    covers = _levels(torch.cat([coverage(pieces, j + 1, f, y0, x0)
                                for j, f in enumerate(window_fields)], 1))
    best = covers.max(1, keepdim=True).values
    first = (covers == best).float().argmax(1, keepdim=True)  # the first piece on ties
    return (first == k - 1) & (best > COVER_STEPS / 2)


class ShareSource:
    """The target read with everything outside piece ``k``'s share set to 0; the share comes
    from the first-pass field stores of every piece (``stores[j]`` for piece ``j + 1``)."""

    def __init__(self, tgt, pieces: PieceMap, k: int, stores: list):
        self.tgt, self.pieces, self.k, self.stores = tgt, pieces, k, stores
        self.shape, self.dtype = getattr(tgt, "shape", None), getattr(tgt, "dtype", None)

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        a = np.asarray(self.tgt.read(y0, x0, h, w))
        fs = [s.read(y0, x0, h, w) for s in self.stores]
        keep = share_mask(self.pieces, self.k, fs, y0, x0)[0, 0].numpy()
        return np.where(keep, a, np.zeros((), a.dtype))


def _bridge(fs: list[Tensor], covers: list[Tensor]) -> Tensor:
    """The combined field of a window, with pixels no piece covers (the tissue lost into a
    fold) interpolated between the pieces around them: each piece's field at its nearest
    covered pixel, weighted by inverse distance, for pixels within :data:`BRIDGE_PX` of at least
    two pieces. Across a straight strip this is linear, so the strip maps onto the fold line
    between the pieces: rendered, it is empty (the line is masked), and the field stays
    continuous for whatever starts from it."""
    from scipy import ndimage

    out = combine_by_coverage(fs, covers)
    levels = torch.cat([_levels(c) for c in covers], 1)[0]
    best = levels.max(0).values
    owned = [(levels[k] == best) & (best > COVER_STEPS / 2) for k in range(len(fs))]
    uncovered = best <= COVER_STEPS / 2
    if not bool(uncovered.any()):
        return out
    num = torch.zeros_like(out)
    den = torch.zeros_like(best, dtype=torch.float32)
    near = torch.zeros_like(best, dtype=torch.int32)
    for f, own in zip(fs, owned, strict=True):
        if not bool(own.any()):
            continue
        dist, (iy, ix) = ndimage.distance_transform_edt(~own.numpy(), return_indices=True)
        dist = torch.from_numpy(dist).float()
        reach = dist <= BRIDGE_PX
        wgt = torch.where(reach, 1.0 / dist.clamp_min(0.5), torch.zeros_like(dist))
        nearest = f[0][:, torch.from_numpy(iy), torch.from_numpy(ix)]
        num += wgt * nearest
        den += wgt
        near += reach.int()
    fill = uncovered & (near >= 2)
    return torch.where(fill, num / den.clamp_min(1e-12), out)


def combined_window(pieces: PieceMap, stores: list, y0: int, x0: int, h: int, w: int) -> Tensor:
    """The final field on a window: each pixel from the second-pass field (``stores[j]`` for
    piece ``j + 1``) of the piece that covers it, pixels no piece covers bridged between the
    pieces (read with a margin of :data:`BRIDGE_PX`, so a tiled run equals a whole-image
    one)."""
    m = BRIDGE_PX + 1
    fs = [s.read(y0 - m, x0 - m, h + 2 * m, w + 2 * m) for s in stores]
    covers = [coverage(pieces, j + 1, f, y0 - m, x0 - m) for j, f in enumerate(fs)]
    return _bridge(fs, covers)[..., m : m + h, m : m + w].contiguous()


def align_with_defects(
    align: PairAlign,
    src: Tensor,
    tgt: Tensor,
    src_mask: Tensor | None = None,
    tgt_mask: Tensor | None = None,
    threshold: float = 0.0,
    split: bool = True,
    min_fraction: float = MIN_PIECE_FRACTION,
) -> Tensor:
    """Field ``(1, 2, H, W)`` aligning ``src`` onto ``tgt`` (``(1, 1, H, W)`` raw) with defect
    masks (``> threshold`` = defect): masked pixels are no data, and with ``split`` a source
    the masks cut into pieces is aligned piece by piece (module docstring)."""
    if src.dim() != 4 or src.shape[:2] != (1, 1) or src.shape != tgt.shape:
        raise ValueError(f"src and tgt must both be (1, 1, H, W), got {tuple(src.shape)} and "
                         f"{tuple(tgt.shape)}")
    from metroem import tiling

    src = apply_mask(src, src_mask, threshold)
    tgt = apply_mask(tgt, tgt_mask, threshold)
    if not split or src_mask is None:
        return align(src, tgt)
    h, w = src.shape[-2:]
    s_np, t_np = src[0, 0].cpu().numpy(), tgt[0, 0].cpu().numpy()
    pieces = piece_map(tiling.ArraySource(s_np), h, w, min_fraction, max_pixels=None)
    if pieces.count < 2:
        return align(src, tgt)
    log.info("source cut into %d pieces by its defects: aligning each", pieces.count)

    def run(k: int, tgt_np: np.ndarray) -> Tensor:
        s_k = PieceSource(tiling.ArraySource(s_np), pieces, k).read(0, 0, h, w)
        as_t = lambda a: torch.from_numpy(a)[None, None].to(src)  # noqa: E731
        return align(as_t(s_k), as_t(tgt_np)).float().cpu()

    ks = range(1, pieces.count + 1)
    first = [run(k, t_np) for k in ks]
    second = [run(k, np.where(share_mask(pieces, k, first, 0, 0)[0, 0].numpy(), t_np, 0))
              for k in ks]
    stores = []
    for f in second:  # whole-image fields read like a tiled run's stores (border repeated)
        stores.append(tiling.MemoryFieldStore(h, w))
        stores[-1].field = f
    return combined_window(pieces, stores, 0, 0, h, w).to(src.device)


# --- mask layers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskLayer:
    """A defect mask layer for the sections of an image layer: ``path`` read at its MIP
    ``mip`` (the images' MIP or coarser), pixels above ``threshold`` are defects; ``split``
    aligns a section the defects cut apart piece by piece."""

    path: str
    mip: int | None = None
    threshold: float = 0.0
    split: bool = True

    def resolved(self, images, image_mip: int, zs) -> MaskLayer:
        """This layer checked against the image layer ``images`` (a ``VolumeInfo``) at
        ``image_mip`` for sections ``zs``, with its MIP filled in; a one-line MetroemError
        saying what does not fit."""
        from metroem import volumes

        try:
            info = volumes.volume_info(self.path)
        except MetroemError as e:
            raise MetroemError(f"mask layer {self.path} cannot be opened ({e}); pass an "
                               "existing layer to --mask_path") from None
        mip = image_mip if self.mip is None else int(self.mip)
        if mip not in info.mips:
            raise MetroemError(f"mask layer {self.path} has no MIP {mip}; it has MIPs "
                               f"{list(info.mips)} (pick one with --mask_mip)")
        if mip < image_mip:
            raise MetroemError(f"--mask_mip {mip} is finer than the images' MIP {image_mip}; "
                               f"pass --mask_mip {image_mip} or coarser")
        f = 2 ** (mip - image_mip)
        res_i, res_m = images.resolution[image_mip], info.resolution[mip]
        if any(abs(res_m[a] - res_i[a] * f) > 1e-3 * res_i[a] for a in (0, 1)):
            raise MetroemError(
                f"mask layer {self.path} is {res_m[0]:g} x {res_m[1]:g} nm per pixel at MIP "
                f"{mip}, the images {res_i[0]:g} x {res_i[1]:g} nm at MIP {image_mip}: expected "
                f"{res_i[0] * f:g} x {res_i[1] * f:g}; give a mask of the image layer's grid")
        ox, oy, oz = images.offset[image_mip]
        sx, sy, sz = images.size[image_mip]
        mx, my, mz = info.offset[mip]
        nx, ny, nz = info.size[mip]
        inside = (mx * f <= ox and my * f <= oy and (mx + nx) * f >= ox + sx
                  and (my + ny) * f >= oy + sy)
        if not inside:
            raise MetroemError(
                f"mask layer {self.path} covers x [{mx * f}, {(mx + nx) * f}) y [{my * f}, "
                f"{(my + ny) * f}) but the images x [{ox}, {ox + sx}) y [{oy}, {oy + sy}) (pixels "
                f"at MIP {image_mip}); give a mask of the image layer's size")
        outside = [z for z in zs if not mz <= z < mz + nz]
        if outside:
            raise MetroemError(f"mask layer {self.path} has no section {outside[0]} (z range "
                               f"[{mz}, {mz + nz})); give a mask for every section aligned")
        return MaskLayer(volumes.normalize_path(self.path), mip, float(self.threshold),
                         bool(self.split))

    def source(self, section, image_mip: int, z: int):
        """``section`` (a :class:`metroem.tiling.VolumeSource` of section ``z``) with this
        layer's defects read as no data."""
        from metroem import tiling

        mask = tiling.VolumeMaskSource(self.path, self.mip, image_mip, z,
                                       (section.x_off, section.y_off))
        return MaskedSource(section, mask, self.threshold)

    def has_defects(self, z: int) -> bool:
        """Whether section ``z`` of the mask marks any pixel (read at the mask's MIP)."""
        from metroem import tiling

        m = tiling.VolumeSource(self.path, self.mip, z)
        rows = max(1, 2**24 // max(1, m.shape[1]))
        return any(np.any(m.read(y, 0, min(rows, m.shape[0] - y), m.shape[1]) > self.threshold)
                   for y in range(0, m.shape[0], rows))

    def pieces(self, masked_section, z: int, height: int, width: int) -> PieceMap | None:
        """The pieces of a masked section when ``split`` is on and its defects cut it apart,
        else ``None``."""
        if not self.split or not self.has_defects(z):
            return None
        found = piece_map(masked_section, height, width)
        return found if found.count >= 2 else None
