"""``metroem export --pyramid_path PYRAMID OUT.pt2``: a whole pyramid as one torch.export program.

The file holds one program, ``field = program.module()(src, tgt)``: float32 images
``(N, 1, H, W)`` of any size (raw values, 0 = no data) at the pyramid's input MIP, and the
field ``(N, 2, H, W)`` float32 in pixels (channel 0 = x, pull). An incoming field is not an
input (the program starts from none, as ``metroem align`` does): warp the source by it first
and compose. It loads with ``torch.export.load`` and needs only
torch; the pyramid's MIPs ride along as ``metroem_info.json`` (:data:`INFO_FILE`,
``torch.export.load(path, extra_files={"metroem_info.json": ""})``).

How: :class:`metroem.aligner.PyramidAligner` is written without branches on image sizes or
values (each input is padded to a multiple of the pyramid's size multiple; a pair without data
gets a zero field through ``torch.where``), so ``torch.export`` captures one graph
with symbolic height, width and batch that holds for every size. Each stage is rebuilt from
its module's spec and weights, and the export refuses to write a program that disagrees with
the loaded pyramid by more than :data:`CHECK_TOLERANCE` px on test pairs of other sizes than
the one it was captured on. Memory grows with the image; cut large images into overlapping
tiles as for any aligner (``metroem align`` does), with the smoothing's reach as context
(:func:`metroem.regularize.regularized_support_px`). The field smoothing with its match gate
(:mod:`metroem.regularize`) is part of the program when the aligner has it (a pyramid's
``pyramid.json`` default, or ``--smoothing_nm``; its length is fixed in pixels at export, and
images must be more than one smoothing grid cell wide); online refinement and the
phase-correlation start are not exported. Capturing a pyramid takes a minute or two on CPU.

Example::

    metroem export --pyramid_path isbi isbi_aligner.pt2
    python -c "import torch; p = torch.export.load('isbi_aligner.pt2'); print(p.module())"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

import torch
from torch import nn

from metroem import __version__, cliargs, nets, regularize
from metroem.aligner import PyramidAligner, load_aligner
from metroem.atomic import atomic_path
from metroem.errors import MetroemError, cli_errors

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["export_pyramid", "ExportedAligner", "load_exported", "INFO_FILE", "main"]

# px: an export that differs more from the loaded pyramid is refused (the exported graph agrees
# with the eager network to ~1e-3 px; a capture that went wrong differs by far more).
CHECK_TOLERANCE = 0.01
INFO_FILE = "metroem_info.json"  # in the archive: input MIP, stage MIPs, metroem version


class ExportedAligner(nn.Module):
    """``forward(src, tgt) -> field``: what :func:`torch.export.export` captures."""

    def __init__(self, aligner: PyramidAligner):
        super().__init__()
        self.aligner = aligner
        self.input_mip = int(aligner.input_mip)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        field = self.aligner.run(src, tgt, None, self.input_mip)
        if self.aligner.smoothing_px > 0:  # as PyramidAligner.forward, at the input MIP
            field = regularize.regularized_field(
                field, src, tgt, self.aligner.smoothing_px, self.aligner.smoothing_gate,
                self.aligner.gate_window_px)
        return field


def _rebuild(aligner: PyramidAligner) -> PyramidAligner:
    """The same pyramid with every stage built by this metroem's ``nets`` from its spec."""
    stages = []
    for mip, stage in zip(aligner.mips, aligner.stages, strict=True):
        spec = getattr(stage, "spec", None)
        if spec is None:
            raise MetroemError(f"the MIP {mip} stage has no network spec; it cannot be exported")
        try:
            model = nets.build_model(dict(spec))
            model.load_state_dict(stage.state_dict())
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0]
            raise MetroemError(
                f"the MIP {mip} stage cannot be rebuilt by this metroem's network code ({first}); "
                "export it with the metroem version it was trained with"
            ) from None
        model.requires_grad_(False)  # an inference file: no autograd graph
        stages.append((mip, model))
    return PyramidAligner(stages, input_mip=aligner.input_mip,
                          smoothing_px=aligner.smoothing_px,
                          smoothing_gate=aligner.smoothing_gate,
                          gate_window_px=aligner.gate_window_px).eval()


