"""Speed of metroem and the classical baselines on this machine's CPU, in one run.

Measures

1. inference throughput (megapixels of target per second) of every method on the same
   512 x 512 section pair, and each baseline's ratio to metroem;
2. training step time per pyramid stage (forward + loss + backward + Adam step on a batch of
   crops at the stage's MIP, with the parameter-free refinements off as the recipes train);
3. scaling: metroem and two baselines vs image size, and metroem vs the number of sections
   (pairs aligned one after the other, and as one batch).

metroem runs the pyramid given with ``--pyramid_path`` (default ``models/isbi`` when it exists),
else an untrained pyramid of the default stage network at MIPs 2/1/0: the weights do not change the
compute, so the timings hold for a trained one of the same spec. Every timing is the median of
``--repeats`` runs after two warm-ups; threads are pinned with ``--threads``.

Writes ``<out>/speed.json`` and ``<out>/speed.md``.

Examples::

    python benchmarks/speed.py                         # ~3-5 min on 2 cores
    python benchmarks/speed.py --quick --out /tmp/s    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from metroem import losses, nets
from metroem.aligner import PyramidAligner, load_aligner
from metroem.atomic import atomic_path
from metroem.errors import MetroemError, cli_errors
from metroem.eval import baselines, pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import neighbours  # noqa: E402  (the neighbour benchmark's pairs and measures)
import quality as q  # noqa: E402  (thread pinning shared by the benchmarks)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYRAMID = REPO / "models" / "isbi"
DEFAULT_OUT = REPO / "benchmarks" / "results"
UNTRAINED_MIPS = (2, 1, 0)
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder of section images (default: isbi)")
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid", default=None,
                   help="metroem pyramid to time")
    p.add_argument("--methods", nargs="+", default=None, help="baselines (default: installed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=512, help="side of the throughput pair")
    p.add_argument("--train-crop", type=int, default=256, help="training crop side at each MIP")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--no-options", action="store_true",
                   help="skip the options table (time and neighbour quality of each way to run "
                   "the pyramid; needs the shared data)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    return p


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-ups (the first calls of
    a network build oneDNN's kernels and the allocator's pools)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _metroem(pyramid: str | None) -> tuple[PyramidAligner, str]:
    path = pyramid or (str(DEFAULT_PYRAMID) if DEFAULT_PYRAMID.is_dir() else None)
    if path:
        return load_aligner(path, smoothing_nm=0), f"pyramid {path}"  # its own field
    torch.manual_seed(0)
    stages = [(m, nets.build_model(nets.default_spec())) for m in UNTRAINED_MIPS]
    return PyramidAligner(stages).eval(), "untrained default spec, MIPs 2/1/0"


def _align_fn(aligner: PyramidAligner):
    def run(src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            s = torch.from_numpy(np.asarray(src, np.float32))[None, None]
            t = torch.from_numpy(np.asarray(tgt, np.float32))[None, None]
            return aligner(s, t)[0].numpy()

    return run


def _pair(stack: torch.Tensor, size: int, z: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sections z and z-1 at ``size`` (reflect-tiled when larger than the data)."""
    def fit(a: np.ndarray) -> np.ndarray:
        h, w = a.shape
        if size > h or size > w:
            a = np.pad(a, ((0, max(0, size - h)), (0, max(0, size - w))), mode="reflect")
        return np.ascontiguousarray(a[:size, :size])

    return fit(stack[z].numpy()), fit(stack[z - 1].numpy())


def throughput(methods: dict, src, tgt, repeats: int) -> dict:
    mpix = src.size / 1e6
    out = {}
    for name, fn in methods.items():
        reps = 1 if name in baselines.OPTIONAL else repeats
        sec = _time(lambda fn=fn: baselines.align(fn, src, tgt), reps)
        out[name] = {"seconds": sec, "mpix_per_s": mpix / sec}
        print(f"  {name:16s} {sec:8.3f} s  {mpix / sec:8.3f} MP/s", flush=True)
    ref = out["metroem"]["mpix_per_s"]
    for v in out.values():
        v["ratio_to_metroem"] = v["mpix_per_s"] / ref
    return out


def training_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The stage as a recipe trains it: its weights, with :data:`nets.REFINEMENTS_OFF`."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        return model
    copy = nets.build_model(dict(spec, **nets.REFINEMENTS_OFF))
    copy.load_state_dict(model.state_dict(), strict=False)
    return copy


