"""The demo: the whole metroem pipeline on a built-in misaligned EM-like stack (``make demo``).

1. build a local precomputed CloudVolume of a misaligned stack + its ground-truth field layer;
2. cut image datasets at every MIP of the demo pyramid (and ground-truth field datasets);
3. train every stage, generating the fields between stages;
4. print each stage's validation end-point error against the ground truth.

No downloads, no credentials; about 10 minutes on 2 CPU cores. ``--sections DIR`` uses real
images (e.g. ``../shared/data/isbi``) instead of the procedural stack. The pyramid definition
is the shipped ``demo`` pyramid's (:mod:`metroem.pretrained`) unless ``--pyramid_path`` names
another (a folder, or another shipped pyramid's name).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import torch

from metroem import (
    cliargs,
    datasets,
    demo_volume,
    download,
    geometry,
    modules,
    pretrained,
)
from metroem.errors import MetroemError, cli_errors
from metroem.training import cli as train_cli

log = logging.getLogger(__name__)
MARKER = "metroem_demo_run.json"


def _fresh_dir(out: str, resume: bool) -> None:
    """Start from an empty ``out`` unless resuming; only ever delete a folder the demo made."""
    if os.path.exists(out) and not resume:
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            raise MetroemError(f"{out} exists and was not made by the demo; pass another --out")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump({"started": time.time()}, f)


def _val_fraction(pyr: str) -> float:
    from metroem import config as config_mod

    cfg = config_mod.load_config("custom", os.path.join(pyr, "train.yaml"))
    return float(cfg["data"]["val_fraction"])


def _load_volume(vol_dir: str) -> demo_volume.DemoVolume:
    """The DemoVolume described by an existing ``demo.json`` (for --resume)."""
    with open(os.path.join(vol_dir, "demo.json")) as f:
        meta = json.load(f)
    keys = demo_volume.DemoVolume.__dataclass_fields__
    vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k in keys}
    return demo_volume.DemoVolume(**vals)


def copy_pyramid_definition(src: str, dst: str) -> list[modules.ModuleInfo]:
    """Copy a pyramid's module folders (spec + code, no weights) into ``dst``."""
    mods = modules.discover(src)
    os.makedirs(dst, exist_ok=True)
    for m in mods:
        target = os.path.join(dst, m.name)
        if os.path.exists(target):
            continue
        shutil.copytree(m.path, target, ignore=shutil.ignore_patterns("*.pth*", "__pycache__"))
    for extra in ("train.yaml", modules.SETTINGS_FILE):
        if os.path.exists(os.path.join(src, extra)):
            shutil.copy(os.path.join(src, extra), os.path.join(dst, extra))
    return modules.discover(dst)


def cut_datasets(vol: demo_volume.DemoVolume, data_dir: str, mips: list[int]) -> None:
    """Image datasets covering whole sections at every MIP + ground-truth field datasets."""
    size = vol.size[0]
    cx = cy = size // 2
    sizes = [size >> m for m in mips]
    download.download_image(
        vol.image_path, data_dir, 1, vol.num_sections, cx, cy, mips, sizes,
        overwrite=True, progress=False,
    )
    for m, s in zip(mips, sizes, strict=True):
        x0, y0 = geometry.patch_origin(cx, cy, m, s)
        gts = [
            demo_volume.pair_ground_truth(vol.field_path, m, x0, y0, z, s, s)[0].numpy()
            for z in range(1, vol.num_sections)
        ]
        name = datasets.field_filename(0, cx, cy, 1, m, "groundtruth")
        attrs = {"mip": m, "x_offset": cx, "y_offset": cy, "z": list(range(1, vol.num_sections)),
                 "patch_size": s, "stage": 0, "tag": "groundtruth", "source": vol.field_path}
        datasets.write_field_dataset(
            os.path.join(data_dir, name), np.stack(gts), translation=np.zeros((len(gts), 2),
                                                                                int),
            attrs=attrs, overwrite=True,
        )


def identity_epe(data_dir: str, mip: int) -> float:
    """Median EPE of doing nothing (zero field) against the ground truth, over tissue."""
    from metroem.training.stage_inputs import StageDataset

    ds = StageDataset(data_dir, mip, None, "identity-baseline")
    errs = [item["field"].norm(dim=0)[item["tgt"][0] != 0] for item in (ds[i] for i in
                                                                        range(len(ds)))]
    return float(torch.cat(errs).median())


