"""corgie runs the shipped module folders as processors, given only ``{"path": <folder>}``.

Skipped unless corgie is installed. corgie 0.1.1 pins click 7, so it lives in its own virtual
environment: ``make corgie-check`` builds it (``.venv-corgie``) and runs this file.

A 3-section stack is cut from one procedural EM volume with known shifts per section, written
as a local CloudVolume with MIPs 0-3; ``models/demo`` (stages at MIP 3, 2, 1) aligns it through
corgie's own CLI in a subprocess (local execution, no queue), and the fields corgie writes are
compared with the shifts.

corgie's tensors are ``(z, c, x, y)`` (CloudVolume's x first), so in a field layer *corgie*
writes, channel 0 is the displacement along CloudVolume y and channel 1 along x: the reverse of
the field layers ``metroem align`` writes (``metroem.volumes``: channel 0 is x).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("corgie", reason="corgie is not installed (make corgie-check)")

from metroem import modules, volumes  # noqa: E402
from metroem.demo_volume import procedural_stack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 512  # MIP0 pixels; the finest demo stage runs at MIP 1 (256 x 256)
MARGIN = 16
# Section z of the raw stack is the true section z moved by SHIFTS[z] MIP0 pixels (dx, dy):
# raw_z(x, y) = true_z(x + dx, y + dy). Section 0 is corgie's fixed reference.
SHIFTS = [(0, 0), (8, -6), (-4, 6)]
MIP = 1  # the finest processor MIP: where align-block renders and fields are checked
INNER = slice(24, -24)  # MIP1 pixels away from the border (no-data strips of the shifted crop)
# MIP1 pixels; the demo pyramid gets within 0.3 px of these shifts, while swapped channels, a
# wrong sign or fields in another MIP's pixels are off by 1 px or more
TOL = 0.75


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("corgie")
    true = procedural_stack(len(SHIFTS), SIZE + 2 * MARGIN, SIZE + 2 * MARGIN, seed=1)
    raw_path, true_path = f"file://{root}/raw", f"file://{root}/true"
    for path in (raw_path, true_path):
        volumes.create_volume(path, (SIZE, SIZE, len(SHIFTS)), num_mips=4, chunk_xy=64)
    for z, (dx, dy) in enumerate(SHIFTS):
        section = true[z : z + 1]
        y0, x0 = MARGIN + dy, MARGIN + dx
        volumes.write_all_mips(raw_path, 0, 0, z, section[..., y0 : y0 + SIZE, x0 : x0 + SIZE])
        volumes.write_all_mips(true_path, 0, 0, z, section[..., MARGIN:-MARGIN, MARGIN:-MARGIN])
    return root, raw_path, true_path


def processor_args(last: dict | None = None) -> list[str]:
    """One ``--processor_spec`` per module of models/demo, coarse to fine, with no params but
    the folder (and ``last`` on the finest), and ``--processor_mip`` = the module's IN_MIP
    (``<STAGE>_mip<IN_MIP>in_*``)."""
    out = []
    mods = modules.discover(REPO / "models" / "demo")
    for m in mods:
        params = {"path": str(m.path), **(last or {} if m is mods[-1] else {})}
        spec = {"ApplyModel": {"params": params}}
        out += ["--processor_spec", json.dumps(spec), "--processor_mip", str(m.mip)]
    assert [int(a) for a in out[3::4]] == [3, 2, 1]
    return out


def run_corgie(root: Path, *args: str) -> None:
    """``corgie <args>`` in a fresh interpreter (this one), with a private HOME: modelhouse and
    mazepa keep their temporary copies and job checkpoints under ``~``."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", "from corgie.main import cli; cli()", *args]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]


def read(path: str, nz: int = len(SHIFTS)) -> torch.Tensor:
    return volumes.read(path, MIP, 0, 0, 0, SIZE >> MIP, nz=nz).float()


def median_field(field: torch.Tensor) -> torch.Tensor:
    """Median over the inner pixels, as (dx, dy) in CloudVolume axes (corgie's channels are
    (y, x), see the module doc)."""
    return field[:, INNER, INNER].flatten(1).median(1).values.flip(0)


def expected(src_z: int, tgt_z: int) -> torch.Tensor:
    """The field (dx, dy) in MIP1 pixels that aligns raw section src_z onto raw section tgt_z:
    raw_src(p + f) = true_src(p + f + t_src) should sit where raw_tgt has true_tgt(p + t_tgt)."""
    return (torch.tensor(SHIFTS[tgt_z]) - torch.tensor(SHIFTS[src_z])).float() / 2**MIP


