"""Fields between stages: run stages ``0..k`` over every pair and write the next stage's data.

For the stage after ``k`` (MIP ``m``): read every plain image dataset ``x*_y*_z*_MIP{m}.h5``,
run the pyramid up to stage ``k`` at input MIP ``m``, remove each pair's average translation over
tissue (snapped to a multiple of ``2**(coarsest MIP of the pyramid)`` MIP0 pixels, so every MIP
moves by whole pixels; :func:`metroem.download.remove_translation`, the same rule as
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

import os

import numpy as np
import torch

from metroem import datasets, download, modules, volumes
from metroem.aligner import PyramidAligner
from metroem.errors import MetroemError


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
        x0, y0 = download.patch_origin(
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


def generate_fields(
    pyramid_path: str,
    dataset_path: str,
    checkpoint_name: str,
    upto_stage: int,
    device: torch.device | str = "cpu",
    batch_size: int = 2,
    log=print,
) -> list[str]:
    """Write the field + re-cut image datasets that feed the stage after ``upto_stage``.

    Returns the written field files. If ``upto_stage`` is the last stage, fields are written at
    its own MIP (useful for evaluation) and no images are re-cut.
    """
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
    stages = [
        (m.mip, modules.load_module(m.path, checkpoint_name=checkpoint_name, device=str(device)))
        for m in mods[: k + 1]
    ]
    aligner = PyramidAligner(stages, input_mip=out_mip).to(device).eval()
    coarsest = max(m.mip for m in mods)
    written = []
    for summary in plain:
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
        field_rm, t_new = download.remove_translation(field, out_mip, coarsest, tissue)
        t_total = t_new.numpy() + data.translation  # from the unmoved windows
        attrs = {
            k_: data.attrs[k_] for k_ in ("x_offset", "y_offset", "z", "patch_size", "resolution")
            if k_ in data.attrs
        }
        attrs.update(mip=out_mip, stage=upto_stage, tag=checkpoint_name, source=summary.path)
        fname = datasets.field_filename(
            upto_stage, summary.x, summary.y, summary.z_start, out_mip, checkpoint_name
        )
        fpath = os.path.join(dataset_path, fname)
        datasets.write_field_dataset(
            fpath, field_rm.numpy(), translation=t_total, attrs=attrs, overwrite=True
        )
        written.append(fpath)
        if nxt is not None:
            _recut_images(data, summary, fpath, checkpoint_name, t_new, t_total, out_mip,
                          dataset_path, log)
        mean_shift = float(t_new.double().norm(dim=1).mean())
        log(f"generated {fname}: {len(field)} pairs, mean removed translation {mean_shift:.1f} "
            "MIP0 px")
    return written


def _recut_images(data, summary, field_path, tag, t_new, t_total, mip, dataset_path, log):
    """Write ``x*_y*_z*_MIP{mip}_{tag}.h5``: the pairs with sources moved by the translation."""
    try:
        pairs = _read_moved_sources(data, t_total, mip)
    except MetroemError as e:
        log(f"cannot re-read {os.path.basename(summary.path)}'s source volume ({e}); shifting "
            "the stored patches instead (0 = no data where the window leaves them)")
        pairs = shift_source(data.data, (t_new // 2**mip).numpy())
    path = os.path.join(
        dataset_path, datasets.image_filename(summary.x, summary.y, summary.z_start, mip, tag)
    )
    attrs = dict(data.attrs)
    attrs["field_dset"] = field_path
    datasets.write_image_dataset(path, pairs, attrs, translation=t_total, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    """``metroem generate``: write the fields (and re-cut images) after a trained stage."""
    import argparse

    from metroem.errors import cli_errors
    from metroem.training.distributed import resolve_device

    p = argparse.ArgumentParser(prog="metroem generate", description=__doc__.splitlines()[0])
    p.add_argument("--pyramid_path", required=True)
    p.add_argument("--dataset_path", required=True)
    p.add_argument("--checkpoint_name", required=True)
    p.add_argument("--stage", type=int, required=True, help="run stages up to this one")
    p.add_argument("--device", default="cpu")

    @cli_errors
    def run(args) -> int:
        generate_fields(args.pyramid_path, args.dataset_path, args.checkpoint_name, args.stage,
                        device=resolve_device(args.device))
        return 0

    return run(p.parse_args(argv))
