"""Looking at a stack: xz/yz reslices before and after alignment, and the residual along z.

An aligned stack is judged by eye on its reslices: the image of one y row (xz) or one x column
(yz) through every section, sections stacked downwards along z. Membranes run continuously
through a well aligned stack and jump from section to section through a misaligned one.
Sections are drawn several pixels tall so that z keeps roughly its physical scale, narrow
reslices are magnified (:func:`reslice_scale`), and each section's line is shown z-normalised
by the mean and spread of its whole section, so brightness changes between sections do not
hide the structure.

Numbers go with the pictures. For each consecutive pair (z-1, z) :func:`section_residual` gives
the median absolute difference and ``1 - r`` (Pearson) over the pixels where both sections have
data, for the aligned layer and for the raw one; :func:`linear_trend` fits a line along z: a
positive slope means consecutive sections match worse and worse (accumulating drift or damage).

:class:`StackView` collects all of it section by section (one row and one column per section,
never the whole stack), and :func:`write_stack_report` writes ``stack_xz.png``,
``stack_yz.png``, the page ``index.md`` and ``summary.json`` into the report folder.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from metroem import viz
from metroem.atomic import atomic_write_bytes
from metroem.eval import metrics

Tensor = torch.Tensor

__all__ = [
    "Z_REPEAT_MAX",
    "RESLICE_MAX_PX",
    "MIN_WIDTH",
    "MAX_ZOOM",
    "MEASURES",
    "reslice_scale",
    "gray_lines",
    "section_residual",
    "linear_trend",
    "StackView",
    "reslice_panel",
    "stack_summary",
    "write_stack_report",
    "json_safe",
]

Z_REPEAT_MAX = 16  # at most this many pixels per section and zoom (4 x 4 x 40 nm: 10)
RESLICE_MAX_PX = 4096  # and a reslice at most this tall, unless there are more sections
MIN_WIDTH = 512  # narrower reslices are magnified (nearest neighbour) towards this width
MAX_ZOOM = 8
MEASURES = ("one_minus_r", "mad")  # per consecutive pair; the first is the headline


def reslice_scale(
    res_z: float, res_xy: float, sections: int, width: int, px_per_section: int | None = None
) -> dict[str, int]:
    """How a reslice ``width`` pixels wide is drawn: ``zoom`` (x magnification, towards
    :data:`MIN_WIDTH`, at most :data:`MAX_ZOOM`) and ``px_per_section`` (its height per section).

    By default a section is as tall as the z/xy resolution ratio times the zoom, rounded; at
    most :data:`Z_REPEAT_MAX` x zoom and what keeps the reslice within :data:`RESLICE_MAX_PX`
    pixels; at least 1.
    """
    zoom = max(1, min(MAX_ZOOM, MIN_WIDTH // max(width, 1)))
    if px_per_section is None:
        ratio = res_z / res_xy if res_xy > 0 else 1.0
        px_per_section = min(round(ratio * zoom), Z_REPEAT_MAX * zoom,
                             RESLICE_MAX_PX // max(sections, 1))
    return {"zoom": zoom, "px_per_section": max(1, int(px_per_section))}


def _normalised(img: Tensor) -> Tensor:
    """``img`` z-normalised over its data pixels; no-data pixels (0) become NaN."""
    valid = img != 0
    out = torch.full_like(img, math.nan)
    if int(valid.sum()) >= 2:
        v = img[valid]
        out[valid] = (v - v.mean()) / v.std(unbiased=False).clamp_min(1e-6)
    return out


def gray_lines(img: Tensor) -> np.ndarray:
    """A reslice (NaN = no data) as RGB: 1st..99th percentile of its data stretched, NaN black."""
    a = img.double().numpy()
    ok = np.isfinite(a)
    lo, hi = np.percentile(a[ok], [1, 99]) if ok.any() else (0.0, 1.0)
    out = np.clip((np.where(ok, a, lo) - lo) / max(hi - lo, 1e-6), 0, 1)
    out[~ok] = 0
    return np.repeat((out * 255).astype(np.uint8)[..., None], 3, axis=2)


def section_residual(a, b) -> dict[str, float]:
    """How much two consecutive sections differ, over the pixels where both have data.

    ``mad``: median absolute difference (input intensity units); ``one_minus_r``: 1 - Pearson r
    (0 for a perfect affine-intensity match); ``pixels``: how many pixels counted. NaN when
    fewer than 2 pixels overlap (or a section is flat, for ``one_minus_r``).
    """
    x, y = metrics.as_image(a)[0, 0].double(), metrics.as_image(b)[0, 0].double()
    both = (x != 0) & (y != 0)
    n = int(both.sum())
    if n < 2:
        return {"mad": math.nan, "one_minus_r": math.nan, "pixels": n}
    r = metrics.residual(x, y)["ncc"]
    mad = float((x[both] - y[both]).abs().median())
    return {"mad": mad, "one_minus_r": 1.0 - r, "pixels": n}


def linear_trend(zs, values) -> dict[str, float]:
    """Least-squares line of ``values`` against ``zs`` (finite values only).

    Returns ``slope_per_section`` (NaN with fewer than 2 values), the ``first`` and ``last``
    values with their ``first_z``/``last_z``, and how many ``pairs`` counted.
    """
    z = np.asarray(zs, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    z, v = z[ok], v[ok]
    out = {"slope_per_section": math.nan, "first": math.nan, "last": math.nan,
           "first_z": None, "last_z": None, "pairs": int(v.size)}
    if v.size == 0:
        return out
    out.update(first=float(v[0]), last=float(v[-1]), first_z=int(z[0]), last_z=int(z[-1]))
    if v.size >= 2 and np.ptp(z) > 0:
        out["slope_per_section"] = float(np.polyfit(z, v, 1)[0])
    return out


@dataclass
class StackView:
    """Reslices and consecutive residuals of one or more layers, fed section by section.

    ``row`` and ``column`` index the sections given to :meth:`add` (pixels of the read box).
    Sections before ``z_start`` count for the residual of the pair that crosses into the range
    but are not drawn.
    """

    z_start: int
    row: int
    column: int
    rows: dict[str, list[Tensor]] = field(default_factory=dict)
    columns: dict[str, list[Tensor]] = field(default_factory=dict)
    drawn_z: list[int] = field(default_factory=list)
    pairs: dict[str, list[dict]] = field(default_factory=dict)
    _prev: dict[str, tuple[int, Tensor]] = field(default_factory=dict)

    def add(self, z: int, sections: dict[str, Tensor]) -> dict[str, dict]:
        """Take section ``z`` (``(H, W)``) of each layer; return the residual to ``z - 1`` of
        each layer that has its previous section (empty for the first one)."""
        out = {}
        if z >= self.z_start:
            self.drawn_z.append(z)
        for name, img in sections.items():
            img = metrics.as_image(img)[0, 0]
            prev = self._prev.get(name)
            if prev is not None and prev[0] == z - 1:
                res = {"z": z, **section_residual(img, prev[1])}
                self.pairs.setdefault(name, []).append(res)
                out[name] = res
            self._prev[name] = (z, img)
            if z >= self.z_start:
                norm = _normalised(img)
                self.rows.setdefault(name, []).append(norm[self.row].clone())
                self.columns.setdefault(name, []).append(norm[:, self.column].clone())
        return out

    def reslice(self, name: str, plane: str) -> Tensor:
        """``(sections, width)`` image of layer ``name``: ``plane`` "xz" (the row) or "yz";
        each section z-normalised over its whole section, NaN where it has no data."""
        lines = self.rows[name] if plane == "xz" else self.columns[name]
        return torch.stack(lines)

    def summary(self) -> dict[str, dict]:
        """Per layer: the pairs (z, mad, one_minus_r, pixels) and each measure's trend."""
        out = {}
        for name, pairs in self.pairs.items():
            zs = [p["z"] for p in pairs]
            out[name] = {
                "pairs": pairs,
                "median": {m: _nanmedian([p[m] for p in pairs]) for m in MEASURES},
                "trend": {m: linear_trend(zs, [p[m] for p in pairs]) for m in MEASURES},
            }
        return out