def test_align_block_with_module_folders(stack):
    """``corgie align-block`` on the raw stack: section 0 is copied, sections 1 and 2 are
    aligned serially onto the aligned previous section, so their fields undo their shifts and
    the rendered sections match the true ones (section 0 unshifted) far better than raw ones."""
    root, raw_path, true_path = stack
    dst = f"file://{root}/aligned"
    run_corgie(
        root, "align-block",
        "--src_layer_spec", json.dumps({"path": raw_path, "name": "img", "type": "img"}),
        "--dst_folder", dst, "--start_coord", "0, 0, 0",
        "--end_coord", f"{SIZE}, {SIZE}, {len(SHIFTS)}",
        "--chunk_xy", "128", "--pad", "64", "--render_chunk_xy", "128", "--render_pad", "32",
        *processor_args(),
    )
    raw, true = read(raw_path), read(true_path)
    aligned = read(f"{dst}/img/img_aligned")
    field = volumes.read(f"{dst}/field/field_aligned", MIP, 0, 0, 0, SIZE >> MIP, nz=3)
    assert torch.equal(aligned[0], raw[0])  # the block's first section is copied
    assert field[0].abs().max() == 0
    for z in (1, 2):
        got, want = median_field(field[z]), expected(z, 0)
        assert (got - want).abs().max() < TOL, (z, got.tolist(), want.tolist())
        inner = (..., INNER, INNER)
        err_raw = (raw[z] - true[z])[inner].abs().mean()
        err_aligned = (aligned[z] - true[z])[inner].abs().mean()
        # (the grain is fine: a 0.25 px shift alone costs ~8 grey levels here, raw is ~40)
        assert err_aligned < 0.6 * err_raw, (z, err_aligned.item(), err_raw.item())
        # and the aligned stack is smoother in z than the raw one
        step_raw = (raw[z] - raw[z - 1])[inner].abs().mean()
        step_aligned = (aligned[z] - aligned[z - 1])[inner].abs().mean()
        assert step_aligned < 0.7 * step_raw, (z, step_aligned.item(), step_raw.item())


def compute_field(stack, name: str, pad: int, last: dict | None = None) -> torch.Tensor:
    """``corgie compute-field`` of raw z onto raw z+1 (its default ``--tgt_z_offset``; corgie
    0.1.1 types that option as a string, so any explicit value crashes in its own arithmetic)."""
    root, raw_path, _ = stack
    dst = f"file://{root}/{name}"
    run_corgie(
        root, "compute-field",
        "--src_layer_spec", json.dumps({"path": raw_path}),
        "--dst_layer_spec", json.dumps({"path": dst, "type": "field"}),
        "--start_coord", "0, 0, 0", "--end_coord", f"{SIZE}, {SIZE}, 2",
        "--chunk_xy", "128", "--pad", str(pad),
        *processor_args(last),
    )
    return volumes.read(dst, MIP, 0, 0, 0, SIZE >> MIP, nz=2)


@pytest.fixture(scope="module")
def raw_field(stack) -> torch.Tensor:
    return compute_field(stack, "cf_field", 64)


def test_compute_field_with_module_folders(raw_field):
    for z in (0, 1):
        got, want = median_field(raw_field[z]), expected(z, z + 1)
        assert (got - want).abs().max() < TOL, (z, got.tolist(), want.tolist())


def curvature(field: torch.Tensor) -> float:
    """Median |second difference| of the field over the inner pixels (px per px^2): what a
    local affine fit removes and a shift or a gentle stretch does not have."""
    inner = field[:, :, INNER, INNER]
    both = (inner.diff(n=2, dim=-1).abs().flatten(), inner.diff(n=2, dim=-2).abs().flatten())
    return float(torch.cat(both).median())


def test_compute_field_with_smoothing_on_the_last_processor(stack, raw_field):
    """Processor params ``smoothing_nm`` / ``pixel_nm`` reach metroem through corgie, modelhouse
    and the folder's create.py: the field keeps the shifts and loses its fine part."""
    from metroem.corgie import smoothing_pad_px

    pad = smoothing_pad_px(160, 8, gated=False) + 64
    smoothed = compute_field(stack, "cf_smoothed", pad,
                             {"smoothing_nm": 160, "pixel_nm": 8, "smoothing_gate": "off"})
    for z in (0, 1):
        got, want = median_field(smoothed[z]), expected(z, z + 1)
        assert (got - want).abs().max() < TOL, (z, got.tolist(), want.tolist())
    assert (smoothed - raw_field)[..., INNER, INNER].abs().max() > 0.05  # it did something
    assert curvature(smoothed) < 0.5 * curvature(raw_field), (curvature(smoothed),
                                                              curvature(raw_field))
