"""Evaluation pictures: what a pair looks like before and after alignment, and method charts.

:func:`write_pair_report` writes, for one source/target pair and the field that aligns them:

* ``<name>_overlay.png``: red (source) / green (target) overlays, before | after warping;
  aligned structure turns yellow;
* ``<name>_checkerboard.png``: alternating tiles of source and target, before | after; broken
  membranes at tile seams mean misalignment;
* ``<name>_field.png``: the field as a colour wheel (hue = direction, saturation = magnitude,
  with its legend) and as a deformed grid;
* ``<name>_warped.png``: target | warped source | source at full resolution, one grey scale:
  the warped source must keep its own tissue; membranes of the target appearing in it, or a
  brushed, streaky texture, are morphing;
* ``<name>_morph.png``: the deformed grid of the field's non-affine part (the field minus its
  least-squares affine fit), magnified :data:`MORPH_GAIN` times: a real section distortion
  bends it gently over microns, morphing wiggles it around every neurite;
* ``<name>_pearson.png``: chunked Pearson r between the (warped) source and the target, before |
  after, on a common scale, NaN (no data) in grey;
* ``<name>_epe.png`` (when a ground-truth field is given): the per-pixel end-point error.

:func:`write_epe_chart` draws EPE against difficulty, one line per method.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from metroem import fields, viz
from metroem.eval import metrics

__all__ = ["pair_panels", "write_pair_report", "write_epe_chart", "MORPH_GAIN"]

MORPH_GAIN = 5.0


def pair_panels(src, tgt, field, chunk: int = 32) -> dict[str, np.ndarray]:
    """The report panels of one pair as RGB arrays (see the module docstring)."""
    s, t, f = metrics.as_image(src), metrics.as_image(tgt), metrics.as_field(field)
    warped = fields.warp_image(s, f)
    s2, t2, w2 = s[0, 0], t[0, 0], warped[0, 0]
    r_before = metrics.chunked_pearson(s2, t2, chunk)
    r_after = metrics.chunked_pearson(w2, t2, chunk)
    h, w = t2.shape

    def fit(rmap):  # block map at image scale, padded to the image size
        img = viz.heatmap(rmap, -0.2, 1.0, cell=chunk)
        out = np.full((h, w, 3), 255, np.uint8)
        out[: img.shape[0], : img.shape[1]] = img
        return out

    def summary(rmap) -> str:
        s_ = metrics.pearson_summary(rmap)
        return f"r mean {s_['mean']:.3f}, p5 {s_['p5']:.3f}"

    mag = float(np.percentile(f.pow(2).sum(1).sqrt().numpy(), 99))
    both = np.concatenate([t2.numpy().ravel(), s2.numpy().ravel()])
    lo, hi = (np.percentile(both[both != 0], [1, 99]) if (both != 0).any() else (0.0, 1.0))
    morph = f - metrics.affine_fit(f)
    wheel = viz.titled(viz.color_wheel(96), f"{max(mag, 1e-3):.3g} px at rim")
    return {
        "overlay_before": viz.titled(viz.overlay(s2, t2), "before: src red, tgt green"),
        "overlay_after": viz.titled(viz.overlay(w2, t2), "after: warped src red, tgt green"),
        "checker_before": viz.titled(viz.checkerboard(s2, t2), "before"),
        "checker_after": viz.titled(viz.checkerboard(w2, t2), "after"),
        "field_rgb": viz.titled(viz.field_rgb(f[0], max_mag=max(mag, 1e-3)), "field direction"),
        "field_legend": wheel,
        "field_grid": viz.titled(viz.field_grid(f[0]), "deformed grid (p + f(p))"),
        "target": viz.titled(viz.gray(t2, lo, hi), "target"),
        "warped": viz.titled(viz.gray(w2, lo, hi), "warped source"),
        "source": viz.titled(viz.gray(s2, lo, hi), "source"),
        "morph_grid": viz.titled(viz.field_grid(morph[0] * MORPH_GAIN),
                                 f"non-affine part x{MORPH_GAIN:g} as a deformed grid"),
        "pearson_before": viz.titled(fit(r_before), f"before: {summary(r_before)}"),
        "pearson_after": viz.titled(fit(r_after), f"after: {summary(r_after)}"),
        "pearson_legend": viz.titled(viz.colorbar(-0.2, 1.0), "r"),
    }


def write_pair_report(
    out_dir: str | os.PathLike,
    src,
    tgt,
    field,
    name: str = "pair",
    chunk: int = 32,
    gt=None,
) -> list[str]:
    """Write the pair's PNGs into ``out_dir`` (created if needed); return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    p = pair_panels(src, tgt, field, chunk)
    pages = {
        "overlay": viz.side_by_side(p["overlay_before"], p["overlay_after"]),
        "checkerboard": viz.side_by_side(p["checker_before"], p["checker_after"]),
        "field": viz.side_by_side(p["field_rgb"], p["field_legend"], p["field_grid"]),
        "pearson": viz.side_by_side(p["pearson_before"], p["pearson_after"], p["pearson_legend"]),
        "warped": viz.side_by_side(p["target"], p["warped"], p["source"]),
        "morph": p["morph_grid"],
    }
    if gt is not None:
        err = metrics.epe_map(field, gt)
        hi = max(float(np.percentile(err.numpy(), 99)), 0.5)
        pages["epe"] = viz.side_by_side(
            viz.titled(viz.heatmap(err, 0.0, hi), "end-point error vs ground truth (px)"),
            viz.titled(viz.colorbar(0.0, round(hi, 2)), "px"),
        )
    return [
        viz.save_png(os.path.join(out_dir, f"{name}_{kind}.png"), rgb)
        for kind, rgb in pages.items()
    ]


