"""GPU throughput and memory of the shipped pyramids: inference and training, fp32 and bf16.

Measures, on one device (``--device cuda`` by default; ``--device cpu`` is the test mode):

1. whole-image inference of each shipped pyramid (``isbi``, ``demo``; :mod:`metroem.pretrained`)
   at several image sizes: megapixels of target per second (median of ``--repeats`` runs
   after a warm-up, synchronised) and peak GPU memory (``torch.cuda.max_memory_allocated``,
   reset per measurement), in fp32 and under ``torch.autocast(bfloat16)``; the bf16 row also
   gives the largest difference of its field from the fp32 field (px at the input MIP), so the
   quality cost of bf16 is visible;
2. tiled inference (:func:`metroem.tiling.align_tiled`, chunk ``--chunk``) of each pyramid at
   the largest size, beside the whole-image run: GPU memory is bounded by the window, not the
   image (the whole field is kept in host memory);
3. training steps per second of every stage of each shipped pyramid, built from its module
   spec with the recipe's ``model.train_spec`` (:func:`metroem.training.engine.training_spec`)
   and trained as the engine does: the recipe's (``train.yaml``, resolved per MIP) batch size,
   crop size, augmentation, losses (supervised on same-section pairs, self-supervised
   otherwise), optimizer and gradient clipping; fp32 and bf16 autocast (forward + loss). The
   batches are synthetic textures (no data set needed), so one step is augment + forward +
   loss + backward + optimizer step, without the data loader.

An op that fails (bf16 not implemented, out of memory) is recorded with its error in the table
instead of stopping the run. Measurements still to run once ``--budget_s`` seconds have passed
are recorded as skipped. The results are rewritten after every measurement, so a killed run
still leaves what it measured.

Writes ``<out>/gpu.json`` and ``<out>/gpu.md``; their header names the device (on CPU the
title says so, so a CPU file is never mistaken for a GPU result).

Examples::

    python benchmarks/gpu.py --device cuda --out benchmarks/results   # ~3-6 min on one GPU
    python benchmarks/gpu.py --device cpu --quick --out /tmp/g        # test mode, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (shared helpers: strict-JSON results files, threads)

from metroem import augment as augment_mod  # noqa: E402
from metroem import config as config_mod  # noqa: E402
from metroem import fields, losses, modules, nets, pretrained, synth, tiling  # noqa: E402
from metroem.aligner import load_aligner  # noqa: E402
from metroem.errors import MetroemError, cli_errors  # noqa: E402
from metroem.training import engine  # noqa: E402
from metroem.training.equivariance import forward_with_equivariance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
PYRAMIDS = ("isbi", "demo")
SIZES = (512, 2048, 4096, 8192)
QUICK_SIZES = (128,)
PRECISIONS = ("fp32", "bf16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (test mode)")
    p.add_argument("--pyramids", nargs="+", default=list(PYRAMIDS),
                   help="shipped pyramid names or folders (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help=f"whole-image sides in px (default {list(SIZES)}; --quick: "
                        f"{list(QUICK_SIZES)})")
    p.add_argument("--tiled_size", type=int, default=None,
                   help="side of the tiled run (default: the largest size)")
    p.add_argument("--chunk", type=int, default=1024, help="tile side of the tiled run")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; quick 1)")
    p.add_argument("--train_steps", type=int, default=None,
                   help="timed training steps (default 10; quick 1)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--budget_s", type=float, default=420.0,
                   help="skip what is left after this many seconds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 2 on cpu, all cores with cuda)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true",
                   help="test mode: tiny sizes, batches and crops, one repeat")
    return p


# --- device ----------------------------------------------------------------------------------


def _device(spec: str) -> torch.device:
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetroemError("no CUDA device is visible to torch; run on a GPU machine, or pass "
                           "--device cpu for the test mode")
    if device.type not in ("cuda", "cpu"):
        raise MetroemError(f"--device {spec}: use cuda, cuda:N or cpu")
    return device


def device_header(device: torch.device, threads: int) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device),
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} "
                           "threads)", memory_gib=None, cuda=None)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset (None on CPU: not measured there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` synchronised runs after one warm-up, and
    the last run's return value."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text[:200]


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.seconds


# --- data ------------------------------------------------------------------------------------


def texture(n: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """``(n, 1, size, size)`` float images with structure at several scales, values 20..235
    (raw, nonzero: 0 means no data)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    img = torch.zeros(n, 1, size, size, device=device)
    for cells, weight in ((8, 1.0), (32, 0.6), (128, 0.4)):
        c = min(cells, size)
        noise = torch.rand(n, 1, c, c, generator=g).to(device)
        img += weight * torch.nn.functional.interpolate(noise, size=(size, size),
                                                        mode="bicubic", align_corners=False)
    img += 0.3 * torch.rand(n, 1, size, size, generator=g).to(device)
    img = (img - img.amin()) / (img.amax() - img.amin() + 1e-6)
    return 20 + 215 * img


