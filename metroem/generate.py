"""Fields between stages: run stages ``0..k`` over every pair and write the next stage's data.

For the stage after ``k`` (MIP ``m``): read every plain image dataset ``x*_y*_z*_MIP{m}.h5``,
run the pyramid up to stage ``k`` at input MIP ``m``, remove each pair's average translation over
tissue (snapped to a multiple of ``2**(coarsest MIP of the pyramid)`` MIP0 pixels, so every MIP
moves by whole pixels; :func:`metroem.geometry.remove_translation`, the same rule as
``download_field``: halves round up), and write

* ``field_{k}_x*_y*_z*_MIP{m}_{C}.h5``: the saturated field minus that translation, and
* ``x*_y*_z*_MIP{m}_{C}.h5``: the image pairs with each source window moved by it, re-read from
  the source volume (0 outside it), so ``src(p + f(p))`` is unchanged.

Both files record the same per-pair translation: the one just removed plus any the plain image
file was already cut with. When the source volume is not reachable any more, the stored source
patch is shifted by the (integer) translation instead, with 0 (no data) filling what comes in
from outside the patch. For the last stage, fields are written at its own MIP (for evaluation)
and no images are re-cut.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metroem import datasets, geometry, modules, volumes
from metroem.aligner import PyramidAligner
from metroem.errors import MetroemError

log = logging.getLogger(__name__)

# Attributes of generated files saying what made them.
PROVENANCE = ("pyramid", "weights")


def shift_source(pairs: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Copy of ``pairs`` ``(N, 2, S, S)`` whose sources are moved by integer ``shift`` ``(N, 2)``
    (x, y, pixels of the patch): ``new_src(p) = src(p + shift)``, 0 where that is outside."""
    out = pairs.copy()
    size_y, size_x = pairs.shape[-2:]
    for i, (dx, dy) in enumerate(np.asarray(shift, np.int64)):
        src = pairs[i, 0]
        moved = np.zeros_like(src)
        y0, y1 = max(0, -dy), min(size_y, size_y - dy)
        x0, x1 = max(0, -dx), min(size_x, size_x - dx)
        if y0 < y1 and x0 < x1:
            moved[y0:y1, x0:x1] = src[y0 + dy : y1 + dy, x0 + dx : x1 + dx]
        out[i, 0] = moved
    return out


