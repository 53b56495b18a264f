"""A trained pyramid as one aligner: ``forward(src_img, tgt_img, src_agg_field=None) -> field``.

Stages run coarse to fine. Each stage sees the images resampled from the input resolution to its
own MIP (masked box average, so 0 = no data survives) and the field so far resampled to that
MIP; it returns the saturated field at its MIP, which is carried on to the next stage. Images are
warped once per stage from the raw source, never resampled repeatedly. The result is in pixels
at the input MIP.

Example::

    import metroem
    aligner = metroem.load_aligner("models/my_pyramid", device="cpu")
    field = aligner(src, tgt)            # (N, 1, H, W) images at the finest stage's MIP
    aligned = metroem.fields.warp_image(src, field)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metroem import devices, fields, modules, pretrained, regularize, translation
from metroem.errors import MetroemError
from metroem.nets import NORM_FACTOR

Tensor = torch.Tensor

__all__ = ["PyramidAligner", "load_aligner", "plain_tensor", "resolve_checkpoints"]

log = logging.getLogger(__name__)


def plain_tensor(t: Tensor | None) -> Tensor | None:
    """``t`` as a plain ``torch.Tensor`` (strips torchfields' DisplacementField subclass)."""
    if t is None or type(t) is Tensor:
        return t
    return t.as_subclass(Tensor)


class PyramidAligner(nn.Module):
    """Runs ``stages`` (a list of ``(mip, model)``, coarse to fine) on an image pair.

    ``refine=True`` refines the network's field on each pair by optimising the field itself
    (see :mod:`metroem.refine`); ``refine_options`` are passed to
    :func:`metroem.refine.refine_field` (``steps``, ``lr``, ``smoothness_weight``, ...).

    ``smoothing_px > 0`` replaces the pyramid's field by its local affine fit in a Gaussian
    window of that many pixels at ``input_mip`` (:func:`metroem.regularize.smooth_field`,
    weighted by where both images have data): tissue that changes between neighbouring
    sections is not pulled onto its neighbour. With ``smoothing_gate`` ``(low, high)`` the
    field is kept as matched where the warped source correlates with the target (window of
    ``gate_window_px``) as a copy of the same section does
    (:func:`metroem.regularize.regularized_field`). :func:`load_aligner` sets all three from
    lengths in nm. ``translation_init=True`` starts the pyramid from one global translation found by
    phase correlation (:mod:`metroem.translation`) when no ``src_agg_field`` is given: drift
    beyond the coarse stage's search window, or on images too small for its coarsest level,
    is caught. Both run in :meth:`forward` and in tiled inference
    (:class:`metroem.tiling.StageTiler`), not in the exported program.
    """

    def __init__(
        self,
        stages: list[tuple[int, nn.Module]],
        input_mip: int | None = None,
        refine: bool = False,
        refine_options: dict | None = None,
        smoothing_px: float = 0.0,
        translation_init: bool = False,
        smoothing_gate: tuple[float, float] | None = None,
        gate_window_px: float = 0.0,
    ):
        super().__init__()
        if not stages:
            raise ValueError("a pyramid aligner needs at least one stage")
        self.mips = [int(m) for m, _ in stages]
        if any(b > a for a, b in zip(self.mips, self.mips[1:], strict=False)):
            raise ValueError(f"stages must run coarse to fine (MIPs never increase): {self.mips}")
        self.stages = nn.ModuleList([m for _, m in stages])
        self.input_mip = min(self.mips) if input_mip is None else int(input_mip)
        self.refine = bool(refine)
        self.refine_options = dict(refine_options or {})
        self.translation_init = bool(translation_init)
        self.smoothing_px = float(smoothing_px)
        if not (self.smoothing_px >= 0 and math.isfinite(self.smoothing_px)):
            raise ValueError(f"smoothing_px must be a number >= 0, got {smoothing_px}")
        self.smoothing_gate = regularize.check_gate(smoothing_gate)
        self.gate_window_px = float(gate_window_px)
        if self.smoothing_gate is not None and not self.gate_window_px > 0:
            raise ValueError("a smoothing gate needs gate_window_px > 0")

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def size_multiple(self, input_mip: int | None = None) -> int:
        """Tile origins and sizes that are multiples of this keep every stage's grids aligned.

        A stage at MIP m downsamples the input by 2^(m - input_mip) and its network pools by
        its ``stride``; cutting a large image at multiples of the product gives each tile the
        same coarse pixels the whole image has.
        """
        return self._multiple(input_mip, grid=1)

    def pad_multiple(self, input_mip: int | None = None) -> int:
        """:meth:`run` pads images to a multiple (at least twice) of this: a multiple of every
        stage's stride and of its normalisation grid (:data:`metroem.nets.NORM_FACTOR`) at the
        stage's MIP, so no stage pads again and no coarse grid is a single pixel."""
        return self._multiple(input_mip, grid=NORM_FACTOR)

    def _multiple(self, input_mip: int | None, grid: int) -> int:
        """Largest over stages of ``2^(mip - input_mip) * lcm(stride, grid)``."""
        mip_in = self.input_mip if input_mip is None else int(input_mip)
        best = 1
        for mip, model in zip(self.mips, self.stages, strict=True):
            own = math.lcm(int(getattr(model, "stride", 1)), grid)
            best = max(best, 2 ** max(0, mip - mip_in) * own)
        return best

    def forward(
        self,
        src_img: Tensor,
        tgt_img: Tensor,
        src_agg_field: Tensor | None = None,
        input_mip: int | None = None,
        refine: bool | None = None,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """Saturated field ``(N, 2, H, W)`` in pixels at ``input_mip`` (default: finest stage).

        Images are ``(N, 1, H, W)`` of any dtype with raw values (0 = no data). The network runs
        on the aligner's device; the field comes back on the device of ``src_img``. Without
        gradients unless the aligner is in training mode. ``refine`` (default: the
        aligner's setting) refines the field on the pair; ``src_mask`` / ``tgt_mask`` (defects,
        nonzero = exclude) are no data for the network and for refinement
        (:func:`metroem.defects.align_with_defects` also splits a source they cut apart).
        Other keyword arguments (corgie's ``tgt_agg_field`` and the like) are ignored.
        """
        mip_in = self.input_mip if input_mip is None else int(input_mip)
        if src_img.dim() != 4 or src_img.shape[1] != 1 or src_img.shape != tgt_img.shape:
            raise ValueError(
                f"src_img and tgt_img must both be (N, 1, H, W), got {tuple(src_img.shape)} "
                f"and {tuple(tgt_img.shape)}"
            )
        out_device = src_img.device
        if src_mask is not None or tgt_mask is not None:  # defects are no data
            from metroem.defects import apply_mask

            src_img = apply_mask(plain_tensor(src_img), plain_tensor(src_mask))
            tgt_img = apply_mask(plain_tensor(tgt_img), plain_tensor(tgt_mask))
        agg = plain_tensor(src_agg_field)
        if agg is None and self.translation_init:
            agg = self.initial_translation(plain_tensor(src_img), plain_tensor(tgt_img), mip_in)
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            field = self._run(plain_tensor(src_img), plain_tensor(tgt_img), agg, mip_in)
            if self.smoothing_px > 0:
                src = plain_tensor(src_img).to(field.device)
                tgt = plain_tensor(tgt_img).to(field.device)
                scale = 2.0 ** (mip_in - self.input_mip)  # the length is set at input_mip
                field = regularize.regularized_field(
                    field, src, tgt, self.smoothing_px / scale, self.smoothing_gate,
                    self.gate_window_px / scale)
        if self.refine if refine is None else refine:
            from metroem.refine import refine_field

            field = refine_field(
                src_img.to(field.device),
                tgt_img.to(field.device),
                field.detach(),
                src_mask=None if src_mask is None else src_mask.to(field.device),
                tgt_mask=None if tgt_mask is None else tgt_mask.to(field.device),
                **self.refine_options,
            )
        return field.to(out_device)

    @property
    def nodata_aware(self) -> bool:
        """Whether every stage keeps no data out of its field (spec ``nodata_aware``): what
        aligning a section piece by piece (:mod:`metroem.defects`) relies on."""
        return all(bool(getattr(m, "nodata_aware", False)) for m in self.stages)

    def initial_translation(self, src: Tensor, tgt: Tensor, mip_in: int) -> Tensor:
        """Constant field (pixels at ``mip_in``) of the phase-correlation shift between the
        images, measured at the first stage's MIP (where the tiled path measures it too)."""
        mip0 = self.mips[0]
        s = fields.resample_image(src.float(), mip_in, mip0)
        t = fields.resample_image(tgt.float(), mip_in, mip0)
        shift = translation.phase_translation(s, t) * 2.0 ** (mip0 - mip_in)
        return translation.translation_field(shift.to(src.device), *src.shape[-2:])

    def _run(self, src_img: Tensor, tgt_img: Tensor, agg: Tensor | None, mip_in: int) -> Tensor:
        """Check and move the inputs, then :meth:`run`."""
        dev = self.device
        src = src_img.to(device=dev, dtype=torch.float32)
        tgt = tgt_img.to(device=dev, dtype=torch.float32)
        n, _, h, w = src.shape
        if agg is not None:
            agg = agg.to(device=dev, dtype=torch.float32)
            fields.check_field(agg, "src_agg_field")
            if agg.shape[0] != n or agg.shape[-2:] != (h, w):
                raise ValueError(
                    f"src_agg_field {tuple(agg.shape)} does not match images {tuple(src.shape)}"
                )
        # An input without data returns early in run() whatever its MIP; the images are scanned
        # for data here only when the MIP is too coarse (run() scans them anyway).
        if mip_in > max(self.mips) and (
            h > 0 and w > 0 and bool(src.ne(0).any()) and bool(tgt.ne(0).any())
        ):
            raise ValueError(
                f"input MIP {mip_in} is coarser than every stage (MIPs {self.mips}); pass "
                "images at a MIP the pyramid runs at or finer"
            )
        return self.run(src, tgt, agg, mip_in)

    def run(self, src: Tensor, tgt: Tensor, agg: Tensor | None, mip_in: int) -> Tensor:
        """The pyramid on float32 images on the aligner's device, no checks (what
        :mod:`metroem.export` captures; :meth:`forward` checks and moves the inputs first)."""
        n, h, w = src.shape[0], src.shape[-2], src.shape[-1]
        exporting = torch.compiler.is_exporting()
        if not exporting and (
            h == 0 or w == 0 or not (bool(src.ne(0).any()) and bool(tgt.ne(0).any()))
        ):
            if agg is not None:
                return agg.clone()
            return fields.identity(n, h, w, device=src.device)
        incoming = agg
        # Padding and the no-data answer are written without branches on sizes or values, so
        # that an exported program (metroem.export, torch.export) holds for every size.
        k = self.pad_multiple(mip_in)
        ph = torch.sym_max((h + k - 1) // k, 2) * k - h
        pw = torch.sym_max((w + k - 1) // k, 2) * k - w
        torch._check(ph >= 0)  # true by construction; tells torch.export so
        torch._check(pw >= 0)
        src, tgt = F.pad(src, (0, pw, 0, ph)), F.pad(tgt, (0, pw, 0, ph))
        if agg is not None:
            agg = F.pad(agg, (0, pw, 0, ph), mode="replicate")
        size = (src.shape[-2], src.shape[-1])
        for i, model in enumerate(self.stages):
            mip = self.mips[i]
            s = fields.resample_image(src, mip_in, mip)
            t = fields.resample_image(tgt, mip_in, mip)
            a: Tensor | None = None
            if agg is not None:
                a = fields.resample_field(agg, mip_in, mip)
            if exporting:
                out = model.align(s, t, a)
            else:  # any stage module with a corgie-style forward
                out = plain_tensor(model(s, t, src_agg_field=a))
            if mip > mip_in:
                agg = fields.upsample_field(out, mip - mip_in, size=size)
            else:
                agg = fields.downsample_field(out, mip_in - mip)
        assert agg is not None
        if not exporting:
            return agg[..., :h, :w].contiguous()
        # Exported: crop by gathering rows and columns (a slice's contiguity depends on whether
        # there was padding, which would tie the program to that case), and per pair keep a
        # field only where both images have data.
        rows = torch.arange(h, device=agg.device)
        cols = torch.arange(w, device=agg.device)
        field = agg.index_select(-2, rows).index_select(-1, cols)
        has_data = (src.flatten(1).ne(0).any(1) & tgt.flatten(1).ne(0).any(1)).view(-1, 1, 1, 1)
        keep = incoming if incoming is not None else torch.zeros_like(field)
        return torch.where(has_data, field, keep)


def load_aligner(
    pyramid_path: str | os.PathLike,
    checkpoint_name: str | None = None,
    stages: list[int] | None = None,
    device: str | torch.device = "cpu",
    input_mip: int | None = None,
    refine: bool = False,
    refine_options: dict | None = None,
    smoothing_nm: float | None = None,
    resolution_nm: float | None = None,
    translation_init: bool | None = None,
    spec_changes: Mapping | Sequence[Mapping] | None = None,
    smoothing_gate: tuple[float, float] | str | bool | None = None,
) -> PyramidAligner:
    """Load a trained pyramid (all stages or the given stage numbers) as one aligner.

    ``pyramid_path`` is a pyramid folder or the name of a shipped pyramid
    (:mod:`metroem.pretrained`: ``"isbi"``, ``"demo"``); an existing folder wins. Each module
    is built from its spec and weights (:func:`metroem.modules.load_module`), with the
    checkpoints :func:`resolve_checkpoints` picks from ``checkpoint_name`` (one name, one per
    stage as a list or ``"a,b,c"``, or None: each module's default); which checkpoint each
    stage uses is logged. ``input_mip`` is the MIP of the images the aligner will be called
    with (default: the finest stage's).

    ``smoothing_nm`` and ``resolution_nm`` default to the pyramid's ``pyramid.json``
    (:func:`metroem.modules.pyramid_settings`; ``smoothing_nm=0`` turns a default off).
    ``smoothing_nm`` (with ``resolution_nm``, the size of a MIP0 pixel in nm) keeps only the
    part of the field that is affine over about that length, except where the images match as
    a same-section pair does: ``smoothing_gate`` ``(low, high)`` correlations, ``"off"``, or
    None for the pyramid's default, else :data:`metroem.regularize.GATE`.
    ``translation_init`` starts a pair given no incoming field from its phase-correlation
    translation (see :class:`PyramidAligner`); None: the pyramid's default (``pyramid.json``),
    else off.

    ``spec_changes`` overrides parameter-free spec keys at load time (``iterations``,
    ``prior_factor``, ``learned_levels``, ...; :mod:`metroem.nets`): one mapping for every
    stage, or one per loaded stage, coarse to fine.
    """
    device = devices.parse_device(device)  # a GPU that is not there is an error
    pyramid_path = pretrained.resolve(pyramid_path)  # a folder, or a shipped pyramid's name
    settings = modules.pyramid_settings(pyramid_path)
    if smoothing_nm is None:
        smoothing_nm = settings.get("smoothing_nm")
    if resolution_nm is None:
        resolution_nm = settings.get("resolution_nm")
    mods = modules.select_stages(modules.discover(pyramid_path), stages)
    if smoothing_gate is None:
        smoothing_gate = settings.get("smoothing_gate", regularize.GATE)
    if translation_init is None:
        translation_init = settings.get("translation_init", False)
    smoothing = {}
    if smoothing_nm:
        if resolution_nm is None:
            raise MetroemError(
                "smoothing_nm needs the pixel size: pass resolution_nm (--resolution_nm, nm "
                f"per MIP0 pixel) or set it in "
                f"{os.path.join(str(pyramid_path), modules.SETTINGS_FILE)}"
            )
        mip_in = min(m.mip for m in mods) if input_mip is None else int(input_mip)
        smoothing = smoothing_settings(smoothing_nm, resolution_nm, mip_in, smoothing_gate)
    names = resolve_checkpoints(mods, checkpoint_name)
    changes = _per_stage_changes(spec_changes, len(mods))
    loaded = [
        (m.mip, modules.load_module(m.path, checkpoint_name=name, device=str(device),
                                    spec_changes=change))
        for m, name, change in zip(mods, names, changes, strict=True)
    ]
    aligner = PyramidAligner(
        loaded, input_mip=input_mip, refine=refine, refine_options=refine_options,
        translation_init=translation_init, **smoothing,
    )
    return aligner.to(device).eval()


def smoothing_settings(smoothing_nm: float, resolution_nm: float, mip: int,
                       gate: tuple[float, float] | str | bool | None = regularize.GATE) -> dict:
    """:class:`PyramidAligner`'s smoothing arguments (``smoothing_px``, ``smoothing_gate``,
    ``gate_window_px``) for images at ``mip`` whose MIP0 pixels are ``resolution_nm``."""
    return {"smoothing_px": regularize.sigma_px(smoothing_nm, resolution_nm, mip),
            "smoothing_gate": regularize.check_gate(gate),
            "gate_window_px": regularize.sigma_px(regularize.GATE_WINDOW_NM, resolution_nm, mip)}


def _per_stage_changes(
    spec_changes: Mapping | Sequence[Mapping] | None, count: int
) -> list[Mapping | None]:
    if spec_changes is None or isinstance(spec_changes, Mapping):
        return [spec_changes] * count
    changes = list(spec_changes)
    if len(changes) != count or not all(isinstance(c, Mapping) for c in changes):
        raise MetroemError(
            f"spec_changes must be one mapping or one per loaded stage ({count}), got "
            f"{spec_changes!r}"
        )
    return changes


def _split_names(checkpoint_name: str | Sequence[str] | None, count: int) -> list[str | None]:
    if checkpoint_name is None:
        return [None] * count
    names = (checkpoint_name.split(",") if isinstance(checkpoint_name, str)
             else list(checkpoint_name))
    names = [n.strip() for n in names]
    if len(names) == 1:
        return names * count
    if len(names) != count:
        raise MetroemError(
            f"--checkpoint_name lists {len(names)} names for {count} stage(s); give one name "
            "for every stage, or one per stage in stage order (e.g. a,b)"
        )
    return names


def resolve_checkpoints(mods: Sequence[modules.ModuleInfo],
                        checkpoint_name: str | Sequence[str] | None = None) -> list[str | None]:
    """The checkpoint each module loads, checked, and logged one line per stage.

    Named checkpoints are used as given (an unfinished one is flagged in the log). Without a
    name, each module's default is used, but only when every stage's default is the same name
    and comes from a finished run: a silent mix of checkpoints, or a stopped run's weights, is
    refused with a line saying how to choose.
    """
    from metroem.training.checkpoint import checkpoint_status

    given = _split_names(checkpoint_name, len(mods))
    names = [g if g is not None else modules.default_checkpoint(m.path) for m, g in zip(mods, given,
                                                                            strict=True)]
    statuses = [checkpoint_status(m.path, n) if n else None for m, n in zip(mods, names,
                                                                            strict=True)]
    if checkpoint_name is None:
        used = {n for n in names if n}
        if len(used) > 1:
            shown = ", ".join(f"stage {m.stage}: {n}" for m, n in zip(mods, names, strict=True))
            raise MetroemError(
                f"the stages' default checkpoints differ ({shown}); pass --checkpoint_name NAME "
                "for all stages, or one per stage (e.g. --checkpoint_name "
                f"{','.join(n or '?' for n in names)}) to mix them on purpose"
            )
        for m, st in zip(mods, statuses, strict=True):
            if st is not None and not st.finished:
                raise MetroemError(
                    f"stage {m.stage}'s default checkpoint {st.name!r} is from a run that did "
                    f"not finish ({st.describe()}); finish it with train.py --resume, or name "
                    f"it with --checkpoint_name {st.name} to use it anyway"
                )
    for m, n, st in zip(mods, names, statuses, strict=True):
        if st is None:  # a copied template, a run that never saved: its field is noise
            log.warning("stage %d (%s) has no checkpoint: its network is untrained and its "
                        "field meaningless; train it (train.py) or use a trained pyramid",
                        m.stage, m.name)
        else:
            log.info("stage %d (%s): checkpoint %r (%s)", m.stage, m.name, n, st.describe())
    return names