def _nanmedian(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def reslice_panel(reslices: dict[str, Tensor], scale: dict[str, int]) -> np.ndarray:
    """Labelled reslices one above the other, magnified by ``scale["zoom"]`` in x and drawn
    ``scale["px_per_section"]`` pixels per section.

    ``reslices`` maps a label (e.g. "before (raw layer): xz at y 256") to a ``(sections,
    width)`` image (:meth:`StackView.reslice`); each is contrast-stretched on its own.
    """
    panels = [
        viz.titled(gray_lines(img.repeat_interleave(scale["px_per_section"], dim=0)
                              .repeat_interleave(scale["zoom"], dim=1)), label)
        for label, img in reslices.items()
    ]
    return viz.stack_rows(*panels)


def json_safe(x):
    """``x`` with dict keys as strings and non-finite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


LABELS = {"before": "before (raw layer)", "after": "after (aligned layer)"}


def stack_summary(
    view: StackView,
    layers: dict[str, str],
    box: dict[str, int],
    where: dict[str, int],
    scale: dict[str, dict],
) -> dict:
    """The numbers of a stack: its layers, z range, reslice positions and consecutive residuals.

    ``layers`` maps each layer name of ``view`` to its path, ``box`` is the region read
    (``mip``, ``x0``, ``y0``, ``width``, ``height``), ``where`` gives the absolute ``y`` of the
    xz reslice and ``x`` of the yz one, ``scale`` the :func:`reslice_scale` of each plane.
    """
    return {
        "layers": layers,
        "box": box,
        "z_range": [view.drawn_z[0], view.drawn_z[-1] + 1],
        "reslices": {"y": where["y"], "x": where["x"], "scale": scale},
        "consecutive": view.summary(),
    }


def write_stack_report(
    out_dir: str | os.PathLike, view: StackView, summary: dict, extra_pictures=()
) -> dict:
    """Write ``stack_xz.png``, ``stack_yz.png``, ``index.md`` and ``summary.json``.

    ``summary`` is :func:`stack_summary`'s; the picture names are added to it under
    ``reslices.pictures`` and it is returned. ``extra_pictures`` (files in ``out_dir``, e.g.
    the per-section Pearson pictures) are linked from the page too.
    """
    os.makedirs(out_dir, exist_ok=True)
    z0, z1 = summary["z_range"]
    rs = summary["reslices"]
    pictures = {}
    for plane, at in (("xz", f"y {rs['y']}"), ("yz", f"x {rs['x']}")):
        labelled = {
            f"{LABELS.get(name, name)}: {plane} at {at}, z {z0}..{z1 - 1} downwards":
                view.reslice(name, plane)
            for name in summary["layers"]
        }
        name = f"stack_{plane}.png"
        viz.save_png(os.path.join(out_dir, name),
                     reslice_panel(labelled, rs["scale"][plane]))
        pictures[plane] = name
    summary = {**summary, "reslices": {**rs, "pictures": pictures}}
    text = json.dumps(json_safe(summary), indent=1) + "\n"
    atomic_write_bytes(os.path.join(out_dir, "summary.json"), text.encode())
    page = _markdown(summary, [os.path.basename(p) for p in extra_pictures])
    atomic_write_bytes(os.path.join(out_dir, "index.md"), page.encode())
    return summary


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (
        f"{v:.{digits}g}")


def _markdown(summary: dict, extra: list[str]) -> str:
    """The report page: reslices, the trend table and the per-pair table."""
    z0, z1 = summary["z_range"]
    rs, b = summary["reslices"], summary["box"]
    lines = [
        f"# Stack z {z0}..{z1 - 1}", "",
        f"MIP {b['mip']}, box x {b['x0']}..{b['x0'] + b['width'] - 1}, "
        f"y {b['y0']}..{b['y0'] + b['height'] - 1} (voxels at that MIP).", "",
        *[f"- {name}: `{path}`" for name, path in summary["layers"].items()], "",
        "## Reslices", "",
        "Membranes should run continuously from section to section after alignment. z grows "
        f"downwards; each section is drawn {rs['scale']['xz']['px_per_section']} px tall (xz) "
        f"/ {rs['scale']['yz']['px_per_section']} px (yz), x magnified "
        f"{rs['scale']['xz']['zoom']}x (xz) / {rs['scale']['yz']['zoom']}x (yz). Each section's "
        "line is z-normalised over its whole section; black is no data.", "",
        f"![xz reslice at y {rs['y']}]({rs['pictures']['xz']})", "",
        f"![yz reslice at x {rs['x']}]({rs['pictures']['yz']})", "",
        "## Consecutive sections", "",
        "1 - r: one minus Pearson r, MAD: median absolute difference, over the pixels where both "
        "sections have data. Slope: least-squares change per section along z (positive: getting "
        "worse).", "",
    ]
    lines += _pair_tables(summary["consecutive"]) if summary["consecutive"] else [
        "No two consecutive sections in this range."]
    if extra:
        lines += ["", "## Pictures per section", ""] + [f"- [{p}]({p})" for p in extra]
    return "\n".join(lines) + "\n"


def _pair_tables(cons: dict) -> list[str]:
    """Markdown lines: the trend of each layer and measure, then one row per pair."""
    lines = ["| layer | measure | median | first | last | slope per section |",
             "|---|---|---|---|---|---|"]
    for name, s in cons.items():
        for m in MEASURES:
            t = s["trend"][m]
            lines.append(f"| {name} | {_MEASURE_NAMES[m]} | {_fmt(s['median'][m])} | "
                         f"{_fmt(t['first'])} | {_fmt(t['last'])} | "
                         f"{_fmt(t['slope_per_section'], 3)} |")
    names = list(cons)
    lines += ["", "| z vs z-1 | " + " | ".join(
        f"{n} {_MEASURE_NAMES[m]}" for n in names for m in MEASURES) + " |",
        "|---" * (1 + len(names) * len(MEASURES)) + "|"]
    by_z: dict[int, dict] = {}
    for n in names:
        for p in cons[n]["pairs"]:
            by_z.setdefault(p["z"], {})[n] = p
    for z in sorted(by_z):
        cells = [_fmt(by_z[z].get(n, {}).get(m)) for n in names for m in MEASURES]
        lines.append(f"| {z} | " + " | ".join(cells) + " |")
    return lines


_MEASURE_NAMES = {"one_minus_r": "1 - r", "mad": "MAD"}