def _read_moved_sources(data: datasets.H5Data, t_total: np.ndarray, mip: int) -> np.ndarray:
    """The pairs of ``data`` with each source re-read from the source volume at its window moved
    by ``t_total`` (MIP0 px from the unmoved window; 0 outside the volume). Raises MetroemError
    when the volume (or its defect volume) cannot be read."""
    source = str(data.attrs.get("source", ""))
    if not source:
        raise MetroemError("the image dataset records no source volume")
    size = data.shape[-1]
    try:
        x0, y0 = geometry.patch_origin(
            int(data.attrs["x_offset"]), int(data.attrs["y_offset"]), mip, size
        )
    except (KeyError, ValueError) as e:
        raise MetroemError(f"the image dataset's centre is not usable ({e})") from e
    info = volumes.volume_info(source)
    defects = str(data.attrs.get("defects", "") or "")
    threshold = float(data.attrs.get("defect_threshold", 0.0))
    out = data.data.copy()
    for i, z in enumerate(data.z):
        dx, dy = (int(v) // 2**mip for v in t_total[i])
        img = volumes.read(info.path, mip, x0 + dx, y0 + dy, z, size)[0, 0]
        if defects:
            d = volumes.read(defects, mip, x0 + dx, y0 + dy, z, size)[0, 0]
            img = torch.where(d.float() > threshold, 0, img)
        out[i, 0] = img.numpy().astype(out.dtype)
    return out


@dataclass(frozen=True)
class _Output:
    """The files generated from one plain image dataset."""

    summary: datasets.DatasetSummary
    field_path: str
    image_path: str | None  # None after the last stage (no re-cut images)


def _plan(pyramid_path: str, dataset_path: str, checkpoint_name: str, upto_stage: int):
    """``(modules, index of upto_stage, next module or None, output MIP, outputs)``."""
    mods = modules.discover(pyramid_path)
    stage_numbers = [m.stage for m in mods]
    if upto_stage not in stage_numbers:
        raise MetroemError(f"no stage {upto_stage} in {pyramid_path} (stages {stage_numbers})")
    k = stage_numbers.index(upto_stage)
    nxt = mods[k + 1] if k + 1 < len(mods) else None
    out_mip = nxt.mip if nxt is not None else mods[k].mip
    plain = [
        s for s in datasets.list_datasets(dataset_path)
        if s.kind == "image" and s.mip == out_mip and s.suffix is None
    ]
    if not plain:
        raise MetroemError(
            f"no image datasets at MIP {out_mip} in {dataset_path} to generate fields for; cut "
            f"them with metroem-download-image --mips {out_mip}"
        )
    outputs = []
    for summary in plain:
        fname = datasets.field_filename(
            upto_stage, summary.x, summary.y, summary.z_start, out_mip, checkpoint_name
        )
        iname = datasets.image_filename(summary.x, summary.y, summary.z_start, out_mip,
                                        checkpoint_name)
        outputs.append(_Output(summary, os.path.join(dataset_path, fname),
                               os.path.join(dataset_path, iname) if nxt is not None else None))
    return mods, k, nxt, out_mip, outputs


def _recorded(path: str) -> dict:
    """The provenance attributes (``pyramid``, ``weights``) of an existing dataset file."""
    read = datasets.read_field_dataset if os.path.basename(path).startswith("field_") \
        else datasets.read_image_dataset
    attrs = read(path, load_data=False).attrs
    return {k: str(attrs[k]) for k in PROVENANCE if k in attrs}


def check_outputs(pyramid_path: str, dataset_path: str, checkpoint_name: str, upto_stage: int,
                  overwrite: bool = False, own_ok: bool = False) -> None:
    """Refuse, before anything is written, to replace generated files without ``overwrite``.

    An existing output is replaced only with ``overwrite``, or with ``own_ok`` when it records
    this very pyramid (a resumed run regenerating its own fields); one that records this
    pyramid and its current weights is up to date and passes. Files written by another
    pyramid, or with no record (e.g. ``download_field --suffix`` with the same name), are kept.
    """
    if overwrite:
        return
    here = str(Path(pyramid_path).expanduser().resolve())
    mods, k, _, _, outputs = _plan(pyramid_path, dataset_path, checkpoint_name, upto_stage)
    current = _provenance(pyramid_path, mods[: k + 1], checkpoint_name)
    for out in outputs:
        for path in (out.field_path, out.image_path):
            if path is None or not os.path.exists(path):
                continue
            recorded = _recorded(path)
            maker = recorded.get("pyramid")
            if (own_ok and maker == here) or recorded == current:
                continue  # this run's own files, or files it would write identically
            by = f"by pyramid {maker}" if maker else "with no record of the pyramid that made it"
            if maker == here:
                by = "by this pyramid in an earlier run"
            raise MetroemError(
                f"{path} exists, written {by}; pass --overwrite to replace it, or use another "
                "--checkpoint_name (it is part of the generated file names)"
            )


def _provenance(pyramid_path: str, used: list[modules.ModuleInfo], checkpoint_name: str,
                spec_changes: Mapping[int, Mapping] | None = None) -> dict:
    """What the generated files record: the pyramid, a digest of every weights file used and
    the spec changes they ran with."""
    digests = {}
    for m in used:
        path = modules.weights_path(m.path, checkpoint_name)
        digests[str(m.stage)] = hashlib.sha1(path.read_bytes()).hexdigest() if path.exists() \
            else "none"
    record = {"pyramid": str(Path(pyramid_path).expanduser().resolve()),
              "weights": json.dumps(digests, sort_keys=True)}
    changes = {str(m.stage): dict(spec_changes[m.stage]) for m in used
               if spec_changes and spec_changes.get(m.stage)}
    if changes:
        record["spec_changes"] = json.dumps(changes, sort_keys=True)
    return record


def _up_to_date(out: _Output, record: dict) -> bool:
    paths = [p for p in (out.field_path, out.image_path) if p is not None]
    return all(os.path.exists(p) and _recorded(p) == record for p in paths)


def generate_fields(
    pyramid_path: str,
    dataset_path: str,
    checkpoint_name: str,
    upto_stage: int,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
    overwrite: bool = False,
    own_ok: bool = False,
    spec_changes: Mapping[int, Mapping] | None = None,
) -> list[str]:
    """Write the field + re-cut image datasets that feed the stage after ``upto_stage``.

    ``spec_changes`` (stage -> spec keys) runs stages with parameter-free settings changed, as
    a training run's ``model.train_spec`` says.

    Returns the field files (written, or already up to date). If ``upto_stage`` is the last
    stage, fields are written at its own MIP (useful for evaluation) and no images are re-cut.
    Outputs that already record this pyramid and these exact weights are kept as they are (a
    rerun after an interruption finishes the rest); other existing outputs are replaced only as
    :func:`check_outputs` allows (``overwrite``, ``own_ok``). Progress is logged (INFO).
    """
    check_outputs(pyramid_path, dataset_path, checkpoint_name, upto_stage, overwrite, own_ok)
    mods, k, nxt, out_mip, outputs = _plan(pyramid_path, dataset_path, checkpoint_name,
                                           upto_stage)
    record = _provenance(pyramid_path, mods[: k + 1], checkpoint_name, spec_changes)
    todo = [o for o in outputs if not _up_to_date(o, record)]
    for o in outputs:
        if o not in todo:
            log.info("%s is up to date (same pyramid and weights); kept",
                     os.path.basename(o.field_path))
    if not todo:
        return [o.field_path for o in outputs]
    stages = [
        (m.mip, modules.load_module(m.path, checkpoint_name=checkpoint_name, device=str(device),
                                    spec_changes=(spec_changes or {}).get(m.stage)))
        for m in mods[: k + 1]
    ]
    aligner = PyramidAligner(stages, input_mip=out_mip).to(device).eval()
    coarsest = max(m.mip for m in mods)
    for o in todo:
        summary = o.summary
        data = datasets.read_image_dataset(summary.path)
        pairs = torch.from_numpy(data.data.astype(np.float32))
        out = []
        with torch.no_grad():
            for b in range(0, len(pairs), batch_size):
                chunk = pairs[b : b + batch_size].to(device)
                out.append(aligner(chunk[:, 0:1], chunk[:, 1:2]).cpu())
        field = torch.cat(out)
        tissue = (pairs[:, 1:2] != 0) & (pairs[:, 0:1] != 0)
        # The same removal (and snapping rule) as download_field.
        field_rm, t_new = geometry.remove_translation(field, out_mip, coarsest, tissue)
        t_total = t_new.numpy() + data.translation  # from the unmoved windows
        attrs = {
            k_: data.attrs[k_] for k_ in ("x_offset", "y_offset", "z", "patch_size", "resolution")
            if k_ in data.attrs
        }
        attrs.update(mip=out_mip, stage=upto_stage, tag=checkpoint_name, source=summary.path,
                     **record)
        # Images first, field last: the field file is what marks this output as done.
        if o.image_path is not None:
            _recut_images(data, summary, o, t_new, t_total, out_mip, record)
        datasets.write_field_dataset(
            o.field_path, field_rm.numpy(), translation=t_total, attrs=attrs, overwrite=True
        )
        mean_shift = float(t_new.double().norm(dim=1).mean())
        log.info("generated %s: %d pairs, mean removed translation %.1f MIP0 px",
                 os.path.basename(o.field_path), len(field), mean_shift)
    return [o.field_path for o in outputs]


def _recut_images(data, summary, out: _Output, t_new, t_total, mip, record):
    """Write ``x*_y*_z*_MIP{mip}_{tag}.h5``: the pairs with sources moved by the translation."""
    try:
        pairs = _read_moved_sources(data, t_total, mip)
    except MetroemError as e:
        log.warning("cannot re-read %s's source volume (%s); shifting the stored patches "
                    "instead (0 = no data where the window leaves them)",
                    os.path.basename(summary.path), e)
        pairs = shift_source(data.data, (t_new // 2**mip).numpy())
    attrs = dict(data.attrs)
    attrs.update(field_dset=out.field_path, **record)
    datasets.write_image_dataset(out.image_path, pairs, attrs, translation=t_total,
                                 overwrite=True)


def build_parser():
    from metroem import cliargs

    p = cliargs.Parser(prog="metroem generate", description=__doc__.splitlines()[0])
    cliargs.add_pyramid(p, help="pyramid folder (module folders <STAGE>_mip<MIP>in_<SUFFIX>)")
    p.add_argument("--dataset_path", required=True, help="folder of h5 image/field datasets")
    cliargs.add_checkpoint(p, required=True, help="the weights to run")
    p.add_argument("--stage", type=int, required=True, help="run stages up to this one")
    cliargs.add_device(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing generated files (kept by default; files already made "
                   "by this pyramid with these weights are always kept)")
    cliargs.add_common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``metroem generate``: write the fields (and re-cut images) after a trained stage."""
    from metroem import cliargs
    from metroem.devices import parse_device
    from metroem.errors import cli_errors

    @cli_errors
    def run(argv) -> int:
        args = cliargs.parse_args(build_parser(), argv, announce_threads=True)
        generate_fields(args.pyramid_path, args.dataset_path, args.checkpoint_name, args.stage,
                        device=parse_device(args.device), overwrite=args.overwrite)
        return 0

    return run(argv)
