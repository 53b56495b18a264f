"""The modelhouse / corgie interface of a module folder.

A module folder's ``create.py`` calls :func:`create`. By default it returns what corgie's
``ApplyModel`` / ``compute-field`` / ``align-block`` expect of a processor: a module called with
keyword images that returns a torchfields ``DisplacementField``. metroem's own loading
(:func:`metroem.modules.load_module`) returns the plain stage network instead.
"""

from __future__ import annotations

import os

import torch

from metroem.errors import MetroemError

__all__ = ["OUTPUTS", "CorgieProcessor", "create"]

OUTPUTS = ("torchfields", "tensor")


class CorgieProcessor(torch.nn.Module):
    """A stage network as corgie calls it: keyword tensors in, a ``DisplacementField`` out.

    corgie calls ``processor(src_img=..., tgt_img=..., src_agg_field=..., tgt_agg_field=...,
    **other src_*/tgt_* layers)`` with uint8 ``(1, 1, H, W)`` CPU tensors and without
    ``torch.no_grad()``, and reads the result's ``.x`` / ``.y``. The field is the saturated
    one, in pixels of the module's MIP (channel 0 along the last axis), as a torchfields
    ``DisplacementField`` (``tensor.field()``: a Tensor subclass, values unchanged) on the
    input's device. Extra layers are ignored.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, src_img, tgt_img, src_agg_field=None, tgt_agg_field=None, **kwargs):
        import torchfields  # noqa: F401  (registers Tensor.field)

        device = next(self.model.parameters()).device
        agg = None if src_agg_field is None else src_agg_field.as_subclass(torch.Tensor)
        with torch.no_grad():
            field = self.model(
                src_img.as_subclass(torch.Tensor).to(device),
                tgt_img.as_subclass(torch.Tensor).to(device),
                None if agg is None else agg.to(device),
            )
        return field.as_subclass(torch.Tensor).to(src_img.device).contiguous().field()


def create(
    folder: str | os.PathLike,
    checkpoint_name: str | None = None,
    device: str = "cpu",
    output: str = "torchfields",
) -> torch.nn.Module:
    """The module ``folder``'s network with weights, in eval mode on ``device``.

    ``output="torchfields"`` (the default, what corgie expects) wraps it as a
    :class:`CorgieProcessor`; ``output="tensor"`` returns the plain stage network, whose fields
    are ``(N, 2, H, W)`` tensors. Everything is read before returning (modelhouse deletes its
    temporary copy of the folder right after).
    """
    from metroem.modules import load_module

    if output not in OUTPUTS:
        raise MetroemError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")
    model = load_module(folder, checkpoint_name=checkpoint_name, device=device)
    return CorgieProcessor(model) if output == "torchfields" else model