def _textured_pair(n: int, h: int, w: int, seed: int) -> tuple[Tensor, Tensor]:
    """A smooth textured pair offset by a few pixels, with noise (float32, values 1..255)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = 120 + 60 * torch.sin(xx / 5.0) * torch.cos(yy / 7.0)
    src = (base + 20 * torch.rand(n, 1, h, w, generator=g)).clamp(1, 255)
    tgt = (base.roll((1, 2), (0, 1)) + 20 * torch.rand(n, 1, h, w, generator=g)).clamp(1, 255)
    return src.float(), tgt.float()


def _capture(module: ExportedAligner, multiple: int) -> torch.export.ExportedProgram:
    """The program, captured on a batch of 2 at an awkward size (no multiple of any stride),
    with batch, height and width symbolic."""
    h, w = 3 * multiple + 5, 2 * multiple + 11
    src, tgt = _textured_pair(2, h, w, seed=0)
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with torch.no_grad():
        return torch.export.export(module, (src, tgt), dynamic_shapes={"src": dims, "tgt": dims})


def _check(program: nn.Module, aligner: PyramidAligner) -> float:
    """Max difference (px) between the program and the loaded pyramid's field (smoothed as
    the aligner smooths, without refinement or phase-correlation start) on pairs of other sizes
    than the captured one: a multiple of the pad multiple, a size below it, and another
    awkward one."""
    m = aligner.pad_multiple()
    eager = ExportedAligner(aligner)
    worst = 0.0
    with torch.no_grad():
        for i, (h, w) in enumerate([(2 * m, 3 * m), (m // 2 + 3, m + 1), (2 * m + 7, m + 13)]):
            src, tgt = _textured_pair(1, h, w, seed=i + 1)
            worst = max(worst, float((program(src, tgt) - eager(src, tgt)).abs().max()))
    return worst


def export_pyramid(
    pyramid,
    out_path: str,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    input_mip: int | None = None,
    overwrite: bool = False,
    smoothing_nm: float | None = None,
    resolution_nm: float | None = None,
    smoothing_gate: tuple[float, float] | str | None = None,
) -> float:
    """Write the ``torch.export`` program; ``pyramid`` is a folder or a :class:`PyramidAligner`.

    ``smoothing_nm`` / ``resolution_nm`` / ``smoothing_gate`` as for
    :func:`metroem.aligner.load_aligner` (default: the pyramid's ``pyramid.json``; 0 = the
    raw field); an aligner object is exported with its own smoothing. Returns the largest
    difference (px) between the exported and the loaded pyramid on test pairs, measured before
    writing.
    """
    if os.path.exists(out_path) and not overwrite:
        raise MetroemError(f"{out_path} already exists; pass --overwrite to replace it")
    if isinstance(pyramid, PyramidAligner):
        aligner = pyramid
        if input_mip is not None:
            aligner.input_mip = int(input_mip)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            aligner = load_aligner(pyramid, checkpoint_name, stages, "cpu", input_mip,
                                   smoothing_nm=smoothing_nm, resolution_nm=resolution_nm,
                                   smoothing_gate=smoothing_gate)
    aligner = aligner.cpu().eval()
    if aligner.input_mip > max(aligner.mips):
        raise MetroemError(
            f"input MIP {aligner.input_mip} is coarser than every stage (MIPs {aligner.mips})"
        )
    if aligner.translation_init:
        log.warning("the phase-correlation start (--translation_init, or the pyramid's "
                    "pyramid.json) is not exported: the program starts each pair from no field; "
                    "for drift beyond the coarse stage's reach warp the source by a translation "
                    "first")
    if aligner.refine:
        log.warning("online refinement is not exported: the program does not refine")
    if aligner.smoothing_px > 0:
        log.info("smoothing over %.4g px at the input MIP (gate %s) is part of the program",
                 aligner.smoothing_px, aligner.smoothing_gate or "off")
    log.info("capturing the pyramid with torch.export (MIPs %s, input MIP %d; a few minutes)",
             aligner.mips, aligner.input_mip)
    program = _capture(ExportedAligner(_rebuild(aligner)), aligner.pad_multiple())
    diff = _check(program.module(), aligner)
    if not diff <= CHECK_TOLERANCE:
        raise MetroemError(
            f"the exported pyramid differs from the loaded one by {diff:.3g} px (tolerance "
            f"{CHECK_TOLERANCE}); nothing was written: please report this as a metroem bug"
        )
    info = {"input_mip": int(aligner.input_mip), "mips": [int(m) for m in aligner.mips],
            "metroem_version": __version__,
            "smoothing_px": float(aligner.smoothing_px),
            "smoothing_gate": (list(aligner.smoothing_gate) if aligner.smoothing_gate
                               and aligner.smoothing_px > 0 else None),
            "gate_window_px": float(aligner.gate_window_px) if aligner.smoothing_px else 0.0,
            "call": "program.module()(src, tgt): float32 (N,1,H,W) images -> (N,2,H,W) field "
                    "in pixels at input_mip"}
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.export.save(program, tmp, extra_files={INFO_FILE: json.dumps(info)})
    return diff


def load_exported(path: str) -> tuple[nn.Module, dict]:
    """``(module, info)`` of an exported file: ``module(src, tgt)`` and the
    :data:`INFO_FILE` dictionary (``input_mip``, ``mips``, ``metroem_version``)."""
    extra = {INFO_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[INFO_FILE])


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="metroem export",
        description="Export a pyramid as one torch.export program (.pt2): "
                    "field = model(src, tgt).",
        epilog="example: metroem export --pyramid_path isbi isbi_aligner.pt2",
    )
    cliargs.add_pyramid(p)
    p.add_argument("out", help="output file (.pt2)")
    cliargs.add_checkpoint(p)
    p.add_argument("--stages", type=int, nargs="+", help="stage numbers (default: all)")
    p.add_argument("--mip", type=int, help="input MIP (default: finest stage's)")
    p.add_argument("--smoothing_nm", type=float, default=None,
                   help="field smoothing length in the program (default: the pyramid's "
                   "pyramid.json; 0 = the raw field), as metroem align --smoothing_nm")
    p.add_argument("--resolution_nm", type=float, default=None,
                   help="nm per MIP0 pixel of the images the program will get, for "
                   "--smoothing_nm (default: the pyramid's pyramid.json)")
    p.add_argument("--smoothing_gate", default=None, metavar="LOW,HIGH|off",
                   help="the smoothing's match gate, as metroem align --smoothing_gate")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = cliargs.parse_args(build_parser(), argv, announce_threads=True)
    diff = export_pyramid(a.pyramid_path, a.out, a.checkpoint_name, a.stages, a.mip, a.overwrite,
                          a.smoothing_nm, a.resolution_nm,
                          regularize.checked_gate_arg(a.smoothing_gate))
    log.info("wrote %s (equals the loaded pyramid within %.1g px on a test pair)", a.out, diff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
