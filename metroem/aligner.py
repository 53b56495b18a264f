"""A trained pyramid as one aligner: ``forward(src_img, tgt_img, src_agg_field=None) -> field``.

Stages run coarse to fine. Each stage sees the images resampled from the input resolution to its
own MIP (masked box average, so 0 = no data survives) and the field so far resampled to that
MIP; it returns the saturated field at its MIP, which is carried on to the next stage. Images are
warped once per stage from the raw source, never resampled repeatedly. The result is in pixels
at the input MIP.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from metroem import fields, modules

Tensor = torch.Tensor


class PyramidAligner(nn.Module):
    """Runs ``stages`` (a list of ``(mip, model)``, coarse to fine) on an image pair."""

    def __init__(self, stages: list[tuple[int, nn.Module]], input_mip: int | None = None):
        super().__init__()
        if not stages:
            raise ValueError("a pyramid aligner needs at least one stage")
        self.mips = [int(m) for m, _ in stages]
        self.stages = nn.ModuleList([m for _, m in stages])
        self.input_mip = min(self.mips) if input_mip is None else int(input_mip)

    def forward(
        self,
        src_img: Tensor,
        tgt_img: Tensor,
        src_agg_field: Tensor | None = None,
        input_mip: int | None = None,
        **kwargs,
    ) -> Tensor:
        """Saturated field ``(N, 2, H, W)`` in pixels at ``input_mip`` (default: finest stage)."""
        mip_in = self.input_mip if input_mip is None else int(input_mip)
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            return self._run(src_img, tgt_img, src_agg_field, mip_in)

    def _run(self, src_img, tgt_img, agg, mip_in: int) -> Tensor:
        dev = next(self.parameters()).device
        src = src_img.to(device=dev, dtype=torch.float32)
        tgt = tgt_img.to(device=dev, dtype=torch.float32)
        n, _, h, w = src.shape
        if agg is not None:
            agg = agg.to(device=dev, dtype=torch.float32)
        if not (src.flatten(1).ne(0).any() and tgt.flatten(1).ne(0).any()):
            return agg if agg is not None else fields.identity(n, h, w, device=dev)
        k = 2 ** max(0, max(self.mips) - mip_in)
        ph, pw = (-h) % k, (-w) % k
        if ph or pw:
            src, tgt = F.pad(src, (0, pw, 0, ph)), F.pad(tgt, (0, pw, 0, ph))
            if agg is not None:
                agg = F.pad(agg, (0, pw, 0, ph), mode="replicate")
        for mip, model in zip(self.mips, self.stages, strict=True):
            s = fields.resample_image(src, mip_in, mip)
            t = fields.resample_image(tgt, mip_in, mip)
            a = None if agg is None else fields.resample_field(agg, mip_in, mip)
            out = model(s, t, src_agg_field=a)
            if mip > mip_in:
                agg = fields.upsample_field(out, mip - mip_in, size=tuple(src.shape[-2:]))
            else:
                agg = fields.downsample_field(out, mip_in - mip)
        return agg[..., :h, :w]


def load_aligner(
    pyramid_path: str | os.PathLike,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    device: str | torch.device = "cpu",
    input_mip: int | None = None,
) -> PyramidAligner:
    """Load a trained pyramid (all stages or the given stage numbers) as one aligner."""
    mods = modules.select_stages(modules.discover(pyramid_path), stages)
    loaded = [
        (m.mip, modules.load_module(m.path, checkpoint_name=checkpoint_name, device=str(device)))
        for m in mods
    ]
    return PyramidAligner(loaded, input_mip=input_mip).to(device).eval()
