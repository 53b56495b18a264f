"""A real ssTEM stack, misaligned section by section and aligned with the README's stack command.

The 30 ISBI sections (4 nm px, 50 nm apart) are registered to start with. Every section but
the first is deformed as in ``benchmarks/stack.py`` (a drift random walk of +-5 px per section
and axis, rotation, scale, shear, elastic), written to a local CloudVolume, aligned with
``metroem align --pyramid_path <pyramid> --src_path ... --z_start 1 --z_end 30 --field_path
... --image_path ...`` and looked at with ``metroem eval --src_path ... --image_path ... --report``
(xz / yz reslices before and after, residual between consecutive sections along z). Since the
deformation is known, the aligned fields are also scored against it (median px, worst
section): on real ssTEM the truth is only as good as the ISBI registration, so read it next to
the reslices.

``--placement independent`` gives each section an offset of its own instead of a drift random
walk (sections imaged one by one, as ssTEM sections are: the raw stack has no drift), and
``--detrend_sections S`` is passed to ``metroem align`` (the trend of the aligned stack's
placement along z removed, :mod:`metroem.detrend`).

Writes ``<out>/isbi_stack[_reg<L>nm][_independent][_detrend<S>].{json,md}`` and the reslices
``<out>/png/isbi_stack[...]_{xz,yz}.png``.
The ISBI sections include the pyramid's training sections: this is a picture of the command
on real EM, not a held-out score (``benchmarks/stack.py`` is that).

    python benchmarks/isbi_stack.py            # about 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402

from metroem import inference, volumes  # noqa: E402
from metroem.errors import cli_errors  # noqa: E402
from metroem.eval import cli as eval_cli  # noqa: E402
from metroem.eval import pairs, stacks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the shared data beside the checkout, unless $METROEM_SHARED_DATA names another folder
os.environ.setdefault("METROEM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isbi", default=None,
                   help=f"ISBI sections (default {pairs.default_data_dir()})")
    p.add_argument("--pyramid_path", "--pyramid", dest="pyramid",
                   default=str(REPO / "models" / "isbi"), help="the pyramid to align with")
    p.add_argument("--smoothing_nm", type=float, default=None,
                   help="passed to metroem align (default: the pyramid's pyramid.json)")
    p.add_argument("--chunk", type=int, default=512, help="--chunk of metroem align")
    p.add_argument("--placement", choices=stacks.PLACEMENTS, default="walk",
                   help="how the sections are misplaced: a drift random walk (default) or an "
                   "offset of their own each (sections imaged one by one, as ssTEM is)")
    p.add_argument("--detrend_sections", type=float, default=None,
                   help="passed to metroem align (default: off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--seed", type=int, default=0)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    q.set_threads(a.threads)
    sections = pairs.load_stack(a.isbi)  # (Z, H, W) float
    block = sections.float()
    n = block.shape[0]
    known = stacks.make_stack(block, "isbi", 0, sections=n, gap=1, seed=a.seed,
                              placement=a.placement)
    work = Path(tempfile.mkdtemp(prefix="metroem_isbi_stack_"))
    try:
        raw = volumes.normalize_path(str(work / "image"))
        h, w = known.sections[0].shape[-2:]
        volumes.create_volume(raw, (w, h, n), num_mips=3, resolution=(4, 4, 50), chunk_xy=256)
        for z, s in enumerate(known.sections):
            volumes.write_all_mips(raw, 0, 0, z, s.round().clamp(0, 255).to(torch.uint8))
        field, aligned = (volumes.normalize_path(str(work / k)) for k in ("field", "aligned"))
        cmd = ["--pyramid_path", a.pyramid, "--src_path", raw, "--z_start", "1", "--z_end", str(n),
               "--field_path", field, "--image_path", aligned, "--chunk", str(a.chunk),
               "--no_progress"]
        if a.smoothing_nm is not None:
            cmd += ["--smoothing_nm", str(a.smoothing_nm)]
        if a.detrend_sections is not None:
            cmd += ["--detrend_sections", str(a.detrend_sections)]
        t0 = time.perf_counter()
        inference.main(cmd)
        seconds = time.perf_counter() - t0
        whole = [volumes.read(field, 0, 0, 0, z, w, h).float() for z in range(n)]
        score = stacks.stack_errors(known, whole)
        report = work / "report"
        eval_cli.main(["--src_path", raw, "--image_path", aligned, "--z_start", "0", "--z_end",
                       str(n), "--mip", "1", "--report", str(report)])
        out = Path(a.out)
        stem = "isbi_stack" + (f"_reg{a.smoothing_nm:g}nm" if a.smoothing_nm else "") + (
            f"_{a.placement}" if a.placement != "walk" else "") + (
            f"_detrend{a.detrend_sections:g}" if a.detrend_sections else "")
        (out / "png").mkdir(parents=True, exist_ok=True)
        for k in ("xz", "yz"):
            shutil.copyfile(report / f"stack_{k}.png", out / "png" / f"{stem}_{k}.png")
        import json

        summary = json.loads((report / "summary.json").read_text())
        shown = ["--pyramid_path", Path(a.pyramid).name, "--src_path", "RAW", "--z_start", "1",
                 "--z_end", str(n), "..."]
        shown += ["--smoothing_nm", f"{a.smoothing_nm:g}"] if a.smoothing_nm else []
        shown += ["--detrend_sections", f"{a.detrend_sections:g}"] if a.detrend_sections else []
        result = {"command": "metroem align " + " ".join(shown), "placement": a.placement,
                  "sections": n, "seconds": seconds, "errors": score,
                  "unaligned": stacks.raw_errors(known), "stack_view": summary.get("stack")}
        text = "\n".join([
            "# A real ssTEM stack aligned with the stack command",
            "",
            f"ISBI 2012, {n} sections of {w}x{h} px (4 nm, 50 nm apart), each but the first "
            "misaligned as in `benchmarks/stack.py` ("
            + ("a drift random walk" if a.placement == "walk" else
               "an offset of its own, no drift") +
            f"), aligned with `{result['command']}` "
            f"({seconds:.0f} s on {a.threads} threads) using `{Path(a.pyramid).name}`.",
            "",
            "| | median px | worst section px | worst 64px block px | slope px/section |",
            "|---|---|---|---|---|",
            *[f"| {k} | {v['median']:.2f} | {v['worst_section']:.2f} | {v['worst_block']:.2f} | "
              f"{v['slope']:.3f} |" for k, v in (("unaligned", result["unaligned"]),
                                                  ("aligned", score))],
            "",
            f"Reslices (raw above, aligned below): `png/{stem}_xz.png`, `png/{stem}_yz.png`.",
            "",
        ])
        q.write_results(out, stem, result, text)
        print(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
