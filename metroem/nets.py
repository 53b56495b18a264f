"""The stage aligner network, built from a JSON-serialisable spec.

One pyramid stage is one :class:`StageAligner`. It is called like a corgie processor::

    field = model(src_img, tgt_img, src_agg_field=None)   # extra keyword arguments ignored

Images are ``(N, 1, H, W)`` of any dtype with raw values (0 = no data); the result is the
*saturated* field ``(N, 2, H, W)`` in pixels of the stage's MIP: the incoming field composed with
the residual the network predicts on the source warped once by the incoming field.

Architecture (see docs/nets_and_losses.md):

1. normalise both images over their valid pixels (no-data stays 0) and feed (image, validity);
2. a siamese conv encoder (shared weights) makes a feature pyramid at 1, 1/2, 1/4, ... ;
3. optionally a global translation head at the coarsest level: an image-wide cost volume over a
   search radius, soft-argmax -> one translation per item;
4. coarse-to-fine refinement: at each level warp the source features by the current field, take
   a local correlation, a small conv head predicts a residual (optionally Gaussian-smoothed)
   that is composed onto the field;
5. the field is upsampled from the finest refined level to full resolution.

Architectures are versioned by name (``ARCHITECTURES``): a module folder's spec names the one
its weights were trained with, and tests/test_golden.py pins the shipped pyramids' fields.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fields

Tensor = torch.Tensor

ARCH = "metroem-stage-v1"

_DEFAULTS: dict = {
    "arch": ARCH,  # architecture name; checked on build
    # encoder channels of levels 1, 2, ... (level i is at 1/2^i resolution); level 0 is the image
    "channels": [8, 16, 24, 32],
    "finest_level": 1,  # finest level refined (0..len(channels)); upsampled from there
    # Local normalisation makes a stage's output depend only on a bounded neighbourhood, so tiled
    # inference equals whole-image inference; "global" normalises over the whole input.
    "normalization": "local",  # local | global
    "norm_sigma": 64.0,  # local: Gaussian window (std) of the mean/variance, pixels of the stage
    # Image-wide translation head at the coarsest level. Off by default: the block-matching
    # prior already covers large shifts, and an image-wide estimate is not tile-invariant.
    "global_translation": False,
    "global_radius": 4,  # its search radius, in coarsest-level pixels
    "global_temperature": 5.0,  # initial softmax temperature on standardised scores (learned)
    "local_radius": [1, 1, 2, 2, 2],  # local correlation radius per level 0..L (or one int)
    "head_channels": [8, 8, 12, 16, 16],  # residual head hidden channels per level 0..L (or int)
    "concat_features": False,  # also feed target + warped source features to the heads
    "smooth_output": True,  # Gaussian-blur each residual (cuts folds)
    "smooth_sigma": 1.0,  # its standard deviation, in pixels of the level
    # Per-level override of smooth_sigma: null, or one number >= 0 per level 0..L (0 = no
    # blur there). Parameter-free, so trained weights can run with it: a wider blur at the
    # coarse levels keeps their block matching from jumping to a far, wrong match where
    # neighbouring sections have no consistent correspondence (docs/nets_and_losses.md).
    "level_smooth_sigma": None,
    # Block-matching prior: at each level the residual starts as the soft-argmax of a local NCC
    # cost volume of the image pyramid (high-passed, aggregated over a Gaussian window), and the
    # head (which also sees that cost volume) learns a correction. An untrained net is then
    # already a multi-scale block matcher, which makes training far faster.
    "local_prior": True,
    "prior_sigma": 5.0,  # NCC window (Gaussian std), level pixels
    "prior_temperature": 4.0,  # initial softmax temperature on standardised scores (learned)
    # The NCC window sums on a grid this many times coarser than the level (a power of two),
    # interpolated back: for a window of several pixels nearly the same cost volume for a
    # fraction of the CPU time. Used at the levels fine enough that the coarse grid stays on
    # the stage's tiling grid (``StageAligner.grid``). Parameter-free: trained weights run with
    # any value.
    "prior_factor": 1,
    "global_gain_init": 1.0,  # initial gain of the global translation head (0 = identity)
    # Sub-pixel refinement: after the learned levels, this many parameter-free Lucas-Kanade
    # (Gauss-Newton) steps on the full-resolution normalised images, each solving a 2x2 system
    # per pixel over a Gaussian window. Closes the last fraction of a pixel that soft-argmax
    # block matching leaves; 0 = off.
    "lk_iterations": 0,
    # Gaussian blur (std, stage pixels) of the stage's residual (applied at the finest refined
    # level, before upsampling and the Lucas-Kanade steps): removes the small swirls a net
    # trained on a similarity loss draws to match texture; 0 = off.
    "residual_sigma": 0.0,
    "lk_sigma": 4.0,  # its window (Gaussian std), pixels of the stage
    # Run the whole stage this many times, each pass from the field the previous one produced
    # (the source is warped once per pass from the raw source). On neighbouring sections a
    # pass corrects only part of a misalignment, so a second pass of a cheap coarse stage makes
    # the pyramid more consistent (docs/nets_and_losses.md). Parameter-free: trained weights
    # can be run with any value.
    "iterations": 1,
    # false: the stage runs only its Lucas-Kanade steps (lk_iterations >= 1), from zero or the
    # incoming field, and not its encoder or learned levels (their weights stay in the module,
    # unused): a fine stage that only sharpens what the coarser stages found, for a fraction of
    # the time (benchmarks/results/speed.md). Parameter-free: switch it either way by editing
    # the spec.
    "learned_levels": True,
    # Treat no-data like the outside of the image everywhere: encoder and head activations are
    # zeroed where a level has no data (as the convolutions' zero padding is outside), the NCC
    # sums, residual blurs and Lucas-Kanade sums are normalised over data with zero padding,
    # and the LK weight is eroded by a pixel. A section padded with no-data then gives nearly
    # the field it gives alone (docs/nets_and_losses.md, step 12). Parameter-free.
    "nodata_aware": False,
}

# The parameter-free refinements above switched off: the recipes train with these and switch
# the refinements on afterwards (``make isbi``), so the learned levels are trained on their own.
REFINEMENTS_OFF: dict = {
    "lk_iterations": 0,
    "residual_sigma": 0.0,
    "iterations": 1,
    "level_smooth_sigma": None,
    "learned_levels": True,
    # Treat no-data like the outside of the image everywhere: encoder and head activations are
    # zeroed where a level has no data (as the convolutions' zero padding is outside), the NCC
    # sums, residual blurs and Lucas-Kanade sums are normalised over data with zero padding,
    # and the LK weight is eroded by a pixel. A section padded with no-data then gives nearly
    # the field it gives alone (docs/nets_and_losses.md, step 12). Parameter-free.
    "nodata_aware": False,
}


_PER_LEVEL = ("local_radius", "head_channels")  # lists with one entry per level 0..L


def default_spec(**over) -> dict:
    """The default spec with ``over`` applied; unknown keys raise ``ValueError``.

    ``levels=k`` is a shorthand: keep the first ``k - 1`` default encoder channel counts (and
    per-level lists), so the pyramid has levels 0..k-1.
    """
    spec = copy.deepcopy(_DEFAULTS)
    levels = over.pop("levels", None)
    for key in over:
        if key not in spec:
            raise ValueError(f"unknown nets spec key {key!r}; known: {sorted(spec) + ['levels']}")
    spec.update(copy.deepcopy(over))
    if levels is not None:
        if not isinstance(levels, int) or not 2 <= levels <= len(_DEFAULTS["channels"]) + 1:
            raise ValueError(f"levels must be 2..{len(_DEFAULTS['channels']) + 1}, got {levels}")
        if "channels" not in over:
            spec["channels"] = spec["channels"][: levels - 1]
    # Per-level lists that were not given follow the number of levels: trimmed, or extended
    # with their last (coarsest) value.
    n_levels = len(spec["channels"]) + 1
    for key in _PER_LEVEL:
        value = spec[key]
        if isinstance(value, list) and key not in over and len(value) != n_levels:
            spec[key] = (value + [value[-1]] * n_levels)[:n_levels]
    return validate_spec(spec)


def validate_spec(spec: dict) -> dict:
    """Return a complete, checked copy of ``spec`` (defaults filled in) or raise ValueError."""
    if not isinstance(spec, dict):
        raise ValueError(f"nets spec must be a dict, got {type(spec).__name__}")
    for key in spec:
        if key not in _DEFAULTS:
            raise ValueError(f"unknown nets spec key {key!r}; known: {sorted(_DEFAULTS)}")
    out = copy.deepcopy(_DEFAULTS)
    out.update(copy.deepcopy(spec))
    if out["arch"] != ARCH:
        raise ValueError(f"nets spec arch {out['arch']!r} is not {ARCH!r}")
    ch = out["channels"]
    if not isinstance(ch, list) or not ch or not all(isinstance(c, int) and c > 0 for c in ch):
        raise ValueError(f"channels must be a non-empty list of positive ints, got {ch!r}")
    levels = len(ch) + 1
    if not isinstance(out["finest_level"], int) or not 0 <= out["finest_level"] < levels:
        raise ValueError(f"finest_level must be an int in 0..{levels - 1}")
    if not out["learned_levels"] and out["lk_iterations"] == 0:
        raise ValueError("learned_levels: false leaves only the Lucas-Kanade steps: set "
                         "lk_iterations >= 1")
    if not isinstance(out["global_radius"], int) or out["global_radius"] < 1:
        raise ValueError(f"global_radius must be an int >= 1, got {out['global_radius']!r}")
    for key in _PER_LEVEL:
        v = out[key]
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        ok = ok or (
            isinstance(v, list)
            and len(v) == levels
            and all(isinstance(i, int) and i >= 1 for i in v)
        )
        if not ok:
            raise ValueError(
                f"{key} must be an int >= 1 or a list of {levels} such ints "
                f"(levels 0..{levels - 1}), got {v!r}"
            )
    if out["normalization"] not in ("local", "global"):
        raise ValueError(f"normalization must be 'local' or 'global', got {out['normalization']!r}")
    for key in (
        "global_temperature", "smooth_sigma", "prior_sigma", "prior_temperature", "norm_sigma",
        "lk_sigma",
    ):
        if not isinstance(out[key], (int, float)) or out[key] <= 0:
            raise ValueError(f"{key} must be a positive number, got {out[key]!r}")
    lss = out["level_smooth_sigma"]
    if lss is not None and not (
        isinstance(lss, list)
        and len(lss) == levels
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in lss)
    ):
        raise ValueError(
            f"level_smooth_sigma must be null or a list of {levels} numbers >= 0 "
            f"(levels 0..{levels - 1}), got {lss!r}"
        )
    rs = out["residual_sigma"]
    if not isinstance(rs, (int, float)) or isinstance(rs, bool) or rs < 0:
        raise ValueError(f"residual_sigma must be a number >= 0, got {rs!r}")
    it = out["lk_iterations"]
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        raise ValueError(f"lk_iterations must be an int >= 0, got {it!r}")
    pf = out["prior_factor"]
    if not isinstance(pf, int) or isinstance(pf, bool) or pf < 1 or pf & (pf - 1):
        raise ValueError(f"prior_factor must be a power of two >= 1, got {pf!r}")
    it = out["iterations"]
    if not isinstance(it, int) or isinstance(it, bool) or it < 1:
        raise ValueError(f"iterations must be an int >= 1, got {it!r}")
    g = out["global_gain_init"]
    if not isinstance(g, (int, float)) or isinstance(g, bool) or g < 0:
        raise ValueError(f"global_gain_init must be a number >= 0, got {g!r}")
    for key in ("global_translation", "concat_features", "smooth_output", "local_prior",
                "learned_levels", "nodata_aware"):
        if not isinstance(out[key], bool):
            raise ValueError(f"{key} must be true or false, got {out[key]!r}")
    return out


def build_model(spec: dict | None = None) -> nn.Module:
    """Build the stage network ``spec["arch"]`` names (default: the current architecture).

    Missing keys take the architecture's defaults; unknown keys and unknown architectures raise
    ``ValueError``. Architectures are versioned: a trained spec keeps its ``arch`` name, and an
    architecture whose computation changes gets a new name (the golden tests pin the old ones).
    """
    spec = {} if spec is None else spec
    arch = spec.get("arch", ARCH) if isinstance(spec, dict) else ARCH
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; this metroem knows {', '.join(ARCHITECTURES)} "
            "(a newer metroem may have written the spec)"
        )
    return ARCHITECTURES[arch](spec)


def check_same_parameters(old: dict, new: dict) -> None:
    """Raise ``ValueError`` unless both specs build and their networks take the same weights."""
    a, b = build_model(old).state_dict(), build_model(new).state_dict()
    if {k: v.shape for k, v in a.items()} != {k: v.shape for k, v in b.items()}:
        raise ValueError("the new spec's network has different parameters")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# building blocks


# The convolutions run channels-last (weights and inputs): with a handful of channels per pixel
# oneDNN's channels-last kernels take about half the CPU time of NCHW ones (docs/inference.md,
# benchmarks/results/speed.md), for the same values up to float rounding.
CONV_FORMAT = torch.channels_last


def _masked_sequential(layers: nn.Sequential, x: Tensor, mask: Tensor) -> Tensor:
    """``layers(x)`` with every activation zeroed where ``mask`` (0/1) has no data."""
    for layer in layers:
        x = layer(x)
        if not isinstance(layer, nn.Conv2d):
            x = x * mask
    return x


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1)


def normalize_image(img: Tensor) -> tuple[Tensor, Tensor]:
    """``(normalised, valid)``: zero mean, unit variance per item over pixels != 0; invalid -> 0."""
    x = img.float()
    valid = (x != 0).float()
    count = valid.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
    mean = (x * valid).sum(dim=(1, 2, 3), keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
    out = (x - mean) / var.sqrt().clamp_min(1e-6) * valid
    return out, valid


# Local normalisation takes its statistics on a grid this many times coarser than the image.
NORM_FACTOR = 8


def normalize_image_local(
    img: Tensor, sigma: float, factor: int = NORM_FACTOR, nodata_aware: bool = False
) -> tuple[Tensor, Tensor]:
    """``(normalised, valid)`` with the mean and variance of a Gaussian window over valid pixels.

    The statistics are computed on a ``factor``-times coarser grid (box sums, Gaussian blur with
    zero padding divided by the blurred validity) and interpolated back, which keeps the cost low
    and the result local: a pixel depends only on its neighbourhood, so tiles agree with the
    whole image away from their borders (tile origins on multiples of ``factor``).
    ``nodata_aware`` extends the statistics from the coarse cells with data into those without
    (:func:`metroem.fields.fill_nodata`) before interpolating, so that pixels next to no-data
    are normalised as pixels at the image border are.
    """
    x = img.float()
    valid = (x != 0).float()
    h, w = x.shape[-2:]
    ph, pw = (-h) % factor, (-w) % factor
    xp, vp = (F.pad(t, (0, pw, 0, ph)) for t in (x, valid))
    s1 = F.avg_pool2d(xp, factor)  # x is 0 wherever it has no data: x * valid == x
    s2 = F.avg_pool2d(xp * xp, factor)
    s0 = F.avg_pool2d(vp, factor)
    k = _gaussian_kernel(max(sigma / factor, 0.5)).to(x)
    b0 = gaussian_blur(s0, k, "constant").clamp_min(1e-6)
    mean = gaussian_blur(s1, k, "constant") / b0
    var = (gaussian_blur(s2, k, "constant") / b0 - mean**2).clamp_min(0)
    stats = torch.cat((mean, var), 1)
    if nodata_aware:
        stats = fields.fill_nodata(stats, s0)
    stats = F.interpolate(stats, scale_factor=float(factor), mode="bilinear",
                          align_corners=False)[..., :h, :w]
    std = stats[:, 1:2].sqrt().clamp_min(1e-3 * (stats[:, :1].abs() + 1))
    return (x - stats[:, :1]) / std * valid, valid


def _shifted(x: Tensor, radius: int) -> list[Tensor]:
    """``x(p + d)`` for every shift ``d`` in ``[-r, r]^2`` (zeros outside), row-major over
    ``dy`` then ``dx``."""
    h, w = x.shape[-2], x.shape[-1]
    xp = F.pad(x, (radius, radius, radius, radius))
    out: list[Tensor] = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out.append(xp[..., radius + dy : radius + dy + h, radius + dx : radius + dx + w])
    return out


def local_correlation(tgt: Tensor, src: Tensor, radius: int) -> Tensor:
    """Cost volume ``(N, (2r+1)^2, H, W)``: channel-mean of ``tgt(p) * src(p + d)`` per shift d.

    Shifts are ordered row-major over ``dy`` then ``dx`` in ``[-r, r]``.
    """
    return torch.stack([(tgt * s).mean(1) for s in _shifted(src, radius)], dim=1)


def soft_argmax_translation(scores: Tensor, radius: int, temperature: Tensor) -> Tensor:
    """Expected shift ``(N, 2)`` (x, y) under ``softmax(temperature * standardised scores)``.

    ``scores`` is ``(N, (2r+1)^2)`` ordered like :func:`local_correlation`. Standardising the
    scores per item makes the temperature independent of the feature scale.
    """
    centred = scores - scores.mean(1, keepdim=True)
    # sqrt(var + eps) keeps the gradient bounded when all scores are (nearly) equal.
    z = centred / torch.sqrt((centred**2).mean(1, keepdim=True) + 1e-6)
    prob = torch.softmax(z * temperature, dim=1)
    d = torch.arange(-radius, radius + 1, device=scores.device, dtype=scores.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    shifts = torch.stack((dx.reshape(-1), dy.reshape(-1)), dim=1)  # ((2r+1)^2, 2)
    return prob @ shifts


def _per_level(value: int | list[int], levels: int) -> list[int]:
    return list(value) if isinstance(value, list) else [value] * levels


def _gaussian_kernel(sigma: float) -> Tensor:
    r = max(1, math.ceil(2 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class Encoder(nn.Module):
    """Siamese feature pyramid. Level 0 is the normalised image itself (no full-resolution
    convolutions: they dominate CPU time); level ``i >= 1`` has ``channels[i - 1]`` channels at
    1/2^i resolution. Level 1 starts with a 4x4 stride-2 conv of (image, validity).
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        c0 = channels[0]
        blocks = [
            nn.Sequential(
                nn.Conv2d(2, c0, 4, stride=2, padding=1),
                _act(),
                nn.Conv2d(c0, c0, 3, padding=1),
                _act(),
            )
        ]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                    _act(),
                    nn.Conv2d(c_out, c_out, 3, padding=1),
                    _act(),
                )
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, masks: list[Tensor] | None = None) -> list[Tensor]:
        """``x`` is ``(B, 2, H, W)`` (image, validity); returns features of levels 0..L-1.

        ``masks`` (one ``(B, 1, h, w)`` 0/1 tensor per level 0..L) zero every activation where
        its level has no data, as the next convolution's padding is zero outside the image.
        """
        feats = [x[:, :1]]
        x = x.contiguous(memory_format=CONV_FORMAT)
        for i, block in enumerate(self.blocks):
            x = block(x) if masks is None else _masked_sequential(block, x, masks[i + 1])
            feats.append(x.contiguous())
        return feats