def image_pair(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A target texture and a source: the target under a smooth random deformation."""
    tgt = texture(1, size, 0, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    spec = synth.DeformationSpec(translation=6.0, rotation_deg=0.5, elastic=2.0,
                                 elastic_scale=max(16.0, size / 16))
    d = synth.random_field(1, size, size, spec, generator=g, device=torch.device("cpu"))
    src = fields.warp_image(tgt, d.to(device))
    return src.clamp_min(1.0), tgt


# --- measurements ----------------------------------------------------------------------------


def inference(aligner, size: int, precision: str, repeats: int, device: torch.device,
              reference: torch.Tensor | None) -> tuple[dict, torch.Tensor | None]:
    """One whole-image measurement; ``reference`` is the fp32 field (for the bf16 difference)."""
    src, tgt = image_pair(size, device)
    _reset_peak(device)

    def run():
        with torch.no_grad(), _autocast(device, precision):
            return aligner(src, tgt)

    sec, field = timed(run, repeats, device)
    field = field.float()
    row = {"seconds": sec, "mpix_per_s": size * size / 1e6 / sec, "peak_mib": _peak_mib(device),
           "field_finite": bool(torch.isfinite(field).all())}
    if reference is not None:
        row["max_diff_px"] = float((field - reference).abs().max())
        diff = (field - reference).abs().flatten()
        row["median_diff_px"] = float(diff.median())
        row["p99_diff_px"] = float(torch.quantile(diff[:: max(1, diff.numel() // 2**22)], 0.99))
    return row, field


def tiled(aligner, size: int, chunk: int, device: torch.device) -> dict:
    src, tgt = image_pair(size, device)
    src_np, tgt_np = src[0, 0].cpu().numpy(), tgt[0, 0].cpu().numpy()
    del src, tgt
    _reset_peak(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        field = tiling.align_tiled(aligner, src_np, tgt_np, chunk=chunk)
    _sync(device)
    sec = time.perf_counter() - t0
    return {"seconds": sec, "mpix_per_s": size * size / 1e6 / sec, "peak_mib": _peak_mib(device),
            "chunk": chunk, "field_finite": bool(torch.isfinite(field).all())}


def stage_setup(module: modules.ModuleInfo, cfg: dict, quick: bool) -> dict:
    """What the engine builds for one stage: model, optimizer, losses, augment, batch size."""
    torch.manual_seed(0)
    model = nets.build_model(engine.training_spec(module, cfg))
    batch = int(cfg["data"]["batch_size"])
    crop = int(cfg["data"]["crop_size"])
    if quick:
        batch, crop = min(batch, 2), min(crop, 64)
    return {
        "model": model, "batch": batch, "crop": crop,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "loss_sup": losses.build_loss(cfg["loss"], cfg["masks"]),
        "loss_self": losses.build_loss({**cfg["loss"], "supervised_weight": 0.0}, cfg["masks"]),
        "augment": augment_mod.build_augment(cfg["augment"]),
        "eq_weight": float(cfg["loss"]["equivariance_weight"]),
        "eq_spec": augment_mod.deformation_spec(cfg["augment"]["warp"]),
        "clip": float(cfg["train"]["grad_clip"]),
    }


def training(setup: dict, cfg: dict, precision: str, steps: int,
             device: torch.device) -> dict:
    """Steps per second of the engine's step on synthetic batches (fresh weights each time)."""
    model = setup["model"]
    model.load_state_dict(setup["state"])  # the same starting weights for every precision
    model.to(device).train()
    optimizer = config_mod.build_optimizer(model.parameters(), cfg)
    n, crop = setup["batch"], setup["crop"]
    tgt = texture(n, crop, 2, device)
    d = synth.random_field(n, crop, crop, synth.DeformationSpec(translation=2.0, elastic=1.0,
                                                                 elastic_scale=32.0),
                           generator=torch.Generator().manual_seed(3))
    src = fields.warp_image(tgt, d.to(device)).clamp_min(1.0)
    counter = [0]
    last = {}

    def step():
        gen = torch.Generator().manual_seed(counter[0])
        counter[0] += 1
        batch = setup["augment"]({"src": src, "tgt": tgt}, gen)
        loss_fn = setup["loss_sup"] if "field" in batch else setup["loss_self"]
        with _autocast(device, precision):
            if setup["eq_weight"] > 0:
                pred, eq_term = forward_with_equivariance(model, batch, setup["eq_spec"], gen)
            else:
                pred = model(batch["src"], batch["tgt"])
            total, _ = loss_fn(batch["src"], batch["tgt"], pred, gt_field=batch.get("field"),
                               src_mask=batch.get("src_defects"),
                               tgt_mask=batch.get("tgt_defects"),
                               features=model.pair_features, gt_known=batch.get("field_known"))
            if setup["eq_weight"] > 0:
                total = total + setup["eq_weight"] * eq_term
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if setup["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setup["clip"])
        optimizer.step()
        last["loss"] = total.detach()

    _reset_peak(device)
    step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    sec = (time.perf_counter() - t0) / steps
    loss = float(last["loss"].float())
    row = {"steps_per_s": 1 / sec, "seconds_per_step": sec, "peak_mib": _peak_mib(device),
           "batch": n, "crop": crop, "mpix_per_s": n * crop * crop / 1e6 / sec,
           "loss": loss, "optimizer": type(optimizer).__name__}
    model.to("cpu")
    return row


# --- the run ---------------------------------------------------------------------------------


def pyramid_folder(name: str) -> Path:
    """A shipped pyramid's folder (:func:`metroem.pretrained.resolve`); where metroem is not
    installed (a bare copy of the checkout with ``PYTHONPATH=.``), the checkout's
    ``models/<name>``, checked against the same registered weights."""
    try:
        return pretrained.resolve(name)
    except MetroemError:
        local = REPO / "models" / name
        if name in pretrained.names() and local.is_dir():
            return pretrained.verify(name, local)
        raise


class Results:
    """The results document, rewritten whole after every measurement."""

    def __init__(self, out: Path, header: dict, config: dict, budget: Budget):
        self.out, self.budget = out, budget
        self.doc = {"header": header, "config": config, "inference": [], "tiled": [],
                    "train": [], "status": "running"}

    def add(self, table: str, row: dict) -> None:
        self.doc[table].append(row)
        self.write()

    def write(self) -> None:
        self.doc["config"]["elapsed_s"] = self.budget.elapsed()
        q.write_results(self.out, "gpu", self.doc, markdown(self.doc))


def _measure(results: Results, table: str, key: dict, budget: Budget, fn) -> dict | None:
    """Run ``fn() -> dict`` unless over budget; record the row, its error or 'skipped'."""
    if budget.over():
        results.add(table, {**key, "status": "skipped (budget)"})
        return None
    try:
        row = fn()
    except Exception as e:  # noqa: BLE001  (bf16 op missing, out of memory, ...: recorded)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.add(table, {**key, "status": "error", "error": _error(e)})
        print(f"  {key}: {_error(e)}", flush=True)
        return None
    results.add(table, {**key, "status": "ok", **row})
    print(f"  {key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
    return row


def run_inference(results, name, aligner, sizes, args, device, budget) -> None:
    multiple = aligner.size_multiple()
    for size in sizes:
        if size % multiple:
            results.add("inference", {"pyramid": name, "size": size, "precision": "-",
                                      "status": f"skipped (not a multiple of {multiple})"})
            continue
        reference = None
        for precision in args.precisions:
            key = {"pyramid": name, "size": size, "precision": precision}
            box = {}

            def fn(precision=precision, reference=reference, box=box, size=size):
                row, box["field"] = inference(aligner, size, precision, args.repeats, device,
                                              reference if precision != "fp32" else None)
                return row

            row = _measure(results, "inference", key, budget, fn)
            if precision == "fp32" and row is not None:
                reference = box["field"]
        del reference


def run_training(results, name, path, args, device, budget) -> None:
    cfg_all = config_mod.load_config("custom", path / "train.yaml")
    for module in modules.discover(path):
        cfg = config_mod.resolve(cfg_all, module.mip)
        try:
            setup = stage_setup(module, cfg, args.quick)
        except Exception as e:  # noqa: BLE001  (recorded in every row of the stage)
            setup, error = None, _error(e)
        for precision in args.precisions:
            key = {"pyramid": name, "stage": module.stage, "mip": module.mip,
                   "precision": precision}
            if setup is None:
                results.add("train", {**key, "status": "error", "error": error})
                continue
            _measure(results, "train", key, budget,
                     lambda precision=precision, setup=setup, cfg=cfg: training(
                         setup, cfg, precision, args.train_steps, device))


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)


def _status(r: dict) -> str:
    return r["error"] if r["status"] == "error" else r["status"]


def markdown(doc: dict) -> str:
    h, c = doc["header"], doc["config"]
    gpu = h["device_type"] == "cuda"
    title = "# GPU benchmark" if gpu else "# GPU benchmark script, CPU test run (not a GPU result)"
    where = (f"**{h['device']}** ({h['memory_gib']:.0f} GiB, compute capability "
             f"{h['capability']}), CUDA {h['cuda']}, cuDNN {h['cudnn']}" if gpu else
             f"**{h['device']}**: GPU memory is not measured (`-`)")
    lines = [
        title, "",
        f"`{c['command']}` on {where}; torch {h['torch']}, Python {h['python']}, "
        f"{h['machine']} host with {h['cpus']} CPUs, {h['threads']} threads; {h['date']}. "
        f"Status: {doc['status']}"
        + (f" after {c['elapsed_s']:.0f} s" if c.get("elapsed_s") is not None else "")
        + f" (budget {c['budget_s']:.0f} s).", "",
        "Synthetic textures (no data set); timings are the median of "
        f"{c['repeats']} synchronised runs after a warm-up; peak memory is "
        "`torch.cuda.max_memory_allocated`, reset per row. bf16 = `torch.autocast(bfloat16)`; "
        "its field difference is against the fp32 field of the same pair, in px at the input "
        "MIP. See `benchmarks/gpu.py`.", "",
        "## Whole-image inference", "",
        "| pyramid | image | precision | MP/s | s / pair | peak MiB | max diff px "
        "| p99 diff px | median diff px | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["inference"]:
        lines.append(f"| {r['pyramid']} | {r['size']}² | {r['precision']} | "
                     f"{_fmt(r.get('mpix_per_s'))} | {_fmt(r.get('seconds'))} | "
                     f"{_fmt(r.get('peak_mib'), 4)} | {_fmt(r.get('max_diff_px'))} | "
                     f"{_fmt(r.get('p99_diff_px'))} | {_fmt(r.get('median_diff_px'))} | "
                     f"{_status(r)} |")
    lines += ["", f"## Tiled inference (fp32, `metroem.tiling.align_tiled`, chunk {c['chunk']})",
              "", "| pyramid | image | MP/s | s / pair | peak MiB | status |",
              "|---|---|---:|---:|---:|---|"]
    for r in doc["tiled"]:
        lines.append(f"| {r['pyramid']} | {r['size']}² | {_fmt(r.get('mpix_per_s'))} | "
                     f"{_fmt(r.get('seconds'))} | {_fmt(r.get('peak_mib'), 4)} | {_status(r)} |")
    lines += ["", "## Training step per stage (recipe batch and crop, augment + forward + loss "
              f"+ backward + optimizer; mean of {c['train_steps']} steps after a warm-up)", "",
              "| pyramid | stage | precision | batch x crop | steps / s | MP/s | peak MiB "
              "| loss | status |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in doc["train"]:
        bc = f"{r['batch']} x {r['crop']}²" if "batch" in r else "-"
        lines.append(f"| {r['pyramid']} | {r['stage']} (MIP {r['mip']}) | {r['precision']} | "
                     f"{bc} | {_fmt(r.get('steps_per_s'))} | {_fmt(r.get('mpix_per_s'))} | "
                     f"{_fmt(r.get('peak_mib'), 4)} | {_fmt(r.get('loss'))} | {_status(r)} |")
    return "\n".join(lines) + "\n"


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = _device(args.device)
    if args.threads is None:
        args.threads = 2 if device.type == "cpu" else (os.cpu_count() or 2)
    q.set_threads(args.threads)
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.train_steps = args.train_steps or (1 if args.quick else 10)
    tiled_size = args.tiled_size or max(sizes)
    chunk = min(args.chunk, tiled_size // 2) if args.quick else args.chunk
    budget = Budget(args.budget_s)
    config = {"command": "python benchmarks/gpu.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "quick": args.quick, "sizes": sizes, "tiled_size": tiled_size, "chunk": chunk,
              "repeats": args.repeats, "train_steps": args.train_steps,
              "precisions": args.precisions, "budget_s": args.budget_s,
              "pyramids": args.pyramids}
    results = Results(Path(args.out), device_header(device, args.threads), config, budget)
    results.write()
    print(f"device: {results.doc['header']['device']}", flush=True)
    paths = {name: pyramid_folder(name) for name in args.pyramids}
    config["pyramid_paths"] = {name: str(path) for name, path in paths.items()}
    aligners = {name: load_aligner(path, device=device, smoothing_nm=0)  # own field
                for name, path in paths.items()}
    print("whole-image inference", flush=True)
    for name, aligner in aligners.items():
        run_inference(results, name, aligner, sizes, args, device, budget)
    print("training steps", flush=True)
    for name, path in paths.items():
        run_training(results, name, path, args, device, budget)
    # last: one pass each, but the host-side tiling work makes it the least predictable
    print("tiled inference", flush=True)
    for name, aligner in aligners.items():
        if tiled_size % aligner.size_multiple() == 0:
            _measure(results, "tiled", {"pyramid": name, "size": tiled_size}, budget,
                     lambda aligner=aligner: tiled(aligner, tiled_size, chunk, device))
    results.doc["status"] = "finished"
    results.write()
    print(markdown(results.doc))
    print(f"wrote {Path(args.out) / 'gpu.json'} and {Path(args.out) / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
