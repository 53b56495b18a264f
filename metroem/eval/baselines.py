"""Classical alignment baselines behind one call: ``align(method, src, tgt) -> field``.

Every method returns a field in metroem's convention (:mod:`metroem.fields`): the pull field
that aligns ``src`` to ``tgt`` (``warp_image(src, field) ~ tgt``), pixels, shape ``(1, 2, H, W)``,
channel 0 = x. Each library's own convention is converted here, once, and a test per method
checks it on a known integer shift.

Methods (parameters are the library defaults unless listed):

=================  =================================================================================
``identity``       the zero field
``phasecorr``      one translation: ``skimage.registration.phase_cross_correlation(tgt, src,
                   upsample_factor=10, normalization=None)`` on images z-normalised over their
                   valid pixels (no data stays 0). It returns the shift that moves src onto tgt
                   in (row, col): field = minus it, swapped to (x, y). Unnormalised cross-power:
                   the phase-normalised peak jumps to spurious offsets on rotated or noisy EM
                   pairs with no-data borders.
``tvl1``           ``skimage.registration.optical_flow_tvl1(tgt, src)`` on [0, 1] images:
                   attachment 15, tightness 0.3, 5 warps, 10 iterations, its own coarse-to-fine
                   pyramid; flow is (row, col) pull flow, so field = flow swapped to (x, y)
``ilk``            ``skimage.registration.optical_flow_ilk(tgt, src, radius=7)``: iterative
                   Lucas-Kanade, 10 warps; same convention as tvl1
``dis``            ``cv2.DISOpticalFlow`` MEDIUM preset on uint8 images: ``calc(tgt, src)`` gives
                   ``tgt(p) ~ src(p + flow(p))`` in (x, y): already our convention
``farneback``      ``cv2.calcOpticalFlowFarneback(tgt, src)`` with pyr_scale 0.5, 5 levels,
                   window 21, 5 iterations, poly_n 7, poly_sigma 1.5; same convention as dis
``elastix``        (optional, ``pip install itk-elastix``) B-spline registration, default
                   "bspline" parameter map with 4 resolutions, 64 px final grid spacing; the
                   transformix deformation field maps target points into the source: our field
``ants``           (optional, ``pip install antspyx``) ``ants.registration(type_of_transform=
                   "SyN")``; its forward transforms are applied to coordinate images to read off
                   the dense field
=================  =================================================================================

``<dense>+pc`` (e.g. ``tvl1+pc``) first finds the translation with phase correlation, shifts the
source by the rounded translation (exact, no interpolation), runs the dense method on the
shifted pair, and composes: ``compose(shift, dense)``. This rescues optical-flow methods whose
pyramids cannot reach large shifts.

Images enter as raw intensities where 0 means no data; every method sees the same images
(contrast-stretched to [0, 1] / uint8 with :func:`to_unit`), no masks.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from metroem import fields
from metroem.errors import MetroemError
from metroem.eval.metrics import as_image

Tensor = torch.Tensor
FieldFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

__all__ = [
    "METHODS",
    "OPTIONAL",
    "align",
    "available_methods",
    "method_params",
    "to_unit",
    "metroem_method",
]


def to_unit(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1]: 1st-99th percentile of the nonzero pixels stretched, 0 stays 0."""
    a = np.asarray(img, dtype=np.float32)
    valid = a != 0
    if not valid.any():
        return np.zeros_like(a)
    lo, hi = np.percentile(a[valid], [1, 99])
    out = np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1)
    out[~valid] = 0
    return out.astype(np.float32)


def _znorm(img: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the nonzero pixels; no-data pixels stay exactly 0."""
    a = np.asarray(img, dtype=np.float32)
    valid = a != 0
    out = np.zeros_like(a)
    if valid.sum() > 1:
        v = a[valid]
        out[valid] = (v - v.mean()) / max(float(v.std()), 1e-6)
    return out


def _u8(img: np.ndarray) -> np.ndarray:
    return np.round(to_unit(img) * 255).astype(np.uint8)


def _xy(flow_rc: np.ndarray) -> np.ndarray:
    """(row, col) flow ``(2, H, W)`` -> our (x, y) channel order."""
    return np.stack((flow_rc[1], flow_rc[0])).astype(np.float32)


def _constant(h: int, w: int, dx: float, dy: float) -> np.ndarray:
    out = np.empty((2, h, w), np.float32)
    out[0], out[1] = dx, dy
    return out


# --- methods: (src, tgt) float32 (H, W) raw images -> (2, H, W) pull field ---------------------


def identity(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    return np.zeros((2,) + src.shape, np.float32)


def phase_translation(src: np.ndarray, tgt: np.ndarray) -> tuple[float, float]:
    """(dx, dy) such that ``src(p + (dx, dy)) ~ tgt(p)``, by phase correlation."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(
        _znorm(tgt), _znorm(src), upsample_factor=10, normalization=None
    )
    return -float(shift[1]), -float(shift[0])


