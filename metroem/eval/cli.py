"""``metroem eval``: measure how well a field aligns images, and draw it.

Two inputs:

* two images and a field (a ``.npy``/``.pt`` file, a metroem pyramid, or a classical baseline)::

      metroem eval --src 01.png --tgt 00.png --method dis+pc --report eval_out
      metroem eval --src s.png --tgt t.png --field f.npy --gt gt.npy
      metroem eval --src s.png --tgt t.png --pyramid_path isbi

  prints residual similarity, chunked Pearson, folds and roughness before/after (and EPE when a
  ground-truth field is given); ``--report DIR`` writes the pictures (docs/evaluation.md).

* a CloudVolume z range: each section z is compared with z-1 inside ``--bbox`` at ``--mip``::

      metroem eval --image_path file://vol/image --z_start 1 --z_end 8 --bbox 0 0 512 512 \\
          --field_path file://vol/field --pearson_dst file://vol/pearson --report eval_cv

  with ``--field_path`` both sections are first warped by their field in that layer (fields that
  align every section into one frame); with ``--pyramid_path``/``--method`` section z is aligned to
  z-1; with neither the stack is taken as already aligned. The chunked-Pearson map is written
  as a float32 layer with one voxel per ``--chunk`` block (resolution x chunk) and as PNGs.

  Looking at the stack (not with ``--pyramid_path``/``--method``): xz and yz reslices of the
  raw layer (``--src_path``) above the aligned one (``--image_path``, alias ``--cv_path``) and the
  residual between consecutive sections (1 - r, median absolute difference) with its trend
  along z; ``--report`` writes stack_xz.png, stack_yz.png, index.md and summary.json::

      metroem eval --src_path file://vol/image --image_path file://vol/aligned --z_start 0 \\
          --z_end 30 --mip 2 --reslice_y 300 --report eval_stack
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import NamedTuple

import numpy as np
import torch

from metroem import cliargs, fields, regularize, viz
from metroem.devices import parse_device
from metroem.errors import MetroemError, cli_errors
from metroem.eval import baselines, metrics, report, stackview

Tensor = torch.Tensor

log = logging.getLogger(__name__)
_GATE = ",".join(f"{v:g}" for v in regularize.GATE)  # in --help


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="metroem eval",
        description="Measure alignment quality (EPE, chunked Pearson, folds, residuals).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Two inputs:")[1],
    )
    img = p.add_argument_group("image pair")
    img.add_argument("--src", help="source image (PNG/TIF/...; 0 = no data)")
    img.add_argument("--tgt", help="target image, same size")
    img.add_argument("--field", help="field aligning src to tgt: .npy or .pt, (2, H, W) pixels")
    img.add_argument("--gt", help="ground-truth field (.npy/.pt) for end-point error")
    img.add_argument("--registered", action="store_true",
                     help="the right field is zero (slices of a registered block, e.g. "
                     "FIB-SEM): report the end-point error against 0 and the morph")
    vol = p.add_argument_group("CloudVolume z range")
    vol.add_argument("--image_path", "--cv_path", dest="image_path",
                     help="image layer to evaluate, e.g. the aligned layer (--image_path) of "
                     "metroem align (file://, gs://, ...; --cv_path is download's name)")
    vol.add_argument("--src_path", help="the raw layer before alignment, for the reslices and "
                     "residuals 'before' (default with --field_path: --image_path unwarped)")
    vol.add_argument("--z_start", type=int, help="first section compared with its z-1")
    vol.add_argument("--z_end", type=int, help="one past the last section")
    vol.add_argument("--bbox", type=int, nargs=4, metavar=("X0", "Y0", "W", "H"),
                     help="region in voxels at --mip (default: the whole section)")
    vol.add_argument("--mip", type=int, default=0,
                     help="MIP of the sections read (a z range) or of the image pair: a "
                     "--pyramid_path runs them as that MIP, as metroem align does (default 0)")
    vol.add_argument("--field_path", help="field layer aligning every section into one frame")
    vol.add_argument("--pearson_dst", help="write the chunked-Pearson map as this layer")
    vol.add_argument("--reslice_y", type=int, metavar="Y",
                     help="row drawn as the xz reslice (voxels at --mip; default: bbox middle)")
    vol.add_argument("--reslice_x", type=int, metavar="X",
                     help="column drawn as the yz reslice (voxels at --mip; default: bbox middle)")
    vol.add_argument("--reslice_z_scale", type=int, metavar="PX",
                     help="pixels per section in the reslice pictures (default: the layer's "
                     "z/xy resolution ratio times the x magnification, capped)")
    src = p.add_argument_group("where the field comes from (pair or z range)")
    cliargs.add_pyramid(src, "--pyramid", required=False,
                        help="align with this trained metroem pyramid (a folder or a shipped "
                        "pyramid's name)")
    cliargs.add_checkpoint(src, "--checkpoint", help="checkpoint name inside --pyramid_path")
    cliargs.add_device(src)
    src.add_argument("--method", help=f"align with a baseline: {', '.join(baselines.METHODS)}")
    src.add_argument("--smoothing_nm", type=float, default=None,
                     help="keep only the part of the --pyramid_path field that is affine over "
                     "about this length (metroem.regularize; needs --resolution_nm)")
    src.add_argument("--smoothing_gate", default=None, metavar="LOW,HIGH|off",
                     help="the smoothing's match gate, as for metroem align (default: the "
                     f"pyramid's, else {_GATE})")
    src.add_argument("--resolution_nm", type=float, default=None,
                     help="nm per MIP0 pixel, for --smoothing_nm (as for metroem align; images "
                     "at --mip m have pixels 2^m times that)")
    p.add_argument("--chunk", type=int, default=32, help="Pearson block side in pixels")
    p.add_argument("--report", metavar="DIR", help="write PNG pictures into DIR")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    cliargs.add_common(p)
    return p


def read_image(path: str) -> Tensor:
    """A greyscale image file as ``(H, W)`` float32 raw values."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise MetroemError(f"image {path} does not exist; pass an existing PNG/TIF file")
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("F") if im.mode in ("I", "I;16", "F") else im.convert("L"))
    except (UnidentifiedImageError, OSError) as e:
        raise MetroemError(f"cannot read image {path}: {str(e).splitlines()[0]}") from e
    return torch.from_numpy(a.astype(np.float32))