class GlobalTranslation(nn.Module):
    """One translation per item from an image-wide cost volume at the coarsest level.

    The score of shift d is the mean cosine similarity of ``tgt(p)`` and ``src(p + d)`` over
    pixels valid in both; a soft-argmax over standardised scores gives the translation. The
    output is scaled by a learned gain initialised at 0, so an untrained head is the identity.
    """

    def __init__(self, radius: int, temperature: float, gain: float = 0.0):
        super().__init__()
        self.radius = radius
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, ft: Tensor, fs: Tensor, vt: Tensor, vs: Tensor) -> Tensor:
        n, c, h, w = ft.shape
        r = self.radius
        # Summing tgt(p) * src(p + d) over p for every shift d is a cross-correlation of the
        # padded source with the target as kernel: one grouped conv per item.
        kern = (F.normalize(ft, dim=1) * vt).reshape(n, c, h, w)
        inp = F.pad(F.normalize(fs, dim=1) * vs, (r, r, r, r)).reshape(1, n * c, h + 2 * r, -1)
        total = F.conv2d(inp, kern, groups=n).reshape(n, -1)
        count = F.conv2d(F.pad(vs, (r, r, r, r)).reshape(1, n, h + 2 * r, -1), vt, groups=n)
        scores = total / count.reshape(n, -1).clamp_min(1)
        t = soft_argmax_translation(scores, r, self.log_temperature.exp())
        return t * self.gain


