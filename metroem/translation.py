"""Global translation between two images by phase correlation, in torch.

A pyramid's coarse stage searches a limited window around the incoming field; a drift larger
than that window, or a small image whose coarsest level has only a few cells, can lock onto a
far match. One global translation found first by cross-correlation over the whole image (the
classical first step of SOFIMA, FEABAS and the ``+pc`` baselines) starts the pyramid within
reach. :func:`phase_translation` returns the shift ``t`` with ``src(p + t) ~ tgt(p)``: a
constant pull field in pixels, channel 0 = x (:mod:`metroem.fields`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metroem import fields
from metroem.nets import normalize_image_local

Tensor = torch.Tensor

__all__ = ["phase_translation", "translation_field"]


SHADING_FRACTION = 1 / 8  # the local normalisation's window, as a share of the image's size


def _flattened(img: Tensor) -> Tensor:
    """Each pixel less the mean and over the standard deviation of a Gaussian window of
    :data:`SHADING_FRACTION` of the image (over data pixels; no data stays 0): an illumination
    gradient or shading, which dominates a plain cross-correlation (a ramp correlates best
    with itself, unshifted), is taken out, the tissue's structure is kept."""
    h, w = img.shape[-2:]
    return normalize_image_local(img, max(h, w) * SHADING_FRACTION, factor=4,
                                 nodata_aware=True)[0]  # already 0 where there is no data


def _normalized(img: Tensor) -> Tensor:
    """Zero mean, unit variance over the nonzero pixels of :func:`_flattened` ``img``; no data
    stays 0."""
    valid = (img != 0).to(img.dtype)
    img = _flattened(img)
    count = valid.sum((-2, -1), keepdim=True).clamp_min(1)
    mean = (img * valid).sum((-2, -1), keepdim=True) / count
    var = ((img - mean) ** 2 * valid).sum((-2, -1), keepdim=True) / count
    return (img - mean) / var.sqrt().clamp_min(1e-6) * valid


def _subpixel(c_minus: Tensor, c0: Tensor, c_plus: Tensor) -> Tensor:
    """Vertex of the parabola through three samples around a peak, in [-0.5, 0.5]."""
    denom = c_minus - 2 * c0 + c_plus
    off = torch.where(denom < 0, 0.5 * (c_minus - c_plus) / denom.clamp(max=-1e-12),
                      torch.zeros_like(c0))
    return off.clamp(-0.5, 0.5)


def phase_translation(src: Tensor, tgt: Tensor, max_size: int = 512) -> Tensor:
    """``(N, 2)`` shifts (x, y) in pixels of the inputs such that ``src(p + t) ~ tgt(p)``.

    Images are ``(N, 1, H, W)`` with 0 = no data. They are box-averaged by powers of two until
    both sides are at most ``max_size`` (fast on any image, sub-pixel refined there), normalised
    locally (:func:`_flattened`: shading does not count) and over their data, and
    cross-correlated through the FFT with zero padding (no wrap-around); each shift scores the
    significance of its correlation over the pixels the two images share (at least a quarter
    of the smaller one's data), so a match over the whole image beats an equally good one over
    part of it; the peak is refined with a parabola per axis. Items without data get 0.
    """
    src = src.float()
    tgt = tgt.float()
    factor = 1
    while max(src.shape[-2:]) > max_size:
        src = _masked_half(src)
        tgt = _masked_half(tgt)
        factor *= 2
    n, _, h, w = src.shape
    s, t = _normalized(src), _normalized(tgt)
    fh, fw = 2 * h, 2 * w  # zero padding: a linear, not circular, correlation
    cross = torch.fft.irfft2(
        torch.fft.rfft2(s, s=(fh, fw)).conj() * torch.fft.rfft2(t, s=(fh, fw)), s=(fh, fw)
    )[:, 0]  # cross[d] = sum_p s(p) t(p + d): t(p) ~ s(p - d), so the pull shift is -d
    # score each shift by the significance of its correlation, r sqrt(n) ~ cross / sqrt(n) over
    # its n overlapping pixels: the mean (cross / n) lets a shift whose overlap is half the
    # image tie with no shift when the two halves look alike (repeated or neighbouring
    # tissue), the plain sum lets large overlaps win whatever their correlation
    ones_s, ones_t = (src != 0).float(), (tgt != 0).float()
    overlap = torch.fft.irfft2(
        torch.fft.rfft2(ones_s, s=(fh, fw)).conj() * torch.fft.rfft2(ones_t, s=(fh, fw)),
        s=(fh, fw),
    )[:, 0]
    min_overlap = 0.25 * torch.minimum(ones_s.sum((-3, -2, -1)), ones_t.sum((-3, -2, -1)))
    score = torch.where(overlap > min_overlap.view(n, 1, 1), cross / overlap.clamp_min(1).sqrt(),
                        torch.full_like(cross, -1e9))
    flat = score.reshape(n, -1).argmax(1)
    py, px = flat // fw, flat % fw
    out = torch.zeros(n, 2)
    for i in range(n):
        y, x = int(py[i]), int(px[i])
        sc = score[i]
        oy = _subpixel(sc[(y - 1) % fh, x], sc[y, x], sc[(y + 1) % fh, x])
        ox = _subpixel(sc[y, (x - 1) % fw], sc[y, x], sc[y, (x + 1) % fw])
        dy = (y if y < fh // 2 else y - fh) + float(oy)
        dx = (x if x < fw // 2 else x - fw) + float(ox)
        has_data = bool(ones_s[i].any()) and bool(ones_t[i].any())
        out[i] = torch.tensor([-dx, -dy]) * factor if has_data else 0.0
    return out.to(device=src.device)


def _masked_half(img: Tensor) -> Tensor:
    """:func:`metroem.fields.downsample_image` by one MIP, odd sizes padded with no data."""
    h, w = img.shape[-2:]
    return fields.downsample_image(F.pad(img, (0, w % 2, 0, h % 2)), 1)


def translation_field(shift: Tensor, h: int, w: int) -> Tensor:
    """``(N, 2)`` shifts as constant pull fields ``(N, 2, H, W)``."""
    return shift.view(-1, 2, 1, 1).expand(-1, 2, h, w).contiguous()
