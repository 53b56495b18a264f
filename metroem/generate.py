"""Fields between stages: run stages ``0..k`` over every pair and write the next stage's data.

For the stage after ``k`` (MIP ``m``): read every plain image dataset at ``m``, run the pyramid
up to stage ``k`` at input MIP ``m``, remove each pair's average translation over tissue
(snapped to whole pixels at the pyramid's coarsest MIP so every MIP can move by an integer),
and write

* ``field_{k}_x*_y*_z*_MIP{m}_{C}.h5``: the saturated field minus its translation, and
* ``x*_y*_z*_MIP{m}_{C}.h5``: the image pairs re-cut from the source volume with each source
  window moved by that translation (so ``src(p + f(p))`` is unchanged).

When the image dataset's source volume is not reachable, the stored source patch is shifted by
the (integer) translation instead, with no-data (0) filling what comes in from outside.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from metroem import datasets, download, fields, modules
from metroem.aligner import PyramidAligner
from metroem.errors import MetroemError


def _snap_step(mips: list[int]) -> int:
    return 2 ** max(mips)


def snap_translation(t_mip0: torch.Tensor, step: int) -> torch.Tensor:
    """Round translations (MIP0 px) to the nearest multiple of ``step``."""
    return torch.round(t_mip0 / step) * step


def _shift_source(pairs: np.ndarray, t_px: np.ndarray) -> np.ndarray:
    """Move each source patch window by integer ``t_px`` (x, y) at the patch's MIP, 0-filled."""
    out = pairs.copy()
    for i, (tx, ty) in enumerate(t_px.astype(int)):
        src = torch.from_numpy(pairs[i, 0:1][None].astype(np.float32))
        f = torch.zeros(1, 2, *src.shape[-2:])
        f[:, 0], f[:, 1] = float(tx), float(ty)
        out[i, 0] = fields.warp_image(src, f)[0, 0].numpy().astype(pairs.dtype)
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
    used = mods[: k + 1]
    stages = [
        (m.mip, modules.load_module(m.path, checkpoint_name=checkpoint_name, device=str(device)))
        for m in used
    ]
    aligner = PyramidAligner(stages, input_mip=out_mip).to(device).eval()
    step = _snap_step([m.mip for m in mods])
    plain = [
        s for s in datasets.list_datasets(dataset_path)
        if s.kind == "image" and s.mip == out_mip and s.suffix is None
    ]
    if not plain:
        raise MetroemError(
            f"no image datasets at MIP {out_mip} in {dataset_path} to generate fields for; cut "
            f"them with metroem-download-image --mips {out_mip}"
        )
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
        t_mip = fields.mean_translation(field, tissue)
        t0 = snap_translation(t_mip * 2**out_mip, step)
        field_rm = field - (t0 / 2**out_mip).view(-1, 2, 1, 1)
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
            fpath, field_rm.numpy(), translation=t0.long().numpy(), attrs=attrs, overwrite=True
        )
        written.append(fpath)
        if nxt is not None:
            _recut_images(data, summary, fpath, checkpoint_name, t0, out_mip, dataset_path)
        mean_shift = float(t0.norm(dim=1).mean())
        log(f"generated {fname}: {len(field)} pairs, mean removed translation {mean_shift:.1f} "
            "MIP0 px")
    return written


def _recut_images(data, summary, field_path, tag, t0, mip, dataset_path) -> None:
    source = str(data.attrs.get("source", ""))
    z = data.z
    contiguous = z == list(range(z[0], z[0] + len(z)))
    if source and contiguous:
        try:
            download.download_image(
                source, dataset_path, z[0], z[-1] + 1, int(data.attrs["x_offset"]),
                int(data.attrs["y_offset"]), [mip], [int(data.attrs["patch_size"])],
                field_dset=field_path, suffix=tag, overwrite=True, progress=False,
            )
            return
        except MetroemError as e:
            if "no CloudVolume" not in str(e) and "cannot open" not in str(e):
                raise
    shifted = _shift_source(data.data, (t0 / 2**mip).numpy())
    path = os.path.join(
        dataset_path, datasets.image_filename(summary.x, summary.y, summary.z_start, mip, tag)
    )
    attrs = dict(data.attrs)
    attrs["field_dset"] = field_path
    datasets.write_image_dataset(
        path, shifted, attrs, translation=t0.long().numpy(), overwrite=True
    )


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
