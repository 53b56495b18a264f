"""``metroem export PYRAMID OUT.pt``: the whole pyramid as one TorchScript file.

The file holds one module, ``field = model(src, tgt)``: images ``(N, 1, H, W)`` of any size and
dtype (raw values, 0 = no data) at the pyramid's input MIP, field ``(N, 2, H, W)`` float32 in
pixels (channel 0 = x, pull). It loads with ``torch.jit.load`` and needs only torch.

How: the pyramid is traced once on a fixed window of ``chunk + 2 pad`` pixels (tracing bakes
some sizes into the graph, so a trace is exact only at the size it was traced at). A scripted
wrapper cuts any input into chunks exactly like :func:`metroem.tiling.align_windows` (same
windows, zero padding outside, padded borders discarded), so the exported field equals that
whole-pyramid-per-window field of the Python aligner with the same ``chunk`` / ``pad`` (not the
stage-wise :func:`metroem.tiling.align_tiled`); for inputs of at most one chunk it equals a
single aligner call on the padded window.

Example::

    metroem export models/demo demo_aligner.pt --chunk 512 --pad 128
    python -c "import torch; m = torch.jit.load('demo_aligner.pt'); print(m.chunk, m.pad)"
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from metroem import tiling
from metroem.aligner import PyramidAligner, load_aligner
from metroem.atomic import atomic_path
from metroem.errors import MetroemError, cli_errors

Tensor = torch.Tensor

__all__ = ["export_pyramid", "TiledField", "main"]


class _Core(nn.Module):
    """``aligner(src, tgt)`` with a fixed two-argument signature, for tracing."""

    def __init__(self, aligner: PyramidAligner):
        super().__init__()
        self.aligner = aligner

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.aligner(src, tgt)


class TiledField(nn.Module):
    """Scriptable tiling around a core traced at ``window x window`` pixels."""

    def __init__(self, core: nn.Module, chunk: int, pad: int, window: int, input_mip: int):
        super().__init__()
        self.core = core
        self.chunk = chunk
        self.pad = pad
        self.window = window
        self.input_mip = input_mip

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        src = src.float()
        tgt = tgt.float()
        n, h, w = src.shape[0], src.shape[2], src.shape[3]
        out = torch.zeros(n, 2, h, w, dtype=torch.float32, device=src.device)
        if not (bool(src.ne(0).any()) and bool(tgt.ne(0).any())):
            return out
        win, pad, c = self.window, self.pad, self.chunk
        # Pad once so every window lies inside: pad on top/left, enough below/right.
        extra_h = max(0, (h + c - 1) // c * c - h) + win
        extra_w = max(0, (w + c - 1) // c * c - w) + win
        sp = F.pad(src, [pad, extra_w, pad, extra_h])
        tp = F.pad(tgt, [pad, extra_w, pad, extra_h])
        for y0 in range(0, h, c):
            for x0 in range(0, w, c):
                ch = min(c, h - y0)
                cw = min(c, w - x0)
                for i in range(n):  # the trace has batch size 1
                    s = sp[i : i + 1, :, y0 : y0 + win, x0 : x0 + win]
                    t = tp[i : i + 1, :, y0 : y0 + win, x0 : x0 + win]
                    f = self.core(s, t)
                    out[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw] = f[
                        :, :, pad : pad + ch, pad : pad + cw
                    ]
        return out


def export_pyramid(
    pyramid,
    out_path: str,
    chunk: int = 512,
    pad: int = 128,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    input_mip: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write the TorchScript file; ``pyramid`` is a folder or a :class:`PyramidAligner`."""
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
    m = aligner.size_multiple()
    tiling.check_chunking(chunk, pad, m)
    window = tiling.window_size(chunk, pad, m)
    # Trace on a textured example: an all-zero input would take the "no data" shortcut.
    g = torch.Generator().manual_seed(0)
    ex = torch.rand(1, 1, window, window, generator=g) * 200 + 20
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: sizes are fixed on purpose
        core = torch.jit.trace(_Core(aligner), (ex, ex.roll(3, -1)), check_trace=False)
        scripted = torch.jit.script(TiledField(core, chunk, pad, window, aligner.input_mip))
        # Freezing folds the weights in: the first calls after loading optimise less.
        scripted = torch.jit.freeze(
            scripted.eval(), preserved_attrs=["chunk", "pad", "window", "input_mip"]
        )
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    with atomic_path(out_path) as tmp:
        torch.jit.save(scripted, tmp)
    return out_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="metroem export",
        description="Export a pyramid as one TorchScript file: field = model(src, tgt).",
        epilog="example: metroem export models/demo demo_aligner.pt --chunk 512 --pad 128",
    )
    p.add_argument("pyramid", help="pyramid folder")
    p.add_argument("out", help="output .pt file")
    p.add_argument("--chunk", type=int, default=512, help="chunk side, px (default 512)")
    p.add_argument("--pad", type=int, default=128, help="context per side, px (default 128)")
    p.add_argument("--checkpoint_name", help="checkpoint of every module (default: latest)")
    p.add_argument("--stages", type=int, nargs="+", help="stage numbers (default: all)")
    p.add_argument("--mip", type=int, help="input MIP (default: finest stage's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    path = export_pyramid(a.pyramid, a.out, a.chunk, a.pad, a.checkpoint_name, a.stages,
                          a.mip, a.overwrite)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