def _aligner(args, data_nm: float | None = None):
    """The field method the flags ask for; ``data_nm`` is the MIP 0 pixel size of a layer's
    sections (image files: ``--resolution_nm``), so the pyramid runs them at its own MIP of
    that pixel size, as ``metroem align`` does."""
    if args.pyramid_path and args.method:
        raise MetroemError("give --pyramid_path or --method, not both")
    if args.pyramid_path:
        from metroem import inference, pretrained

        pyramid = pretrained.resolve(args.pyramid_path)
        if not pyramid.is_dir():
            raise MetroemError(f"pyramid {args.pyramid_path} is not a folder; pass a trained "
                               "pyramid or a shipped pyramid's name")
        # data of another pixel size runs at the pyramid's MIP of theirs (metroem align)
        data_nm = args.resolution_nm if data_nm is None else data_nm
        mip, stages, offset = inference.pyramid_input(pyramid, data_nm, args.mip, None)
        return baselines.metroem_method(str(pyramid), args.checkpoint_name,
                                        device=str(parse_device(args.device)),
                                        input_mip=args.mip if mip is None else mip,
                                        stages=stages,
                                        smoothing_nm=args.smoothing_nm,
                                        resolution_nm=None if data_nm is None
                                        else data_nm / 2**offset,
                                        smoothing_gate=regularize.checked_gate_arg(
                                            args.smoothing_gate))
    if args.smoothing_nm or args.smoothing_gate:
        raise MetroemError("--smoothing_nm and --smoothing_gate apply to a --pyramid_path; "
                           "pass one, or drop them")
    if args.method:
        if args.method not in baselines.METHODS:
            raise MetroemError(
                f"unknown --method {args.method!r}; choose from {', '.join(baselines.METHODS)}"
            )
        return baselines.METHODS[args.method]
    return None