def train_steps(aligner: PyramidAligner, crop: int, batch: int, repeats: int, stack) -> dict:
    """Seconds per optimisation step for each stage, on real crops at the stage's own size."""
    loss_fn = losses.build_loss()
    out = {}
    for mip, stage in zip(aligner.mips, aligner.stages, strict=True):
        model = training_copy(stage).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        src = stack[1 : 1 + batch, None, :crop, :crop].clone()
        tgt = stack[0:batch, None, :crop, :crop].clone()

        def step(model=model, opt=opt, src=src, tgt=tgt):
            field = model(src, tgt)
            total, _ = loss_fn(src, tgt, field)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()

        sec = _time(step, repeats)
        model.eval()
        out[f"mip{mip}"] = {"seconds_per_step": sec, "batch": batch, "crop": crop,
                            "mpix_per_s": batch * crop * crop / 1e6 / sec}
        print(f"  stage mip{mip}: {sec:.3f} s/step (batch {batch} x {crop}^2)", flush=True)
    return out


def scaling_size(methods: dict, stack, sizes: list[int], repeats: int) -> dict:
    out: dict = {}
    for name, fn in methods.items():
        out[name] = {}
        for s in sizes:
            src, tgt = _pair(stack, s)
            sec = _time(lambda fn=fn, src=src, tgt=tgt: baselines.align(fn, src, tgt), repeats)
            out[name][str(s)] = {"seconds": sec, "mpix_per_s": s * s / 1e6 / sec}
            print(f"  {name:10s} {s:5d}^2: {sec:8.3f} s", flush=True)
    return out


def scaling_sections(aligner: PyramidAligner, stack, counts: list[int], size: int,
                     repeats: int) -> dict:
    out = {}
    for n in counts:
        if n + 1 > stack.shape[0]:
            break
        src = stack[1 : n + 1, None, :size, :size].clone()
        tgt = stack[0:n, None, :size, :size].clone()

        def sequential(src=src, tgt=tgt):
            with torch.no_grad():
                for i in range(src.shape[0]):
                    aligner(src[i : i + 1], tgt[i : i + 1])

        def batched(src=src, tgt=tgt):
            with torch.no_grad():
                aligner(src, tgt)

        seq, bat = _time(sequential, repeats), _time(batched, repeats)
        out[str(n)] = {"sequential_s": seq, "batched_s": bat, "per_section_s": seq / n}
        print(f"  {n:3d} sections: {seq:.3f} s one by one, {bat:.3f} s batched", flush=True)
    return out


class Option:
    """A way to run the pyramid: parameter-free spec changes on its finest stage (``last``) and
    on every stage (``every``), optionally with NCHW convolutions (the layout before
    channels-last)."""

    def __init__(self, label: str, every: dict | None = None, last: dict | None = None,
                 nchw: bool = False):
        self.label, self.nchw = label, nchw
        self.every, self.last = dict(every or {}), dict(last or {})

    def changes(self, stages: int) -> list[dict]:
        return [dict(self.every)] * (stages - 1) + [{**self.every, **self.last}]


# Relative to the shipped models/isbi specs (docs/inference.md explains each setting).
OPTIONS = [
    Option("shipped"),
    Option("NCHW convolutions", nchw=True),
    Option("no-data not treated as the image border", every={"nodata_aware": False}),
    Option("4 nm stage learned", last={"learned_levels": True}),
    Option("NCC sums on the level grid", every={"prior_factor": 1}),
    Option("2 passes per stage", every={"iterations": 2}),
    Option("shipped before (2 passes, level-grid NCC, 4 nm learned, NCHW, no-data as data)",
           every={"iterations": 2, "prior_factor": 1, "nodata_aware": False},
           last={"learned_levels": True}, nchw=True),
]
QUALITY_BASELINES = ["farneback", "farneback+pc"]


@contextmanager
def _conv_format(nchw: bool):
    """Networks built inside run their convolutions NCHW when ``nchw``."""
    old = nets.CONV_FORMAT
    nets.CONV_FORMAT = torch.contiguous_format if nchw else old
    try:
        yield
    finally:
        nets.CONV_FORMAT = old


