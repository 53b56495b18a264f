"""``metroem export --pyramid_path PYRAMID OUT.pt``: the whole pyramid as one TorchScript file.

The file holds one module, ``field = model(src, tgt)`` (optionally ``model(src, tgt,
src_agg_field)``): images ``(N, 1, H, W)`` of any size and dtype (raw values, 0 = no data) at
the pyramid's input MIP, field ``(N, 2, H, W)`` float32 in pixels (channel 0 = x, pull). It
loads with ``torch.jit.load`` and needs only torch.

How: the pyramid is compiled with ``torch.jit.script`` (not traced), so the file runs the same
code as :class:`metroem.aligner.PyramidAligner` at every size: its field equals
``load_aligner(pyramid)(src, tgt)`` on the whole image (to float rounding, checked on export).
Each stage is rebuilt from its module's spec and weights, and the export refuses to write a
file that disagrees with the loaded pyramid on a test pair. Memory
grows with the image; cut large images into overlapping tiles as for any aligner (``metroem
align`` does). Online refinement is not exported.

Example::

    metroem export --pyramid_path isbi isbi_aligner.pt
    python -c "import torch; m = torch.jit.load('isbi_aligner.pt'); print(m.input_mip)"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import torch
from torch import nn

from metroem import cliargs, nets
from metroem.aligner import PyramidAligner, load_aligner
from metroem.atomic import atomic_path
from metroem.errors import MetroemError, cli_errors

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = ["export_pyramid", "ExportedAligner", "main"]

# px: an export that differs more from the loaded pyramid is refused (scripting agrees with the
# eager network to ~1e-6 px; a scripting bug that changes behaviour differs by far more).
CHECK_TOLERANCE = 0.01


class ExportedAligner(nn.Module):
    """``forward(src, tgt, src_agg_field=None) -> field`` over a scripted pyramid."""

    def __init__(self, aligner: PyramidAligner):
        super().__init__()
        self.aligner = aligner
        self.input_mip = int(aligner.input_mip)
        self.mips = list(aligner.mips)

    def forward(self, src: Tensor, tgt: Tensor, src_agg_field: Tensor | None = None) -> Tensor:
        if src.dim() != 4 or src.shape[1] != 1 or src.shape != tgt.shape:
            raise ValueError("src and tgt must both be (N, 1, H, W) images of the same shape")
        agg: Tensor | None = None
        if src_agg_field is not None:
            if (src_agg_field.dim() != 4 or src_agg_field.shape[1] != 2
                    or src_agg_field.shape[0] != src.shape[0]
                    or src_agg_field.shape[-2:] != src.shape[-2:]):
                raise ValueError("src_agg_field must be (N, 2, H, W) matching the images")
            agg = src_agg_field.float()
        return self.aligner.run(src.float(), tgt.float(), agg, self.input_mip)


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
    return PyramidAligner(stages, input_mip=aligner.input_mip).eval()


def _check(scripted: nn.Module, aligner: PyramidAligner) -> float:
    """Max difference (px) between the scripted and the loaded pyramid on a textured pair of an
    awkward size (not a multiple of any stride)."""
    m = aligner.size_multiple()
    h, w = 3 * m + 5, 2 * m + 11
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = 120 + 60 * torch.sin(xx / 5.0) * torch.cos(yy / 7.0)
    src = (base + 20 * torch.rand(h, w, generator=g)).clamp(1, 255)[None, None]
    tgt = (base.roll((1, 2), (0, 1)) + 20 * torch.rand(h, w, generator=g)).clamp(1, 255)[None, None]
    with torch.no_grad():
        return float((scripted(src, tgt) - aligner(src, tgt)).abs().max())


def export_pyramid(
    pyramid,
    out_path: str,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    input_mip: int | None = None,
    overwrite: bool = False,
) -> float:
    """Write the TorchScript file; ``pyramid`` is a folder or a :class:`PyramidAligner`.

    Returns the largest difference (px) between the exported and the loaded pyramid on a test
    pair, measured before writing.
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
            aligner = load_aligner(pyramid, checkpoint_name, stages, "cpu", input_mip)
    aligner = aligner.cpu().eval()
    if aligner.input_mip > max(aligner.mips):
        raise MetroemError(
            f"input MIP {aligner.input_mip} is coarser than every stage (MIPs {aligner.mips})"
        )
    scripted = torch.jit.script(ExportedAligner(_rebuild(aligner)))
    diff = _check(scripted, aligner)
    if not diff <= CHECK_TOLERANCE:
        raise MetroemError(
            f"the exported pyramid differs from the loaded one by {diff:.3g} px (tolerance "
            f"{CHECK_TOLERANCE}); nothing was written: please report this as a metroem bug"
        )
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.jit.save(scripted, tmp)
    return diff


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(
        prog="metroem export",
        description="Export a pyramid as one TorchScript file: field = model(src, tgt).",
        epilog="example: metroem export --pyramid_path isbi isbi_aligner.pt",
    )
    cliargs.add_pyramid(p)
    p.add_argument("out", help="output .pt file")
    cliargs.add_checkpoint(p)
    p.add_argument("--stages", type=int, nargs="+", help="stage numbers (default: all)")
    p.add_argument("--mip", type=int, help="input MIP (default: finest stage's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = cliargs.parse_args(build_parser(), argv, announce_threads=True)
    diff = export_pyramid(a.pyramid_path, a.out, a.checkpoint_name, a.stages, a.mip, a.overwrite)
    log.info("wrote %s (equals the loaded pyramid within %.1g px on a test pair)", a.out, diff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