def pair_metrics(src: Tensor, tgt: Tensor, field: Tensor, chunk: int, gt=None) -> dict:
    """Every pair metric, before (identity) and after warping ``src`` by ``field``."""
    warped = fields.warp_image(metrics.as_image(src), metrics.as_field(field))[0, 0]
    out = {
        "before": {
            "residual": metrics.residual(src, tgt),
            "pearson": metrics.pearson_summary(metrics.chunked_pearson(src, tgt, chunk)),
        },
        "after": {
            "residual": metrics.residual(warped, tgt),
            "pearson": metrics.pearson_summary(metrics.chunked_pearson(warped, tgt, chunk)),
        },
        "folds": metrics.fold_stats(field),
        "roughness": metrics.roughness(field),
        "mean_displacement": [float(v) for v in metrics.as_field(field).mean((0, 2, 3))],
    }
    interior = metrics.interior_mask(tuple(metrics.as_field(field).shape[-2:]), INTERIOR)
    interior &= metrics.as_image(tgt)[0, 0] != 0
    if int(interior.sum()) >= 3:
        out["strain"] = metrics.gradient_norm_stats(field, interior)
        out["nonaffine"] = metrics.nonaffine_stats(field, interior)
    if gt is not None:
        mask = metrics.valid_after_warp(src, gt, margin=4) & (metrics.as_image(tgt)[0, 0] != 0)
        out["epe"] = metrics.epe_stats(field, gt, mask)
    return out


INTERIOR = 16  # px along the border left out of the strain and non-affine part


def _print_pair(m: dict, registered: bool = False) -> None:
    for when in ("before", "after"):
        r, p = m[when]["residual"], m[when]["pearson"]
        print(f"{when:6s}  mse {r['mse']:.2f}  ncc {r['ncc']:.4f}  chunked r mean "
              f"{p['mean']:.4f} median {p['median']:.4f} p5 {p['p5']:.4f} "
              f"low-r blocks {100 * p['frac_low']:.1f}%")
    f = m["folds"]
    dx, dy = m["mean_displacement"]
    print(f"field   mean ({dx:.2f}, {dy:.2f}) px  folds {f['count']} "
          f"({100 * f['fraction']:.4f}%)  roughness {m['roughness']:.4f} px")
    if "strain" in m:
        st, na = m["strain"], m["nonaffine"]
        what = "morph (truth 0)" if registered else "non-affine part"
        print(f"shape   strain |grad f| median {st['median']:.4f} p95 {st['p95']:.4f}  "
              f"{what} median {na['median']:.3f} p95 {na['p95']:.3f} px (interior)")
    if "epe" in m:
        e = m["epe"]
        print(f"EPE     median {e['median']:.3f}  p95 {e['p95']:.3f}  max {e['max']:.3f}  "
              f"mean {e['mean']:.3f} px over {e['pixels']} pixels")


def _run_pair(args) -> dict:
    if not (args.src and args.tgt):
        raise MetroemError("an image pair needs both --src and --tgt")
    src, tgt = read_image(args.src), read_image(args.tgt)
    if src.shape != tgt.shape:
        raise MetroemError(
            f"--src is {src.shape[1]}x{src.shape[0]} but --tgt is {tgt.shape[1]}x{tgt.shape[0]};"
            " crop them to one size"
        )
    method = _aligner(args)
    if args.field and method is not None:
        raise MetroemError("give --field or --pyramid_path/--method, not both")
    if args.field:
        field = report.field_from_file(args.field)
    elif method is not None:
        field = baselines.align(method, src, tgt)
    else:
        raise MetroemError("no field to evaluate; pass --field F.npy, --pyramid_path DIR or "
                           "--method")
    if tuple(field.shape[-2:]) != tuple(src.shape):
        raise MetroemError(
            f"field is {field.shape[-1]}x{field.shape[-2]} but the images are "
            f"{src.shape[1]}x{src.shape[0]}; pass the field of this pair at this resolution"
        )
    if args.gt and args.registered:
        raise MetroemError("give --gt or --registered (truth 0), not both")
    gt = report.field_from_file(args.gt) if args.gt else None
    if args.registered:
        gt = torch.zeros_like(field)
    if gt is not None and gt.shape != field.shape:
        raise MetroemError(f"--gt has shape {tuple(gt.shape)}, the field {tuple(field.shape)}")
    m = pair_metrics(src, tgt, field, args.chunk, gt)
    if args.report:
        paths = report.write_pair_report(args.report, src, tgt, field, name="pair",
                                         chunk=args.chunk, gt=gt)
        m["report"] = paths
    return m


