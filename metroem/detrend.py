"""Removing the drift a serial stack alignment accumulates (detrending along z).

A serial aligner puts each section onto the aligned one before it, so whatever every pair gets
wrong in the same direction adds up along z. Neighbouring sections show different tissue, and
tissue that runs obliquely through the stack looks like a small shift or shear between any two
sections, always the same way; no pair-wise method can tell it from a real distortion, and
after a few hundred sections the aligned stack has slid or sheared far from where the sections
were cut.

When the sections were placed independently (serial-section TEM, ATUM tape: each section is
picked up and imaged on its own), the raw stack has no drift of its own, so the slow trend of
the aligned stack's placement along z is the aligner's, and can be taken out. Per section,
the affine part of its whole field (a least-squares fit over the pixels where the aligned
section has data) is its placement. A Gaussian-weighted local linear fit along z of those
placements (``sigma`` sections; a straight line through a stack shorter than ``sigma``) is
the trend ``T_z``. Each section's field is then composed with ``T_z^-1 T_ref``: the trend is
removed, the reference section stays fixed, and what changes from one section to the next is
only the trend's own small step, so neighbouring sections still line up.

This is wrong for stacks whose raw sections drift as a whole (block-face imaging, FIB-SEM and
SBEM stage drift): there the trend is real and must stay. It is therefore an option, off by
default (``metroem align --detrend_sections S``). Measured: ``benchmarks/stack.py``.

Coordinates: pixels at the field's MIP, centred on the section, ``x`` along the last tensor
axis; an affine map is a 3 x 3 matrix acting on ``(x, y, 1)``. :class:`AffineSums` collects the
fit's normal equations chunk by chunk, so a whole section in memory and a chunked volume give
the same placement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from metroem import fields
from metroem.errors import MetroemError

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["AffineSums", "check_sigma", "corrections", "correction_field", "detrend_fields",
           "half_diagonal", "trend"]

MIN_PIXELS = 16  # a section with fewer data pixels has no placement (it is not in the fit)
# a trend that scales a section's area by more than this (or less than its inverse) means the
# serial alignment itself has collapsed or blown up; inverting it magnifies every error
COLLAPSED_AREA = 2.0


def check_sigma(sigma: float | None) -> float | None:
    """``sigma`` (sections) if it is usable, ``None`` for off; a one-line error otherwise."""
    if sigma is None:
        return None
    s = float(sigma)
    if not s > 0 or math.isnan(s):
        raise MetroemError(f"--detrend_sections must be a positive number of sections, got "
                           f"{sigma}; leave it out to keep the serial alignment as it is")
    return s


def _coords(y0: int, x0: int, h: int, w: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Centred pixel coordinates ``(x, y)`` of a window of a ``height x width`` section."""
    ys = torch.arange(y0, y0 + h, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(x0, x0 + w, dtype=torch.float64) - (width - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return gx, gy


class AffineSums:
    """Normal equations of the least-squares affine fit ``f(p) ~ A (x, y, 1)`` of one section's
    field over a mask, added up window by window (:meth:`add`) and saved as a flat list
    (:meth:`to_list` / :meth:`from_list`, what a chunk marker keeps)."""

    SIZE = 9 + 6 + 1

    def __init__(self, height: int, width: int, values: Sequence[float] | None = None):
        self.height, self.width = height, width
        v = np.zeros(self.SIZE) if values is None else np.asarray(values, np.float64)
        if v.shape != (self.SIZE,):
            raise ValueError(f"affine sums have {self.SIZE} values, got {v.shape}")
        self.values = v.copy()

    def add(self, field: Tensor, mask: Tensor, y0: int = 0, x0: int = 0) -> None:
        """Add the pixels of ``mask`` (``(h, w)`` bool) of a window ``field`` ``(1, 2, h, w)``
        whose top-left pixel is ``(y0, x0)`` of the section."""
        h, w = field.shape[-2:]
        m = mask.reshape(h, w).bool()
        if not bool(m.any()):
            return
        gx, gy = _coords(y0, x0, h, w, self.height, self.width)
        d = torch.stack((gx[m], gy[m], torch.ones_like(gx[m])), 1)  # (n, 3)
        f = field[0].double()[:, m].T  # (n, 2)
        self.values[:9] += (d.T @ d).reshape(-1).numpy()
        self.values[9:15] += (d.T @ f).reshape(-1).numpy()
        self.values[15] += float(m.sum())

    def merge(self, other: AffineSums) -> None:
        self.values += other.values

    @property
    def pixels(self) -> int:
        return int(self.values[15])

    def placement(self) -> np.ndarray | None:
        """The 3 x 3 matrix of ``p -> p + f(p)`` fitted over the added pixels (``None`` when
        there are too few, or they lie on a line)."""
        if self.pixels < MIN_PIXELS:
            return None
        dtd = self.values[:9].reshape(3, 3)
        dtf = self.values[9:15].reshape(3, 2)
        if np.linalg.cond(dtd) > 1e12:
            return None
        coef = np.linalg.solve(dtd, dtf)  # (3, 2): f = (x, y, 1) @ coef
        m = np.eye(3)
        m[:2, :] += coef.T
        return m

    def to_list(self) -> list[float]:
        return [float(v) for v in self.values]

    @classmethod
    def from_list(cls, height: int, width: int, values: Sequence[float]) -> AffineSums:
        return cls(height, width, values)


ROBUST_ITERATIONS = 3  # reweightings of the trend fit
TUKEY_C = 4.685  # Tukey's biweight constant, in robust standard deviations
MIN_SCALE_PX = 0.5  # the residual scale is at least this (a stack right on its trend)


def _local_linear(z: np.ndarray, params: np.ndarray, weights: np.ndarray,
                  sigma: float) -> np.ndarray:
    """At every position, the value of a local linear fit of ``params`` ``(n, 6)`` with the
    Gaussian weights of ``sigma`` times ``weights`` (a weighted mean where no slope fits)."""
    n = len(z)
    out = np.zeros((n, 6))
    for i in range(n):
        wts = weights * np.exp(-0.5 * ((z - z[i]) / sigma) ** 2)
        if wts.sum() <= 1e-12:
            out[i] = np.array([1, 0, 0, 0, 1, 0], dtype=np.float64)  # the identity
            continue
        x = np.stack((np.ones(n), z - z[i]), 1)
        a = x.T @ (wts[:, None] * x)
        b = x.T @ (wts[:, None] * params)
        if (wts > 1e-12).sum() < 2 or np.linalg.cond(a) > 1e10:
            out[i] = b[0] / a[0, 0]
        else:
            out[i] = np.linalg.solve(a, b)[0]
    return out


def trend(placements: Sequence[np.ndarray | None], sigma: float,
          positions: Sequence[float] | None = None,
          extent: float = 0.0) -> list[np.ndarray]:
    """The smooth trend along z of the placements (``None`` = not in the fit): at every
    position, a local linear fit of the six affine parameters with Gaussian weights of
    ``sigma`` sections, made robust by Tukey biweights (a section whose placement is far off
    the trend, a lost pair the guard missed, does not drag its neighbours' correction).
    A placement's distance from the trend is the largest displacement between the two maps
    within ``extent`` px of the centre (the translation alone for 0). With fewer than two
    placements the trend is constant (their mean, or the identity)."""
    n = len(placements)
    z = np.arange(n, dtype=np.float64) if positions is None else np.asarray(positions, float)
    have = np.array([p is not None for p in placements], dtype=np.float64)
    params = np.stack([p[:2].reshape(-1) if p is not None else np.zeros(6)
                       for p in placements]) if n else np.zeros((0, 6))
    robust = np.ones(n)
    fit = _local_linear(z, params, have, sigma)
    for _ in range(ROBUST_ITERATIONS if have.sum() > 2 else 0):
        d = (params - fit).reshape(n, 2, 3)
        resid = np.linalg.norm(d[:, :, 2], axis=1) + extent * np.linalg.norm(d[:, :, :2],
                                                                            axis=(1, 2))
        scale = max(1.4826 * float(np.median(resid[have > 0])), MIN_SCALE_PX)
        u = resid / (TUKEY_C * scale)
        robust = np.where(u < 1, (1 - u**2) ** 2, 0.0)
        fit = _local_linear(z, params, have * robust, sigma)
    out = []
    for row in fit:
        t = np.eye(3)
        t[:2] = row.reshape(2, 3)
        out.append(t)
    return out


def _warn_if_collapsed(t: Sequence[np.ndarray], positions: Sequence[float] | None) -> None:
    """Log once when the trend scales a section's area far from 1: the serial fields have
    shrunk or stretched the stack (unsmoothed fields accumulating shear, say), and removing
    such a trend magnifies the errors instead of taking out drift."""
    area = np.array([abs(float(np.linalg.det(tz[:2, :2]))) for tz in t])
    worst = int(np.argmax(np.abs(np.log(np.maximum(area, 1e-12)))))
    if not (1 / COLLAPSED_AREA <= area[worst] <= COLLAPSED_AREA):
        z = worst if positions is None else positions[worst]
        log.warning("detrending: the serial alignment's trend scales section %s's area by "
                    "%.2f; the serial fields have collapsed the stack and detrending cannot "
                    "undo that; align with field smoothing (--smoothing_nm, on by default) "
                    "and check the sections around it", z, area[worst])


def corrections(placements: Sequence[np.ndarray | None], sigma: float, reference: int = 0,
                positions: Sequence[float] | None = None,
                extent: float = 0.0) -> list[np.ndarray]:
    """Per section, the affine map ``C_z = T_z^-1 T_ref`` its field is composed with: the
    trend (:func:`trend`) is removed and the reference section (index ``reference``) keeps
    its field."""
    t = trend(placements, sigma, positions, extent)
    if not t:
        return []
    _warn_if_collapsed(t, positions)
    ref = t[reference]
    out = [np.linalg.solve(tz, ref) for tz in t]
    out[reference] = np.eye(3)  # exactly: the reference's field stays what it is
    return out


def half_diagonal(height: int, width: int) -> float:
    """Half the diagonal of a section (px): how far from its centre a placement is judged."""
    return 0.5 * math.hypot(height, width)


def correction_field(c: np.ndarray, y0: int, x0: int, h: int, w: int, height: int,
                     width: int) -> Tensor:
    """The displacement ``C p - p`` of a window of the section, ``(1, 2, h, w)`` float32."""
    gx, gy = _coords(y0, x0, h, w, height, width)
    cx = c[0, 0] * gx + c[0, 1] * gy + c[0, 2] - gx
    cy = c[1, 0] * gx + c[1, 1] * gy + c[1, 2] - gy
    return torch.stack((cx, cy))[None].float()


def detrend_fields(whole: Sequence[Tensor], aligned: Sequence[Tensor], sigma: float,
                   exclude: Sequence[int] = ()) -> list[Tensor]:
    """Whole fields ``(1, 2, H, W)`` of a serially aligned stack (index 0 the reference) with
    their trend along z removed; ``aligned`` are the aligned images (the fit uses the pixels
    where they hold data), ``exclude`` sections left out of the fit (no data, misaligned)."""
    sigma = check_sigma(sigma)
    if not whole:
        return []
    h, w = whole[0].shape[-2:]
    placements = []
    for i, (f, img) in enumerate(zip(whole, aligned, strict=True)):
        s = AffineSums(h, w)
        if i not in set(exclude):
            s.add(f.float(), img.reshape(h, w) != 0)
        placements.append(s.placement())
    out = []
    for f, c in zip(whole, corrections(placements, sigma, extent=half_diagonal(h, w)),
                    strict=True):
        out.append(fields.compose(f.float(), correction_field(c, 0, 0, h, w, h, w)))
    return out