def local_soft_argmax(cost: Tensor, radius: int, temperature: Tensor) -> Tensor:
    """Per-pixel expected shift ``(N, 2, H, W)`` under a softmax over the cost volume's shifts.

    ``cost`` is ``(N, (2r+1)^2, H, W)`` ordered like :func:`local_correlation`; scores are
    standardised per pixel so the temperature does not depend on the feature scale.
    """
    centred = cost - cost.mean(1, keepdim=True)
    z = centred / torch.sqrt((centred**2).mean(1, keepdim=True) + 1e-6)
    prob = torch.softmax(z * temperature, dim=1)
    d = torch.arange(-radius, radius + 1, device=cost.device, dtype=cost.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    sx = (prob * dx.reshape(1, -1, 1, 1)).sum(1)
    sy = (prob * dy.reshape(1, -1, 1, 1)).sum(1)
    return torch.stack((sx, sy), dim=1)


def local_ncc_cost(
    tgt: Tensor, src: Tensor, radius: int, kernel: Tensor, factor: int = 1,
    coarse_kernel: Tensor | None = None, valid: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Local normalised cross-correlation ``(N, (2r+1)^2, H, W)`` of one-channel images.

    Both images are high-passed (minus their Gaussian-blurred selves); for each shift ``d`` the
    score is ``<t, s_d> / sqrt(<t, t> <s_d, s_d>)`` with ``<a, b>`` a Gaussian-weighted local sum.
    Ordered like :func:`local_correlation`. With ``factor > 1`` the local sums and the score are
    taken on a ``factor``-times coarser grid (box-averaged products blurred by
    ``coarse_kernel``, the window in coarse pixels) and the score is interpolated back.

    ``valid`` (0/1 masks of ``tgt`` and ``src``) treats pixels without data like the outside of
    the image: the high-pass subtracts the mean over data, is 0 without data, and every blur
    pads with zeros (otherwise the image border is replicated).
    """
    n = tgt.shape[0]
    both = torch.cat((tgt, src), 0)
    pad = "replicate"
    if valid is None:
        hp = both - gaussian_blur(both, kernel)
    else:
        pad = "constant"
        v = torch.cat(valid, 0)
        mean = gaussian_blur(both * v, kernel, pad) / gaussian_blur(v, kernel, pad).clamp_min(1e-6)
        hp = (both - mean) * v
    t, s = hp[:n], hp[n:]
    shifted = torch.cat(_shifted(s, radius), 1)  # (N, S, H, W)
    # One blur call for every local sum (a per-channel blur, so batching changes nothing).
    prods = torch.cat((t * t, t * shifted, shifted * shifted), 1)
    if valid is not None:  # windows sum over the target's data only, as inside the image
        prods = prods * valid[0]
    if factor > 1:
        assert coarse_kernel is not None
        sums = gaussian_blur(F.avg_pool2d(prods, factor, ceil_mode=True), coarse_kernel, pad)
    else:
        sums = gaussian_blur(prods, kernel, pad)
    k = shifted.shape[1]
    tt, num, ss = sums[:, :1], sums[:, 1 : 1 + k], sums[:, 1 + k :]
    ncc = num / torch.sqrt(tt * ss + 1e-4)
    if factor > 1:
        if valid is not None:  # next to no data, interpolate as at the image border
            ncc = fields.fill_nodata(ncc, F.avg_pool2d(valid[0], factor, ceil_mode=True))
        # a fixed scale (not a target size) keeps every fine pixel's place on the coarse grid
        # the same in a tile as in the whole image
        ncc = F.interpolate(ncc, scale_factor=float(factor), mode="bilinear",
                            align_corners=False)[..., : tgt.shape[-2], : tgt.shape[-1]]
    return ncc


def gaussian_blur(x: Tensor, kernel: Tensor, padding: str = "replicate") -> Tensor:
    """Separable blur of every channel with a 1-D kernel; ``padding`` is an ``F.pad`` mode
    (``replicate`` keeps a constant field constant, ``constant`` pads zeros)."""
    c = x.shape[1]
    r = kernel.numel() // 2
    x = F.pad(x, (r, r, 0, 0), mode=padding)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode=padding)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def masked_blur(x: Tensor, kernel: Tensor, mask: Tensor) -> Tensor:
    """:func:`gaussian_blur` normalised over ``mask`` (0/1) with zero padding: the weighted mean
    of the pixels with data, the same whether the rest is no-data or outside the image; 0 where
    no data is within reach."""
    num = gaussian_blur(x * mask, kernel, "constant")
    den = gaussian_blur(mask, kernel, "constant")
    return torch.where(den > 1e-3, num / den.clamp_min(1e-3), torch.zeros_like(num))


def _erode(mask: Tensor) -> Tensor:
    """0/1 ``mask`` without the pixels next to (8-neighbourhood) a 0 or the image border."""
    return (F.avg_pool2d(F.pad(mask, (1, 1, 1, 1)), 3, stride=1) > 1 - 1e-4).to(mask.dtype)


def _central_gradient(img: Tensor) -> tuple[Tensor, Tensor]:
    """``(d/dx, d/dy)`` by central differences (one-sided at the borders via replication)."""
    px = F.pad(img, (1, 1, 0, 0), mode="replicate")
    py = F.pad(img, (0, 0, 1, 1), mode="replicate")
    return (px[..., 2:] - px[..., :-2]) / 2, (py[..., 2:, :] - py[..., :-2, :]) / 2


def lucas_kanade_step(
    warped: Tensor, tgt: Tensor, weight: Tensor, kernel: Tensor, eps: float = 1e-2,
    factor: int = 1, padding: str = "replicate", tgt_valid: Tensor | None = None,
) -> Tensor:
    """Field update ``(N, 2, H, W)`` that moves ``warped`` (the source pulled by the current
    field) onto ``tgt`` to first order: per pixel, least squares over a Gaussian window of
    ``g . d = tgt - warped`` with ``g`` the mean gradient of both images and ``weight`` 0 where
    either has no data. ``eps`` regularises flat windows towards no update; steps are clamped to
    one pixel. In the pull convention the new field is ``field + update``. With ``factor > 1``
    the windowed sums are taken on a ``factor``-times coarser grid (``kernel`` is then in coarse
    pixels) and the update is interpolated back: for wide windows, the same answer for less.
    ``padding`` is the sums' padding at the image border (``constant``: like no data); with
    ``tgt_valid`` (0/1) the coarse update is extended beyond the target's data by replication
    before it is interpolated, as at the image border.
    """
    gx, gy = _central_gradient(0.5 * (warped + tgt))
    it = tgt - warped
    prods = torch.cat((gx * gx, gx * gy, gy * gy, gx * it, gy * it), 1) * weight
    if factor > 1:
        prods = F.avg_pool2d(prods, factor, ceil_mode=True)
    sums = gaussian_blur(prods, kernel, padding)
    a, b, c = sums[:, 0:1] + eps, sums[:, 1:2], sums[:, 2:3] + eps
    d, e = sums[:, 3:4], sums[:, 4:5]
    det = a * c - b * b
    step = torch.cat(((c * d - b * e) / det, (a * e - b * d) / det), 1)
    if factor > 1:
        if tgt_valid is not None:  # no data is the outside: interpolate as at the border
            step = fields.fill_nodata(step, F.avg_pool2d(tgt_valid, factor, ceil_mode=True))
        step = F.interpolate(step, size=[tgt.shape[-2], tgt.shape[-1]], mode="bilinear",
                             align_corners=False)
    return step.clamp(-1.0, 1.0)


class GaussianBlur(nn.Module):
    """:func:`gaussian_blur` with a fixed ``sigma`` (a non-persistent buffer: not in weights)."""

    def __init__(self, sigma: float):
        super().__init__()
        self.register_buffer("kernel", _gaussian_kernel(sigma), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_blur(x, self.kernel)


class ResidualHead(nn.Module):
    """Local correlation (+ optional features) -> residual field at one level."""

    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            _act(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            _act(),
            nn.Conv2d(hidden, 2, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (0/1, ``(N, 1, H, W)``) zeroes the input and every activation where there is
        no data (see :class:`Encoder`)."""
        x = x.contiguous(memory_format=CONV_FORMAT)
        if mask is None:
            return self.net(x).contiguous()
        return (_masked_sequential(self.net, x * mask, mask) * mask).contiguous()


# --------------------------------------------------------------------------------------------
# the stage model


class StageAligner(nn.Module):
    """Aligns a source image to a target image; returns the saturated field (see module doc)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = validate_spec(spec)
        s = self.spec
        ch = s["channels"]
        self.num_levels = len(ch) + 1
        self.finest_level = s["finest_level"]
        self.stride = 2 ** (self.num_levels - 1)
        # Tiles cut at multiples of this (stage pixels) see the grids the whole image has: the
        # encoder's stride and, with local normalisation, its statistics grid.
        self.grid = math.lcm(self.stride, NORM_FACTOR) if s["normalization"] == "local" else (
            self.stride)
        # Plain typed copies of the spec values the forward pass reads.
        self.local_normalization = s["normalization"] == "local"
        self.norm_sigma = float(s["norm_sigma"])
        self.concat_features = bool(s["concat_features"])
        self.lk_iterations = int(s["lk_iterations"])
        self.iterations = int(s["iterations"])
        self.nodata_aware = bool(s["nodata_aware"])
        self.encoder = Encoder(ch)
        self.global_head = (
            GlobalTranslation(
                s["global_radius"], float(s["global_temperature"]), float(s["global_gain_init"])
            )
            if s["global_translation"]
            else None
        )
        self.radii = _per_level(s["local_radius"], self.num_levels)
        hidden = _per_level(s["head_channels"], self.num_levels)
        self.heads = nn.ModuleDict()
        for level in range(self.finest_level, self.num_levels):
            corr = (2 * self.radii[level] + 1) ** 2
            extra = 2 * ([1] + ch)[level] if s["concat_features"] else 0
            extra += corr if s["local_prior"] else 0
            self.heads[str(level)] = ResidualHead(corr + extra, hidden[level])
        self.encoder.to(memory_format=CONV_FORMAT)
        self.heads.to(memory_format=CONV_FORMAT)
        if s["smooth_output"]:
            self.register_buffer("smooth_kernel", _gaussian_kernel(float(s["smooth_sigma"])))
        else:
            self.smooth_kernel = None
        # levels whose residual blur differs from smooth_sigma (level_smooth_sigma)
        self.level_blurs = nn.ModuleDict()
        if s["smooth_output"] and s["level_smooth_sigma"] is not None:
            for level in range(self.finest_level, self.num_levels):
                sigma = float(s["level_smooth_sigma"][level])
                if sigma != float(s["smooth_sigma"]):
                    self.level_blurs[str(level)] = (
                        GaussianBlur(sigma) if sigma > 0 else nn.Identity()
                    )
        if s["local_prior"]:
            self.register_buffer("prior_kernel", _gaussian_kernel(float(s["prior_sigma"])))
            # per level: the coarse grid of the NCC sums (1 = the level's own grid)
            self.prior_factors = [
                s["prior_factor"] if 2**level * s["prior_factor"] <= self.grid else 1
                for level in range(self.num_levels)
            ]
            pf = max(self.prior_factors)
            self.register_buffer(
                "prior_coarse_kernel", _gaussian_kernel(float(s["prior_sigma"]) / pf),
                persistent=False,
            )
            self.prior_log_temperature = nn.ParameterDict(
                {
                    str(level): nn.Parameter(torch.tensor(math.log(s["prior_temperature"])))
                    for level in range(self.finest_level, self.num_levels)
                }
            )
        else:
            self.prior_kernel = None
            self.prior_factors = [1] * self.num_levels
            self.prior_coarse_kernel = None
        # Both parameter-free refinements blur on a coarser grid where that changes little:
        # the residual at the finest refined level, the LK sums at half resolution for wide
        # windows.
        self.learned = bool(s["learned_levels"])
        if s["residual_sigma"] > 0:
            sigma = float(s["residual_sigma"]) / 2**self.finest_level
            self.register_buffer("residual_kernel", _gaussian_kernel(sigma), persistent=False)
        else:
            self.residual_kernel = None
        self.lk_factor = 2 if s["lk_sigma"] >= 4 else 1
        if s["lk_iterations"] > 0:
            sigma = float(s["lk_sigma"]) / self.lk_factor
            self.register_buffer("lk_kernel", _gaussian_kernel(sigma), persistent=False)
        else:
            self.lk_kernel = None

    # -- helpers ------------------------------------------------------------------------------

    def _smooth(self, field: Tensor, level: int, mask: Tensor | None = None) -> Tensor:
        """The residual blur of ``level`` (replicate padding keeps a constant field constant;
        with a no-data ``mask``, normalised over data: :func:`masked_blur`)."""
        out = field
        overridden = False
        for key, blur in self.level_blurs.items():
            if int(key) == level:
                overridden = True
                if mask is not None and isinstance(blur, GaussianBlur):
                    out = masked_blur(field, blur.kernel, mask)
                else:
                    out = blur(field)
        kernel = self.smooth_kernel
        if not overridden and kernel is not None:
            out = gaussian_blur(field, kernel) if mask is None else (
                masked_blur(field, kernel, mask))
        return out

    def _pad(self, x: Tensor) -> Tensor:
        # Always pad (by 0 when already a multiple): no branch on the size, so an exported
        # program (torch.export) holds for every size, not only the size class it saw.
        ph = (-x.shape[-2]) % self.stride
        pw = (-x.shape[-1]) % self.stride
        return F.pad(x, (0, pw, 0, ph))

    def _lucas_kanade(self, src: Tensor, tgt: Tensor, field: Tensor) -> Tensor:
        """``lk_iterations`` Gauss-Newton refinements of a full-resolution field.

        ``src`` / ``tgt`` are (normalised image, validity) pairs ``(N, 2, H, W)``.
        """
        kernel = self.lk_kernel
        assert kernel is not None
        for i in range(self.lk_iterations):
            # without learned levels the first step starts from zero: no warp needed
            warped = src if i == 0 and not self.learned else fields.warp(src, field)
            weight = ((warped[:, 1:] > 0.999) & (tgt[:, 1:] > 0.5)).to(field.dtype)
            padding, tgt_valid = "replicate", None
            if self.nodata_aware:  # gradients next to no data or the border are not used
                weight, padding, tgt_valid = _erode(weight), "constant", tgt[:, 1:]
            field = field + lucas_kanade_step(
                warped[:, :1], tgt[:, :1], weight, kernel, factor=self.lk_factor,
                padding=padding, tgt_valid=tgt_valid,
            )
        return field

    # -- forward ------------------------------------------------------------------------------

    def _inputs(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(src_valid, tgt_valid, x)``: ``x`` is the padded encoder input, sources first,
        then targets, channels (normalised image, validity)."""
        both = torch.cat((src, tgt))  # normalised per item: one call for both
        if self.local_normalization:
            norm, valid = normalize_image_local(both, self.norm_sigma,
                                                nodata_aware=self.nodata_aware)
        else:
            norm, valid = normalize_image(both)
        n = src.shape[0]
        return valid[:n], valid[n:], self._pad(torch.cat((norm, valid), 1))

    def _encode(self, src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """:meth:`_inputs` and the encoder's features of levels 0..L."""
        src_v, tgt_v, x = self._inputs(src, tgt)
        return src_v, tgt_v, x, self.encoder(x)

    def pair_features(self, src_img: Tensor, tgt_img: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Encoder features ``(src_feats, tgt_feats)`` of a pair, one tensor per level 0..L.

        Images are ``(N, 1, H, W)`` raw values as for :meth:`forward`; level ``i`` is
        ``(N, C_i, H'/2^i, W'/2^i)`` with ``H', W'`` padded up to a multiple of ``2^L`` (padding
        is no-data); level 0 is the normalised image. Used by the embedding loss; the forward
        pass does not call it.
        """
        dev = next(self.parameters()).device
        src = src_img.to(device=dev, dtype=torch.float32)
        tgt = tgt_img.to(device=dev, dtype=torch.float32)
        if src.dim() != 4 or src.shape[1] != 1 or src.shape != tgt.shape:
            raise ValueError(
                f"src_img and tgt_img must both be (N, 1, H, W), got {tuple(src.shape)} and "
                f"{tuple(tgt.shape)}"
            )
        n = src.shape[0]
        feats = self._encode(src, tgt)[3]
        return [f[:n] for f in feats], [f[n:] for f in feats]

    def _prior_temperatures(self) -> list[Tensor]:
        """Softmax temperature of the block-matching prior per level 0..L (1 below the finest
        refined level)."""
        one = torch.ones((), device=self.prior_kernel.device)
        return [
            self.prior_log_temperature[str(level)].exp() if level >= self.finest_level
            else one
            for level in range(self.num_levels)
        ]

    def _head(self, level: int, inp: Tensor, mask: Tensor | None = None) -> Tensor:
        """The residual head of ``level`` applied to ``inp`` (``mask``: see ResidualHead)."""
        out = inp
        for key, head in self.heads.items():
            if int(key) == level:
                out = head(inp, mask)
        return out

    def _level_masks(self, x: Tensor) -> list[Tensor] | None:
        """Per level 0..L, 1 where the padded input ``x`` has any data (``nodata_aware``)."""
        if not self.nodata_aware:
            return None
        v = x[:, 1:2]
        return [v] + [(F.avg_pool2d(v, 2**level) > 0).to(x.dtype)
                      for level in range(1, self.num_levels)]

    def _learned_field(self, x: Tensor, n: int) -> Tensor:
        """The learned coarse-to-fine levels on the padded input ``x`` (:meth:`_inputs`): the
        field of the ``n`` pairs at ``x``'s size, before the Lucas-Kanade steps."""
        masks = self._level_masks(x)
        feats = self.encoder(x, masks)
        top = self.num_levels - 1
        # image pyramid for the block-matching prior (level 0 = the normalised image)
        pyr = [x[:, :1]]
        prior_kernel = self.prior_kernel
        temperatures: list[Tensor] = []
        if prior_kernel is not None:
            for _ in range(top):
                pyr.append(F.avg_pool2d(pyr[-1], 2))
            temperatures = self._prior_temperatures()
        field = fields.identity(
            n, feats[top].shape[-2], feats[top].shape[-1], device=x.device, dtype=x.dtype
        )
        global_head = self.global_head
        if global_head is not None:
            valid = F.avg_pool2d(x[:, 1:2], self.stride) > 0.5
            vs, vt = valid[:n].float(), valid[n:].float()
            t = global_head(feats[top][n:], feats[top][:n], vt, vs)
            field = field + t.view(n, 2, 1, 1)
        for level in range(top, self.finest_level - 1, -1):
            fs, ft = feats[level][:n], feats[level][n:]
            if field.shape[-2:] != fs.shape[-2:]:
                field = fields.upsample_field(field, 1, size=(fs.shape[-2], fs.shape[-1]))
            ws = fields.warp(fs, field)
            mask = None if masks is None else masks[level][n:]
            if mask is not None:  # where the target has no data is outside the image
                ws = ws * mask
            r = self.radii[level]
            cost = local_correlation(ft, ws, r)
            inp = torch.cat((cost, ft, ws), 1) if self.concat_features else cost
            prior: Tensor | None = None
            if prior_kernel is not None:
                img_s = fields.warp(pyr[level][:n], field)
                valid = None
                if masks is not None and mask is not None:
                    moved = fields.warp(masks[level][:n], field) > 0.5
                    valid = (mask, moved.to(mask.dtype) * mask)
                ncc = local_ncc_cost(pyr[level][n:], img_s, r, prior_kernel,
                                     self.prior_factors[level], self.prior_coarse_kernel,
                                     valid)
                prior = local_soft_argmax(ncc, r, temperatures[level])
                inp = torch.cat((inp, ncc), 1)
            res = self._head(level, inp, mask)
            if prior is not None:
                res = res + prior
            res = self._smooth(res, level, mask)
            field = fields.compose(field, res)
            if mask is not None:  # beyond the data the field continues as at an image border
                field = fields.fill_nodata(field, mask)
        residual_kernel = self.residual_kernel
        if residual_kernel is not None:
            if masks is None:
                field = gaussian_blur(field, residual_kernel)
            else:
                mask = masks[self.finest_level][n:]
                field = fields.fill_nodata(masked_blur(field, residual_kernel, mask), mask)
        if self.finest_level > 0:
            field = fields.upsample_field(
                field, self.finest_level, size=(x.shape[-2], x.shape[-1])
            )
        if masks is not None:
            field = fields.fill_nodata(field, masks[0][n:])
        return field

    def residual(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Residual field aligning an (already warped) float source to the target, same size."""
        h, w = tgt.shape[-2], tgt.shape[-1]
        n = src.shape[0]
        src_v, tgt_v, x = self._inputs(src, tgt)
        if self.learned:
            field = self._learned_field(x, n)
        else:
            field = fields.identity(n, x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype)
        if self.lk_kernel is not None:
            field = self._lucas_kanade(x[:n, :2], x[n:, :2], field)
            if self.nodata_aware:
                field = fields.fill_nodata(field, x[n:, 1:2])
        has_data = (src_v.flatten(1).amax(1) > 0) & (tgt_v.flatten(1).amax(1) > 0)
        field = field[..., :h, :w] * has_data.view(n, 1, 1, 1).to(field.dtype)
        return field

    def forward(
        self, src_img: Tensor, tgt_img: Tensor, src_agg_field: Tensor | None = None, **kwargs
    ) -> Tensor:
        """Saturated field ``(N, 2, H, W)`` aligning ``src_img`` to ``tgt_img`` (see module doc).

        Extra keyword arguments (corgie passes ``tgt_agg_field``, masks, ...) are ignored.
        """
        dev = next(self.parameters()).device
        src = src_img.to(device=dev, dtype=torch.float32)
        tgt = tgt_img.to(device=dev, dtype=torch.float32)
        if src.dim() != 4 or tgt.dim() != 4 or src.shape[1] != 1 or src.shape != tgt.shape:
            raise ValueError(
                f"src_img and tgt_img must both be (N, 1, H, W), got {tuple(src.shape)} and "
                f"{tuple(tgt.shape)}"
            )
        agg = None
        if src_agg_field is not None:
            agg = src_agg_field.to(device=dev, dtype=torch.float32)
            fields.check_field(agg, "src_agg_field")
            if agg.shape[0] != src.shape[0] or agg.shape[-2:] != src.shape[-2:]:
                raise ValueError(
                    f"src_agg_field {tuple(agg.shape)} does not match images {tuple(src.shape)}"
                )
        return self.align(src, tgt, agg)

    def align(self, src: Tensor, tgt: Tensor, src_agg_field: Tensor | None = None) -> Tensor:
        """:meth:`forward` without checks or moves: float32 images on the model's device.

        What an exported pyramid calls (``forward`` takes corgie's ``**kwargs`` and moves inputs).
        """
        agg = src_agg_field
        for _ in range(self.iterations):
            if agg is None:
                agg = self.residual(src, tgt)
            else:
                warped = fields.warp_image(src, agg)
                if self.nodata_aware:  # source pulled beyond the target's data is outside
                    warped = warped * (tgt != 0).to(warped.dtype)
                res = self.residual(warped, tgt)
                has_data = (warped.flatten(1).ne(0).any(1)) & (tgt.flatten(1).ne(0).any(1))
                agg = torch.where(has_data.view(-1, 1, 1, 1), fields.compose(agg, res), agg)
                if self.nodata_aware:
                    agg = fields.fill_nodata(agg, (tgt != 0).to(agg.dtype))
        assert agg is not None
        return agg


# Architecture name -> builder from a spec. Names are never reused for a different computation.
ARCHITECTURES: dict = {ARCH: lambda spec: StageAligner(validate_spec(spec))}