def pyramid_epe_by_stage(
    pyramid: str, data_dir: str, checkpoint_name: str, val_fraction: float, seed: int
) -> list[tuple[int, float]]:
    """Median EPE (MIP0 px, over tissue) of the pyramid run through stage 0..k, for every k.

    Every row uses the same held-out pairs (the training split's validation pairs), whole
    sections at the finest stage's MIP, the unmoved windows and the ground truth, so the rows are
    directly comparable: the error the aligner makes when it stops after stage k.
    """
    from metroem.aligner import load_aligner
    from metroem.training.batches import split_indices
    from metroem.training.stage_inputs import StageDataset

    mods = modules.discover(pyramid)
    mip = mods[-1].mip
    ds = StageDataset(data_dir, mip, None, "evaluation")
    _, val_idx = split_indices(len(ds), val_fraction, seed)
    rows = []
    for k in range(len(mods)):
        stages = [m.stage for m in mods[: k + 1]]
        aligner = load_aligner(pyramid, checkpoint_name, stages=stages, input_mip=mip)
        errs = []
        with torch.no_grad():
            for i in val_idx:
                item = ds[i]
                field = aligner(item["src"][None], item["tgt"][None])[0]
                errs.append((field - item["field"]).norm(dim=0)[item["tgt"][0] != 0])
        rows.append((mods[k].stage, float(torch.cat(errs).median()) * 2**mip))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.Parser(prog="metroem demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    cliargs.add_pyramid(p, "--pyramid", required=False,
                        help="pyramid definition to train: a folder or a shipped pyramid's name "
                        "(default: demo)")
    p.add_argument("--sections", default=None, help="folder of real section images to use")
    p.add_argument("--num_sections", type=int, default=16)
    p.add_argument("--size", type=int, default=1024, help="section size at MIP0 (pixels)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config key, e.g. --set train.steps=50")
    cliargs.add_device(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    p.add_argument("--seed", type=int, default=0)
    cliargs.add_common(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = cliargs.parse_args(build_parser(), argv, announce_threads=True)
    pyramid = (pretrained.pyramid_path("demo") if a.pyramid_path is None
               else pretrained.resolve(a.pyramid_path))  # resolved (and verified) once
    if not pyramid.is_dir():
        raise MetroemError(f"no pyramid definition at {a.pyramid_path}; pass --pyramid_path DIR")
    a.pyramid_path = str(pyramid)
    t0 = time.time()
    out = os.path.abspath(a.out)
    _fresh_dir(out, a.resume)
    vol_dir, data_dir, pyr = (os.path.join(out, d) for d in ("volume", "data", "pyramid"))
    log.info("[1/4] building the demo volume in %s", vol_dir)
    if a.resume and os.path.exists(os.path.join(vol_dir, "demo.json")):
        vol = _load_volume(vol_dir)
    else:
        vol = demo_volume.build_demo_volume(vol_dir, num_sections=a.num_sections, size=a.size,
                                            seed=a.seed, sections_dir=a.sections, overwrite=True)
    mods = copy_pyramid_definition(a.pyramid_path, pyr)
    mips = sorted({m.mip for m in mods}, reverse=True)
    log.info("[2/4] cutting datasets at MIPs %s into %s", mips, data_dir)
    if not (a.resume and os.path.isdir(data_dir)):
        os.makedirs(data_dir, exist_ok=True)
        cut_datasets(vol, data_dir, mips)
    base = {m: identity_epe(data_dir, m) for m in mips}
    log.info("[3/4] training %s", ", ".join(f"stage {m.stage} at MIP {m.mip}" for m in mods))
    train_args = [
        "--pyramid_path", pyr, "--dataset_path", data_dir, "--checkpoint_name", "demo",
        "--train_mode", "custom", "--train_params_path", os.path.join(pyr, "train.yaml"),
        "--device", a.device, "--seed", str(a.seed), "--no_redirect_stdout",
    ]
    for o in a.overrides:
        train_args += ["--set", o]
    if a.resume:
        train_args.append("--resume")
    results = train_cli.run(train_cli.build_parser().parse_args(train_args))
    # the results table is the command's output: stdout (the progress lines are on stderr);
    # measured first, so the loading log lines do not land inside the table
    rows = dict(pyramid_epe_by_stage(pyr, data_dir, "demo", _val_fraction(pyr), a.seed))
    print("[4/4] results on held-out pairs: end-point error vs ground truth (median over tissue)")
    header = ("stage", "MIP", "val before", "val after", "pyramid through stage (MIP0 px)")
    print("  {:>5} {:>3} {:>10} {:>9}   {}".format(*header))
    for r in results:
        epe = r.val.get("epe_median", float("nan"))
        print(f"  {r.stage:>5} {r.mip:>3} {base[r.mip]:>10.3f} {epe:>9.3f}   "
              f"{rows.get(r.stage, float('nan')):.3f}")
    print(f"  (val columns: pixels at the stage's MIP, on the stage's own crops; identity = "
          f"{base[min(base)] * 2 ** min(base):.2f} MIP0 px)")
    log.info("done in %.0f s. Trained pyramid: %s", time.time() - t0, pyr)
    log.info("tensorboard --logdir %s", os.path.join(pyr, "_runs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