def options_table(pyramid: str, options: list[Option], src, tgt, repeats: int,
                  quality_args: dict) -> dict:
    """Per option (and the Farneback baselines): seconds per pair on ``src``/``tgt`` and the
    neighbour benchmark's aggregates (``neighbours.summary``) from this run."""
    from metroem.modules import discover, pyramid_settings

    stages = len(discover(pyramid))
    nm = pyramid_settings(pyramid).get("resolution_nm", neighbours.PYRAMID_NM)
    fib_mip = max(0, round(math.log2(neighbours.FIBSEM_NM / nm)))
    out: dict = {}
    for opt in options:
        with _conv_format(opt.nchw):
            changes = opt.changes(stages)
            fns = {px: baselines.metroem_method(pyramid, input_mip=mip, spec_changes=changes,
                                                smoothing_nm=0.0)
                   for px, mip in ((neighbours.ISBI_NM, 0), (neighbours.FIBSEM_NM, fib_mip))}
            sec = _time(lambda f=fns[neighbours.ISBI_NM]: baselines.align(f, src, tgt), repeats)
            quality = neighbours.summary({opt.label: fns}, **quality_args)[opt.label]
        out[opt.label] = {"seconds": sec, "changes": changes, "nchw": opt.nchw, **quality}
        print(f"  {opt.label:40s} {sec:.3f} s", flush=True)
    for name in QUALITY_BASELINES:
        if name not in baselines.available_methods():
            continue
        fn = baselines.METHODS[name]
        sec = _time(lambda fn=fn: baselines.align(fn, src, tgt), repeats)
        out[name] = {"seconds": sec, "baseline": True,
                     **neighbours.summary({name: fn}, **quality_args)[name]}
        print(f"  {name:40s} {sec:.3f} s", flush=True)
    return out


def thread_scaling(methods: dict, src, tgt, repeats: int, threads: list[int]) -> dict:
    """Seconds per pair of each method with torch and OpenCV pinned to each thread count."""
    out: dict = {}
    before = torch.get_num_threads()
    try:
        for n in threads:
            q.set_threads(n)
            for name, fn in methods.items():
                sec = _time(lambda fn=fn: baselines.align(fn, src, tgt), repeats)
                out.setdefault(name, {})[str(n)] = sec
                print(f"  {name:12s} {n} thread(s): {sec:.3f} s", flush=True)
    finally:
        q.set_threads(before)
    return out