def _check_chunk_alignment(x0: int, y0: int, chunk: int) -> None:
    if x0 % chunk or y0 % chunk:
        raise MetroemError(
            f"--bbox origin ({x0}, {y0}) must be a multiple of --chunk {chunk} to write a "
            "Pearson layer; move the box or drop --pearson_dst"
        )


def _pearson_layer(args, info, x0, y0, w, h) -> str:
    """Create (or reuse) the Pearson map layer; return its path."""
    from metroem import volumes

    c = args.chunk
    _check_chunk_alignment(x0, y0, c)
    res = info.resolution[args.mip]
    want_res = (res[0] * c, res[1] * c, res[2])
    path = volumes.normalize_path(args.pearson_dst)
    lo = (x0 // c, y0 // c, args.z_start)
    size = (w // c, h // c, args.z_end - args.z_start)
    try:
        existing = volumes.volume_info(path)
    except MetroemError:
        existing = None
    if existing is None:
        volumes.create_volume(path, size, 1, dtype="float32", resolution=want_res,
                              offset_xyz=lo, chunk_xy=64)
        return path
    e_lo, e_size = existing.offset[0], existing.size[0]
    inside = all(e_lo[i] <= lo[i] and lo[i] + size[i] <= e_lo[i] + e_size[i] for i in range(3))
    if tuple(existing.resolution[0]) != tuple(float(v) for v in want_res) or not inside:
        raise MetroemError(
            f"{path} exists with another resolution or bounds; pick a new --pearson_dst"
        )
    return path


def _layer_info(flag: str, path: str, mip: int):
    """Info of the layer given as ``flag``; one line when it is missing or lacks ``mip``."""
    from metroem import volumes

    try:
        info = volumes.volume_info(path)
    except MetroemError as e:
        raise MetroemError(f"{flag}: {str(e).split('; ')[0]}; check {flag}") from e
    if mip not in info.mips:
        raise MetroemError(f"{flag} {path} has no MIP {mip}; it has {list(info.mips)}")
    return info


def _check_z_range(flag: str, info, mip: int, z_start: int, z_end: int) -> None:
    z0, nz = info.offset[mip][2], info.size[mip][2]
    if z_start < z0 or z_end > z0 + nz:
        raise MetroemError(
            f"z range [{z_start}, {z_end}) is outside {flag} {info.path}, which holds sections "
            f"[{z0}, {z0 + nz}); pick --z_start/--z_end inside it"
        )


def _check_same_xy(info, src_info, mip: int) -> None:
    (x, y, _), (w, h, _) = info.offset[mip], info.size[mip]
    (sx, sy, _), (sw, sh, _) = src_info.offset[mip], src_info.size[mip]
    if (x, y, w, h) != (sx, sy, sw, sh):
        raise MetroemError(
            f"--src_path is {sw}x{sh} voxels at ({sx}, {sy}) but --image_path is {w}x{h} at "
            f"({x}, {y}) at MIP {mip}; compare a raw and an aligned layer of one section size"
        )


class _Stack(NamedTuple):
    """The stack view of a volume run and what its summary needs to say where it looked."""

    view: stackview.StackView
    box: dict[str, int]  # mip, x0, y0, width, height
    where: dict[str, int]  # absolute y of the xz reslice, x of the yz one
    scale: dict[str, dict]  # stackview.reslice_scale per plane


def _stack_view(args, info, box: tuple[int, int, int, int]) -> _Stack:
    """The stack view of the run; checks --reslice_x/--reslice_y/--reslice_z_scale."""
    x0, y0, w, h = box
    y = y0 + h // 2 if args.reslice_y is None else args.reslice_y
    x = x0 + w // 2 if args.reslice_x is None else args.reslice_x
    if not y0 <= y < y0 + h:
        raise MetroemError(f"--reslice_y {y} is outside the box rows [{y0}, {y0 + h})")
    if not x0 <= x < x0 + w:
        raise MetroemError(f"--reslice_x {x} is outside the box columns [{x0}, {x0 + w})")
    z_px = args.reslice_z_scale
    if z_px is not None and not 1 <= z_px <= 128:
        raise MetroemError(f"--reslice_z_scale must be in 1..128, got {z_px}")
    n = args.z_end - args.z_start
    rx, ry, rz = info.resolution[args.mip]
    scale = {"xz": stackview.reslice_scale(rz, rx, n, w, z_px),
             "yz": stackview.reslice_scale(rz, ry, n, h, z_px)}
    view = stackview.StackView(z_start=args.z_start, row=y - y0, column=x - x0)
    region = {"mip": args.mip, "x0": x0, "y0": y0, "width": w, "height": h}
    return _Stack(view, region, {"x": x, "y": y}, scale)


def _volume_inputs(args):
    """Check the z range, layers and flags of a volume run before anything is written."""
    if args.z_start is None or args.z_end is None:
        raise MetroemError("a CloudVolume z range needs --z_start and --z_end")
    if args.z_end <= args.z_start:
        raise MetroemError(f"--z_end ({args.z_end}) must be greater than --z_start")
    if args.field or args.gt or args.src or args.tgt:
        raise MetroemError("--src/--tgt/--field/--gt are for image pairs, not with --image_path")
    info = _layer_info("--image_path", args.image_path, args.mip)
    from metroem.inference import layer_resolution_nm

    method = _aligner(args, layer_resolution_nm(info))
    if args.field_path and method is not None:
        raise MetroemError("give --field_path or --pyramid_path/--method, not both")
    reslice = (args.reslice_x, args.reslice_y, args.reslice_z_scale)
    if method is not None and (args.src_path or any(v is not None for v in reslice)):
        raise MetroemError("--src_path and --reslice_* look at a raw and an aligned stack; they "
                           "do not go with --pyramid_path/--method (sections aligned pair by "
                           "pair)")
    _check_z_range("--image_path", info, args.mip, args.z_start, args.z_end)
    z_lo = info.offset[args.mip][2]
    if args.src_path:
        src_info = _layer_info("--src_path", args.src_path, args.mip)
        _check_z_range("--src_path", src_info, args.mip, args.z_start, args.z_end)
        _check_same_xy(info, src_info, args.mip)
        z_lo = max(z_lo, src_info.offset[args.mip][2])
    return method, info, z_lo


def _run_volume(args) -> dict:
    from metroem import volumes

    method, info, z_lo = _volume_inputs(args)
    if args.bbox:
        x0, y0, w, h = args.bbox
        (lx, ly, _), (lw, lh, _) = info.offset[args.mip], info.size[args.mip]
        if x0 < lx or y0 < ly or x0 + w > lx + lw or y0 + h > ly + lh:
            raise MetroemError(
                f"--bbox x[{x0},{x0 + w}) y[{y0},{y0 + h}) is not inside the layer, which covers "
                f"x[{lx},{lx + lw}) y[{ly},{ly + lh}) at MIP {args.mip}; move or shrink it"
            )
    else:
        (x0, y0, _), (w, h, _) = info.offset[args.mip], info.size[args.mip]
    if w < args.chunk or h < args.chunk:
        raise MetroemError(f"--bbox {w}x{h} is smaller than one --chunk {args.chunk} block")
    # Pairwise alignment (--pyramid_path/--method) leaves no stack in one frame to reslice.
    stack = _stack_view(args, info, (x0, y0, w, h)) if method is None else None
    dst = _pearson_layer(args, info, x0, y0, w, h) if args.pearson_dst else None

    def read(path: str, z: int) -> Tensor:
        return volumes.read(path, args.mip, x0, y0, z, w, h, dtype=torch.float32)

    def section(z: int) -> Tensor:
        """Section z as evaluated; the stack view also gets it "before" and "after"."""
        raw = img = read(args.image_path, z)
        if args.field_path:
            img = fields.warp_image(raw, read(args.field_path, z))
        if stack is not None:
            layers = {"after": img[0, 0]}
            if args.src_path or args.field_path:
                before = read(args.src_path, z) if args.src_path else raw
                layers = {"before": before[0, 0], **layers}
            stack.view.add(z, layers)
        return img[0, 0]

    per_z, maps, pictures = {}, [], []
    first = max(args.z_start - 1, z_lo)
    if first == args.z_start:
        print(f"z {first:5d}: first section of the layer, nothing to compare it with")
    prev = section(first)
    for z in range(first + 1, args.z_end):
        cur = section(z)
        field = baselines.align(method, cur, prev) if method is not None else None
        moved = cur if field is None else fields.warp_image(cur[None, None], field)[0, 0]
        rmap = metrics.chunked_pearson(moved, prev, args.chunk)
        maps.append(rmap)
        entry = {
            "pearson": metrics.pearson_summary(rmap),
            "residual": metrics.residual(moved, prev),
        }
        if field is not None:
            entry["folds"] = metrics.fold_stats(field)
        per_z[z] = entry
        p = entry["pearson"]
        print(f"z {z:5d} vs {z - 1:5d}: chunked r mean {p['mean']:.4f} p5 {p['p5']:.4f} "
              f"low-r blocks {100 * p['frac_low']:.1f}%  ncc {entry['residual']['ncc']:.4f}")
        if dst is not None:
            volumes.write(dst, 0, x0 // args.chunk, y0 // args.chunk, z, rmap[None, None])
        if args.report:
            panel = viz.side_by_side(
                viz.titled(viz.overlay(moved, prev), f"z {z} (red) on z {z - 1} (green)"),
                viz.titled(viz.heatmap(rmap, -0.2, 1.0, cell=args.chunk),
                           f"chunked r, mean {p['mean']:.3f}"),
                viz.titled(viz.colorbar(-0.2, 1.0), "r"),
            )
            pictures.append(viz.save_png(os.path.join(args.report, f"pearson_z{z}.png"), panel))
        prev = cur
    overall = metrics.pearson_summary(
        torch.cat([m.flatten() for m in maps]) if maps else torch.empty(0))
    if maps and not overall["blocks"]:
        raise MetroemError(
            f"{args.image_path} has no data at MIP {args.mip} in z [{first}, {args.z_end}) "
            "(every block empty or flat); pass the --mip it was written at (metroem align "
            "writes its --mip and coarser)")
    print(f"all      : chunked r mean {overall['mean']:.4f} p5 {overall['p5']:.4f} over "
          f"{overall['blocks']} blocks")
    result = {"sections": per_z, "overall": overall, "pearson_layer": dst}
    if stack is not None:
        result["stack"] = _finish_stack(args, stack, pictures)
    return result


def _finish_stack(args, stack: _Stack, pictures: list[str]) -> dict:
    """Summarise (and with --report draw) the stack view; print one line per layer."""
    layers = {"after": args.image_path}
    if args.src_path or args.field_path:
        layers = {"before": args.src_path or args.image_path, **layers}
    summary = stackview.stack_summary(stack.view, layers, stack.box, stack.where, stack.scale)
    if args.report:
        summary = stackview.write_stack_report(args.report, stack.view, summary, pictures)
    for name, s in summary["consecutive"].items():
        t = s["trend"]["one_minus_r"]
        print(f"stack {name:6s}: consecutive 1 - r median {s['median']['one_minus_r']:.4f} "
              f"first {t['first']:.4f} last {t['last']:.4f} slope "
              f"{t['slope_per_section']:+.2e}/section; MAD median {s['median']['mad']:.2f}")
    return summary


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = cliargs.parse_args(build_parser(), argv)
    if args.chunk < 2:
        raise MetroemError(f"--chunk must be at least 2, got {args.chunk}")
    if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
        raise MetroemError(f"--report {args.report} is a file; pass a folder for the pictures")
    if args.image_path and (args.src or args.tgt):
        raise MetroemError("give either --src/--tgt (image pair) or --image_path (volume), not "
                           "both")
    stack_flags = (args.src_path, args.reslice_x, args.reslice_y, args.reslice_z_scale)
    if not args.image_path and any(v is not None for v in stack_flags):
        raise MetroemError("--src_path and --reslice_* look at a CloudVolume z range; pass the "
                           "aligned layer as --image_path with --z_start/--z_end")
    if args.image_path:
        result = _run_volume(args)
    elif args.src or args.tgt:
        result = _run_pair(args)
        if not args.json:
            _print_pair(result, args.registered)
    else:
        raise MetroemError("nothing to evaluate; pass --src/--tgt or --image_path (see --help)")
    if args.json:
        print(json.dumps(stackview.json_safe(result), indent=1))
    if args.report:
        log.info("pictures in %s", args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
