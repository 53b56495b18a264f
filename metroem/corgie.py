"""The modelhouse / corgie interface of a module folder.

A module folder's ``create.py`` calls :func:`create`. By default it returns what corgie's
``ApplyModel`` / ``compute-field`` / ``align-block`` expect of a processor: a module called with
keyword images that returns a torchfields ``DisplacementField``. metroem's own loading
(:func:`metroem.modules.load_module`) returns the plain stage network instead.
"""

from __future__ import annotations

import logging
import os

import torch

from metroem import regularize
from metroem.errors import MetroemError

__all__ = ["OUTPUTS", "CORGIE_PARAMS", "CorgieProcessor", "create", "smoothing_pad_px"]

log = logging.getLogger(__name__)

OUTPUTS = ("torchfields", "tensor")

#: processor params corgie itself adds for some commands (``compute-field-by-spec``); not ours
CORGIE_PARAMS = frozenset({"val", "scale", "mip"})


class CorgieProcessor(torch.nn.Module):
    """A stage network as corgie calls it: keyword tensors in, a ``DisplacementField`` out.

    corgie calls ``processor(src_img=..., tgt_img=..., src_agg_field=..., tgt_agg_field=...,
    **other src_*/tgt_* layers)`` with uint8 ``(1, 1, H, W)`` CPU tensors and without
    ``torch.no_grad()``, and reads the result's ``.x`` / ``.y``. The field is the saturated
    one, in pixels of the module's MIP (channel 0 along the last axis), as a torchfields
    ``DisplacementField`` (``tensor.field()``: a Tensor subclass, values unchanged) on the
    input's device. Extra layers are ignored. With ``smoothing_px > 0`` the field is
    regularised as ``metroem align`` does (:func:`metroem.regularize.regularized_field`, gated
    by ``smoothing_gate`` over ``gate_window_px``), on the images this call was given.
    """

    def __init__(self, model: torch.nn.Module, smoothing_px: float = 0.0,
                 smoothing_gate: tuple[float, float] | None = None, gate_window_px: float = 0.0):
        super().__init__()
        self.model = model
        self.smoothing_px = float(smoothing_px)
        self.smoothing_gate = smoothing_gate
        self.gate_window_px = float(gate_window_px)

    def forward(self, src_img, tgt_img, src_agg_field=None, tgt_agg_field=None, **kwargs):
        import torchfields  # noqa: F401  (registers Tensor.field)

        device = next(self.model.parameters()).device
        agg = None if src_agg_field is None else src_agg_field.as_subclass(torch.Tensor)
        with torch.no_grad():
            src = src_img.as_subclass(torch.Tensor).to(device)
            tgt = tgt_img.as_subclass(torch.Tensor).to(device)
            field = self.model(src, tgt, None if agg is None else agg.to(device))
            if self.smoothing_px > 0:
                field = regularize.regularized_field(
                    field, src.to(field.dtype), tgt.to(field.dtype), self.smoothing_px,
                    self.smoothing_gate, self.gate_window_px)
        return field.as_subclass(torch.Tensor).to(src_img.device).contiguous().field()


def _smoothing(smoothing_nm, pixel_nm, smoothing_gate) -> dict:
    """:class:`CorgieProcessor`'s smoothing arguments from processor params (one-line errors)."""
    try:
        length = float(smoothing_nm or 0.0)
    except (TypeError, ValueError):
        raise MetroemError(f"processor param smoothing_nm must be a length in nm, got "
                           f"{smoothing_nm!r}") from None
    if length == 0:
        return {}
    if pixel_nm is None:
        raise MetroemError(f"processor param smoothing_nm={length:g} needs pixel_nm: the size "
                           "in nm of a pixel at this processor's --processor_mip (e.g. 8 for "
                           "MIP 1 of 4 nm data)")
    try:
        pixel = float(pixel_nm)
    except (TypeError, ValueError):
        raise MetroemError(f"processor param pixel_nm must be a size in nm, got "
                           f"{pixel_nm!r}") from None
    from metroem.aligner import smoothing_settings

    # the processor's images are "MIP 0" of pixels pixel_nm: the settings metroem align uses
    return smoothing_settings(length, pixel, 0,
                              regularize.GATE if smoothing_gate is None else smoothing_gate)


def smoothing_pad_px(smoothing_nm: float, pixel_nm: float, gated: bool = True) -> int:
    """Context (px at the processor's MIP) the smoothing needs around a chunk: a corgie
    ``--pad`` at least this large (plus the network's own context) gives the field the whole
    image would have; a smaller one changes the field near chunk borders."""
    settings = _smoothing(smoothing_nm, pixel_nm, None if gated else "off")
    if not settings:
        return 0
    return regularize.regularized_support_px(settings["smoothing_px"],
                                             settings["smoothing_gate"],
                                             settings["gate_window_px"])


def create(
    folder: str | os.PathLike,
    checkpoint_name: str | None = None,
    device: str = "cpu",
    output: str = "torchfields",
    smoothing_nm: float = 0.0,
    pixel_nm: float | None = None,
    smoothing_gate: str | tuple[float, float] | None = None,
    **params,
) -> torch.nn.Module:
    """The module ``folder``'s network with weights, in eval mode on ``device``.

    ``output="torchfields"`` (the default, what corgie expects) wraps it as a
    :class:`CorgieProcessor`; ``output="tensor"`` returns the plain stage network, whose fields
    are ``(N, 2, H, W)`` tensors. Everything is read before returning (modelhouse deletes its
    temporary copy of the folder right after).

    ``smoothing_nm`` (with ``pixel_nm``, the pixel size of the images the processor is given)
    regularises the field as ``metroem align --smoothing_nm`` does, gated by ``smoothing_gate``
    (``"LOW,HIGH"``, ``[LOW, HIGH]`` or ``"off"``; default :data:`metroem.regularize.GATE`):
    set it on the last (finest) processor of a corgie chain, with a ``--pad`` of at least
    :func:`smoothing_pad_px`. Default 0: the stage's raw field. Other ``params`` (corgie's
    own, :data:`CORGIE_PARAMS`) are not used; unknown ones are named in a warning.
    """
    from metroem.modules import load_module

    if output not in OUTPUTS:
        raise MetroemError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")
    unknown = sorted(set(params) - CORGIE_PARAMS)
    if unknown:
        log.warning("processor params not used by metroem (typo?): %s", ", ".join(unknown))
    smoothing = _smoothing(smoothing_nm, pixel_nm, smoothing_gate)
    if smoothing and output != "torchfields":
        raise MetroemError("smoothing_nm applies to the corgie processor (output=torchfields); "
                           "with output=tensor use metroem.load_aligner(..., smoothing_nm=...)")
    model = load_module(folder, checkpoint_name=checkpoint_name, device=device)
    return CorgieProcessor(model, **smoothing) if output == "torchfields" else model