def _options_markdown(r: dict) -> list[str]:
    opts = r.get("options")
    if not opts:
        return []
    c = r["config"]
    fb = opts.get("farneback", {}).get("seconds")
    gaps = [g for g in next(iter(opts.values()))["fibsem"] if g != "0"]
    lines = [
        "", f"## Options: time per {c['size']}² pair and neighbour-benchmark quality", "",
        "One run: each way of running the shipped pyramid (parameter-free spec changes, "
        "`load_aligner(spec_changes=...)`) timed on the pair above and scored by "
        "`benchmarks/neighbours.py`'s measures on its held-out pairs "
        f"({c['quality']}): FIB-SEM EPE against the known answer (px, 10 nm; median over "
        "pairs of each pair's median / p95) on same-section pairs and on neighbours per gap, "
        "morph on the undeformed neighbours of the widest gap (non-affine part of a field "
        "whose truth is 0), and the ISBI equivariance EPE (4 nm px, held-out sections "
        "deformed by `mixed48`). Lower is better everywhere.", "",
        "| option | s / pair | x farneback | same | "
        + " | ".join(f"gap {g} ({10 * int(g)} nm)" for g in gaps)
        + f" | morph gap {gaps[-1]} | ISBI equiv. |",
        "|---|---:|---:|---:|" + "---:|" * len(gaps) + "---:|---:|",
    ]
    for name, v in opts.items():
        f = v["fibsem"]
        ratio = f"{v['seconds'] / fb:.2f}" if fb else "—"
        cells = [f"{f[g]['epe_median']:.2f} / {f[g]['epe_p95']:.2f}" for g in gaps]
        isbi = v.get("isbi") or {}
        eq = f"{isbi['equivariance_median']:.2f}" if isbi else "—"
        label = f"**{name}**" if name == "shipped" else name
        lines.append(f"| {label} | {v['seconds']:.3f} | {ratio} | "
                     f"{f['0']['epe_median']:.2f} | " + " | ".join(cells) +
                     f" | {f[gaps[-1]]['morph_median']:.2f} | {eq} |")
    th = r.get("threads")
    if th:
        counts = next(iter(th.values())).keys()
        lines += ["", f"## Threads: s / {c['size']}² pair, one process", "",
                  "| method | " + " | ".join(f"{n} thread{'s' if n != '1' else ''}"
                                             for n in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for m, v in th.items():
            lines.append(f"| {m} | " + " | ".join(f"{v[n]:.3f}" for n in counts) + " |")
    return lines


def markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        "# Speed benchmark",
        "",
        f"`{c['command']}` on {c['machine']}, {c['threads']} threads, torch {c['torch']}. "
        f"metroem: {c['metroem']}. Median of {c['repeats']} runs after two warm-ups "
        "(optional baselines: 1 run).",
        "",
        f"## Inference on one {c['size']}x{c['size']} pair",
        "",
        "| method | s / pair | MP/s | x metroem |",
        "|---|---:|---:|---:|",
    ]
    for m, v in sorted(r["throughput"].items(), key=lambda kv: kv[1]["seconds"]):
        lines.append(f"| {m} | {v['seconds']:.3f} | {v['mpix_per_s']:.3f} | "
                     f"{v['ratio_to_metroem']:.2f} |")
    lines += ["", "## Training step per stage", "", "| stage | batch x crop | s / step | MP/s |",
              "|---|---|---:|---:|"]
    for s, v in r["train"].items():
        lines.append(f"| {s} | {v['batch']} x {v['crop']}² | {v['seconds_per_step']:.3f} | "
                     f"{v['mpix_per_s']:.3f} |")
    sizes = next(iter(r["scaling_size"].values())).keys()
    lines += ["", "## Cost vs image size (s / pair)", "",
              "| method | " + " | ".join(f"{s}²" for s in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    for m, v in r["scaling_size"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v[s]['seconds']:.3f}" for s in sizes) + " |")
    lines += ["", f"## metroem cost vs number of sections ({c['size']}² pairs)", "",
              "| sections | one by one (s) | batched (s) | s / section |", "|---:|---:|---:|---:|"]
    for n, v in r["scaling_sections"].items():
        lines.append(f"| {n} | {v['sequential_s']:.3f} | {v['batched_s']:.3f} | "
                     f"{v['per_section_s']:.3f} |")
    lines += _options_markdown(r)
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
        f.write(text)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    q.set_threads(args.threads)
    if args.quick:
        args.size, args.repeats, args.train_crop, args.train_batch = 128, 1, 64, 1
    names = args.methods or (["identity", "dis"] if args.quick else baselines.available_methods())
    unknown = [n for n in names if n not in baselines.METHODS]
    if unknown:
        raise MetroemError(f"unknown method {unknown[0]!r}; see benchmarks/quality.py --list")
    stack = pairs.load_stack(args.data)
    aligner, desc = _metroem(args.pyramid)
    run_metroem = _align_fn(aligner)
    methods = {"metroem": run_metroem, **{n: baselines.METHODS[n] for n in names}}
    t0 = time.perf_counter()
    src, tgt = _pair(stack, args.size)
    print("inference throughput", flush=True)
    thr = throughput(methods, src, tgt, args.repeats)
    threads = sorted({1, args.threads})
    print(f"threads {threads}", flush=True)
    thread_methods = {"metroem": run_metroem}
    if "farneback" in baselines.available_methods():
        thread_methods["farneback"] = baselines.METHODS["farneback"]
    by_threads = thread_scaling(thread_methods, src, tgt, args.repeats, threads)
    options = None
    if not args.no_options and Path(desc.removeprefix("pyramid ")).is_dir():
        print("options", flush=True)
        quality_args = (dict(gaps=(1,), per_block=1, isbi=False) if args.quick
                        else dict(gaps=(1, 4), per_block=5, isbi=True))
        options = options_table(desc.removeprefix("pyramid "),
                                OPTIONS[:2] if args.quick else OPTIONS, src, tgt,
                                args.repeats, quality_args)
    print("training steps", flush=True)
    train = train_steps(aligner, args.train_crop, args.train_batch, args.repeats, stack)
    sizes = [64, 128] if args.quick else [256, 512, 1024]
    scale_methods = {"metroem": run_metroem}
    for n in ("dis", "tvl1"):
        if n in names:
            scale_methods[n] = baselines.METHODS[n]
    print("scaling with image size", flush=True)
    by_size = scaling_size(scale_methods, stack, sizes, args.repeats)
    counts = [1, 2] if args.quick else [1, 2, 4]
    print("scaling with number of sections", flush=True)
    by_n = scaling_sections(aligner, stack, counts, args.size, args.repeats)
    result = {
        "config": {
            "command": "python benchmarks/speed.py " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
            "threads": args.threads, "torch": torch.__version__, "metroem": desc,
            "repeats": args.repeats, "size": args.size,
            "quality": ("quick: FIB-SEM gap 1, 2 pairs per kind, no ISBI" if args.quick else
                        "FIB-SEM gaps 1 and 4, 10 pairs per gap and kind; ISBI 9 pairs"),
            "total_seconds": time.perf_counter() - t0,
        },
        "throughput": thr, "train": train, "scaling_size": by_size, "scaling_sections": by_n,
        "threads": by_threads, "options": options,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(result, default=float), parse_constant=lambda _: None)
    _write(out / "speed.json", json.dumps(clean, indent=1) + "\n")
    _write(out / "speed.md", markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'speed.json'} and {out / 'speed.md'}")
    return 0 if all(math.isfinite(v["seconds"]) for v in thr.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