HIGHLIGHT = {"metroem": (200, 0, 40), "metroem-refine": (235, 120, 140)}


def write_epe_chart(
    path: str | os.PathLike,
    values: dict[str, list[float]],
    difficulties: list[str],
    title: str = "median end-point error vs difficulty",
    ylabel: str = "px (log scale)",
) -> str:
    """Line chart of a per-difficulty value (one list per method, NaN = missing) as a PNG."""
    clean = {
        k: [float(v) if v is not None else float("nan") for v in vs] for k, vs in values.items()
    }
    floor = 1e-2  # exact methods would sit at -inf on a log axis
    clean = {k: [max(v, floor) if np.isfinite(v) else v for v in vs] for k, vs in clean.items()}
    # A "<base>+<variant>" series (e.g. dis+pc) is drawn dashed in its base method's colour.
    base = [k for k in clean if "+" not in k]
    colors = {k: viz.CHART_COLORS[i % len(viz.CHART_COLORS)] for i, k in enumerate(base)}
    extra = [k for k in clean if k not in colors and k.split("+")[0] not in colors]
    for i, k in enumerate(extra, start=len(base)):
        colors[k] = viz.CHART_COLORS[i % len(viz.CHART_COLORS)]
    dashed = {k for k in clean if "+" in k and k.split("+")[0] in colors}
    for k in dashed:
        colors[k] = colors[k.split("+")[0]]
    # metroem itself stands out from the baselines in one colour family of its own.
    colors.update({k: v for k, v in HIGHLIGHT.items() if k in clean})
    rgb = viz.line_chart(clean, difficulties, title=title, ylabel=ylabel, log_y=True,
                         colors=colors, dashed=dashed)
    return viz.save_png(str(path), rgb)


def field_from_file(path: str | os.PathLike) -> torch.Tensor:
    """Load a field saved as ``.npy`` / ``.pt`` (``(2, H, W)`` or ``(1, 2, H, W)``, pixels)."""
    from metroem.errors import MetroemError

    path = str(path)
    if not os.path.isfile(path):
        raise MetroemError(f"field file {path} does not exist; pass a .npy or .pt field")
    try:
        if path.endswith(".pt") or path.endswith(".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            data = np.load(path, allow_pickle=False)
        return metrics.as_field(data)
    except (ValueError, OSError, RuntimeError) as e:
        raise MetroemError(
            f"cannot read a (2, H, W) pixel field from {path}: {str(e).splitlines()[0]}"
        ) from e
