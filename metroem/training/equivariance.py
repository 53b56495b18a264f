"""Equivariance (transformation-consistency) term: a deformed source must give a consistent field.

Aligners of neighbouring sections have no ground truth, but they do have a law: if the source is
deformed by a known field ``d`` before aligning, the new field must be the old one with ``d``
undone. With ``r0`` the field aligning source ``S`` to target ``T`` and ``r1`` the field aligning
``S_d = warp(S, d)`` to ``T``, ``S_d(p + r1(p)) = S(p + r1(p) + d(p + r1(p)))`` so consistency
means ``compose(d, r1) == r0``; no inverse of ``d`` is needed. The term is the mean end-point
distance between the two over pixels valid in all three images. It is what the quality benchmark
measures on real neighbour pairs ("equivariance EPE") and it trains a stage to correct an
incoming misalignment completely rather than partly.

Both fields come from one forward pass of the stage on a doubled batch (``S`` and ``S_d``,
each against ``T``), so DDP sees one forward per step. A stage with an incoming field sees its
source pre-warped by it (what the stage does internally), so ``r0`` / ``r1`` are residuals and
the saturated prediction is ``compose(agg, r0)``.
"""

from __future__ import annotations

import torch

from metroem import fields
from metroem.synth import DeformationSpec, random_field

Tensor = torch.Tensor

__all__ = ["forward_with_equivariance", "consistency_epe"]


def consistency_epe(r0: Tensor, r1: Tensor, d: Tensor, weight: Tensor) -> Tensor:
    """Mean ``|compose(d, r1) - r0|`` (pixels) over ``weight`` (``(N, 1, H, W)``, 0..1)."""
    diff = (fields.compose(d, r1) - r0).pow(2).sum(1, keepdim=True).add(1e-8).sqrt()
    return (diff * weight).sum() / weight.sum().clamp_min(1.0)


def forward_with_equivariance(
    net, batch: dict, spec: DeformationSpec, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """``(pred, equivariance)``: the stage's saturated field on ``batch`` and the term above.

    ``net`` is called as ``net(src, tgt)`` (a stage model, possibly DDP-wrapped); ``spec`` gives
    the magnitudes of the random deformation ``d`` in pixels of the batch's MIP.
    """
    src, tgt = batch["src"], batch["tgt"]
    agg = batch.get("src_agg_field")
    n, _, h, w = src.shape
    s0 = src if agg is None else fields.warp_image(src.float(), agg)
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    d = random_field(n, h, w, spec, generator=generator, device=gen_dev)
    d = d.to(device=src.device, dtype=torch.float32)
    s1 = fields.warp_image(s0.float(), d)
    out = net(torch.cat((s0.float(), s1)), torch.cat((tgt, tgt)))
    r0, r1 = out[:n], out[n:]
    with torch.no_grad():
        ok0 = fields.warp((s0 != 0).float(), r0.detach()) > 0.5
        ok1 = fields.warp((s1 != 0).float(), r1.detach()) > 0.5
        weight = ((tgt != 0) & ok0 & ok1).float()
    equivariance = consistency_epe(r0, r1, d, weight)
    if agg is None:
        return r0, equivariance
    has_data = (s0.flatten(1).ne(0).any(1)) & (tgt.flatten(1).ne(0).any(1))
    pred = torch.where(has_data.view(-1, 1, 1, 1), fields.compose(agg, r0), agg)
    return pred, equivariance