def phasecorr(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    dx, dy = phase_translation(src, tgt)
    return _constant(*src.shape, dx, dy)


def tvl1(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    from skimage.registration import optical_flow_tvl1

    return _xy(optical_flow_tvl1(to_unit(tgt), to_unit(src)))


def ilk(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    from skimage.registration import optical_flow_ilk

    return _xy(optical_flow_ilk(to_unit(tgt), to_unit(src), radius=7))


def dis(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    import cv2

    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(
        _u8(tgt), _u8(src), None
    )
    return np.ascontiguousarray(flow.transpose(2, 0, 1), dtype=np.float32)


def farneback(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    import cv2

    flow = cv2.calcOpticalFlowFarneback(_u8(tgt), _u8(src), None, 0.5, 5, 21, 5, 7, 1.5, 0)
    return np.ascontiguousarray(flow.transpose(2, 0, 1), dtype=np.float32)


def elastix(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    itk = _optional("itk", "itk-elastix")
    fixed = itk.image_view_from_array(np.ascontiguousarray(to_unit(tgt)))
    moving = itk.image_view_from_array(np.ascontiguousarray(to_unit(src)))
    params = itk.ParameterObject.New()
    pmap = params.GetDefaultParameterMap("bspline", 4, 64.0)
    params.AddParameterMap(pmap)
    # transformix writes deformationField.nii into its output directory (default: the current
    # one); keep every file it makes in a throw-away folder.
    with tempfile.TemporaryDirectory(prefix="metroem-elastix-") as tmp:
        _, result = itk.elastix_registration_method(
            fixed, moving, parameter_object=params, log_to_console=False, output_directory=tmp
        )
        disp = itk.transformix_deformation_field(moving, result, output_directory=tmp)
        arr = np.array(itk.array_view_from_image(disp), dtype=np.float32)  # (H, W, 2): (x, y)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def ants(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    ants_mod = _optional("ants", "antspyx")
    fixed = ants_mod.from_numpy(to_unit(tgt).astype(np.float64))
    moving = ants_mod.from_numpy(to_unit(src).astype(np.float64))
    reg = ants_mod.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
    h, w = src.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for coord in (cols, rows):  # ants arrays are indexed like numpy: (row, col)
        img = ants_mod.from_numpy(coord)
        mapped = ants_mod.apply_transforms(
            fixed, img, transformlist=reg["fwdtransforms"], interpolator="linear",
            defaultvalue=np.nan,
        ).numpy()
        out.append(mapped - coord)
    field = np.stack(out).astype(np.float32)
    return np.nan_to_num(field, nan=0.0)


def _optional(module: str, package: str):
    if importlib.util.find_spec(module) is None:
        raise MetroemError(
            f"this baseline needs {package}, which is not installed; `pip install {package}` "
            "or leave it out of --methods"
        )
    return importlib.import_module(module)


def with_phase_init(dense: FieldFn) -> FieldFn:
    """Wrap a dense method: integer pre-shift by phase correlation, then compose."""

    def run(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        dx, dy = (round(v) for v in phase_translation(src, tgt))
        shift = torch.from_numpy(_constant(*src.shape, dx, dy)).unsqueeze(0)
        moved = fields.warp_image(torch.from_numpy(src)[None, None], shift)[0, 0].numpy()
        residual = torch.from_numpy(dense(moved, tgt)).unsqueeze(0)
        return fields.compose(shift, residual)[0].numpy()

    run.__name__ = f"{dense.__name__}+pc"
    return run


_DENSE = {"tvl1": tvl1, "ilk": ilk, "dis": dis, "farneback": farneback}
METHODS: dict[str, FieldFn] = {
    "identity": identity,
    "phasecorr": phasecorr,
    **_DENSE,
    **{f"{k}+pc": with_phase_init(v) for k, v in _DENSE.items()},
    "elastix": elastix,
    "ants": ants,
}
# Methods whose package is an optional extra, with the module that must import.
OPTIONAL = {"elastix": "itk", "ants": "ants"}

_PARAMS = {
    "identity": "zero field",
    "phasecorr": "skimage phase_cross_correlation, upsample_factor=10, normalization=None",
    "tvl1": "skimage optical_flow_tvl1 defaults (attachment=15, tightness=0.3, num_warp=5)",
    "ilk": "skimage optical_flow_ilk radius=7, num_warp=10",
    "dis": "cv2 DISOpticalFlow PRESET_MEDIUM",
    "farneback": "cv2 Farneback pyr_scale=0.5 levels=5 winsize=21 iterations=5 poly_n=7 "
    "poly_sigma=1.5",
    "elastix": "itk-elastix default bspline map, 4 resolutions, 64 px final grid spacing",
    "ants": "antspyx registration type_of_transform=SyN",
}


def method_params(name: str) -> str:
    """One line naming the method's library call and parameters (for tables and docs)."""
    base = name[:-3] if name.endswith("+pc") else name
    text = _PARAMS.get(base, "")
    return f"{text}; integer phase-correlation pre-shift" if name.endswith("+pc") else text


def available_methods(include_optional: bool = True) -> list[str]:
    """Method names whose packages import here (optional ones only if installed)."""
    names = []
    for name in METHODS:
        mod = OPTIONAL.get(name)
        if mod is not None and (not include_optional or importlib.util.find_spec(mod) is None):
            continue
        names.append(name)
    return names


def metroem_method(
    pyramid_path: str,
    checkpoint_name: str | None = None,
    device: str = "cpu",
    refine: bool = False,
    input_mip: int = 0,
    smoothing_nm: float | None = None,
    resolution_nm: float | None = None,
    translation_init: bool | None = None,
    spec_changes=None,
    smoothing_gate=None,
    stages: list[int] | None = None,
) -> FieldFn:
    """A trained metroem pyramid as a baseline-style method (raw images in, field out).

    ``input_mip`` is the MIP of the images it is given (benchmark sections are MIP0); every
    stage sees them resampled to its own MIP and the field comes back at ``input_mip``.

    ``refine=True`` asks :func:`metroem.aligner.load_aligner` for its per-pair online
    refinement (:mod:`metroem.refine`; an error if this metroem's aligner has none).
    ``smoothing_nm`` / ``resolution_nm`` / ``smoothing_gate`` regularise the field and
    ``translation_init`` starts it from a phase correlation (None: the pyramid's default),
    and ``spec_changes`` overrides parameter-free spec keys
    (:func:`metroem.aligner.load_aligner`); ``stages`` picks stages.
    """
    from metroem.aligner import load_aligner

    extra: dict = {"refine": True} if refine else {}
    if smoothing_nm is not None:  # 0: off, whatever the pyramid's default
        extra.update(smoothing_nm=smoothing_nm, resolution_nm=resolution_nm)
    if smoothing_gate is not None:
        extra["smoothing_gate"] = smoothing_gate
    if translation_init is not None:
        extra["translation_init"] = bool(translation_init)
    if spec_changes is not None:
        extra["spec_changes"] = spec_changes
    try:
        aligner = load_aligner(
            pyramid_path, checkpoint_name=checkpoint_name, stages=stages, device=device,
            input_mip=input_mip, **extra
        )
    except TypeError as e:
        if refine and "refine" in str(e):
            raise MetroemError(
                "this metroem's aligner has no online refinement option; drop --refine"
            ) from e
        raise

    def run(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        with torch.no_grad() if not refine else torch.enable_grad():
            s = torch.from_numpy(np.asarray(src, np.float32))[None, None]
            t = torch.from_numpy(np.asarray(tgt, np.float32))[None, None]
            return aligner(s, t)[0].detach().float().cpu().numpy()

    run.__name__ = "metroem-refine" if refine else "metroem"
    return run


def align(method: str | FieldFn, src, tgt) -> Tensor:
    """Align ``src`` to ``tgt`` with a named baseline (or any ``(src, tgt) -> field`` callable).

    Images are ``(H, W)``, ``(1, H, W)`` or ``(1, 1, H, W)`` arrays/tensors with raw values
    (0 = no data). Returns the pull field ``(1, 2, H, W)`` float32 in pixels, channel 0 = x.
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise MetroemError(
                f"unknown alignment method {method!r}; choose one of {', '.join(METHODS)}"
            )
        fn = METHODS[method]
    else:
        fn = method
    s = as_image(src)[0, 0].numpy()
    t = as_image(tgt)[0, 0].numpy()
    if s.shape != t.shape:
        raise MetroemError(f"source {s.shape} and target {t.shape} differ in size; crop them")
    out = np.asarray(fn(np.ascontiguousarray(s), np.ascontiguousarray(t)), dtype=np.float32)
    if out.shape != (2,) + s.shape:
        raise RuntimeError(f"method {method} returned shape {out.shape}, want {(2,) + s.shape}")
    return torch.from_numpy(np.ascontiguousarray(out)).unsqueeze(0)
