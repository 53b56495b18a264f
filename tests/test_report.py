"""Pictures, `metroem eval` (image pairs and file:// CloudVolumes), benchmark smoke runs."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section
from PIL import Image

from metroem import fields, viz, volumes
from metroem.eval import cli, metrics, report

REPO = Path(__file__).resolve().parents[1]
SIZE = 128


def _section(z: int) -> np.ndarray:
    return np.maximum(np.asarray(Image.open(isbi_section(z)), dtype=np.float32), 1.0)


def _shifted(z: int, dx: int, dy: int, size: int = SIZE) -> np.ndarray:
    """A crop of section z such that crop(p + (dx, dy)) = reference crop(p) (dx = dy = 0)."""
    full, y0, x0 = _section(z), 64, 64
    return full[y0 - dy : y0 - dy + size, x0 - dx : x0 - dx + size].copy()


def _const(dx: float, dy: float, size: int = SIZE) -> torch.Tensor:
    f = torch.zeros(1, 2, size, size)
    f[:, 0], f[:, 1] = dx, dy
    return f


def _png(path: Path, a: np.ndarray) -> str:
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
    return str(path)


# --- viz ---------------------------------------------------------------------------------------


def test_heatmap_ramp_nan_and_cells():
    vals = torch.tensor([[0.0, 1.0], [math.nan, 0.5]])
    rgb = viz.heatmap(vals, 0.0, 1.0, cell=3)
    assert rgb.shape == (6, 6, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == tuple(viz._RAMP[0].astype(int))
    assert tuple(rgb[0, 3]) == tuple(viz._RAMP[-1].astype(int))
    assert tuple(rgb[3, 0]) == viz.NAN_RGB
    assert (rgb[:3, :3] == rgb[0, 0]).all()  # a whole cell shares its colour


def test_line_chart_draws_each_series():
    img = viz.line_chart({"a": [1.0, 10.0, math.nan], "b": [0.1, 0.2, 0.3]}, ["x", "y", "z"],
                         title="t", log_y=True, size=(400, 300))
    assert img.shape == (300, 400, 3)
    for color in viz.CHART_COLORS[:2]:
        assert (img == np.array(color, np.uint8)).all(axis=2).sum() > 30


def test_color_wheel_hue_follows_direction():
    wheel = viz.color_wheel(65)
    right, down = wheel[32, 62].astype(int), wheel[62, 32].astype(int)
    assert right[0] > 200 and right[1] < 80  # +x: red
    assert (wheel[32, 32] > 240).all()  # no motion: white
    assert not np.array_equal(right, down)


def test_field_grid_lines_stay_connected_under_stretch():
    f = torch.zeros(2, 64, 64)
    xs = torch.arange(64, dtype=torch.float32)
    f[0] = xs * 1.5  # p + f(p) stretches x by 2.5: thin lines would break into dots
    grid = viz.field_grid(f, spacing=16)
    blue = (grid != 255).any(axis=2)
    assert blue.any(axis=1).all()  # every row meets a vertical line of the source grid


# --- pair report -------------------------------------------------------------------------------


def test_pair_report_after_alignment(tmp_path):
    tgt = torch.from_numpy(_shifted(2, 0, 0))
    src = torch.from_numpy(_shifted(2, 3, -5))
    field = _const(3, -5)
    panels = report.pair_panels(src, tgt, field, chunk=32)
    strip = panels["overlay_after"].shape[0] - SIZE
    body = panels["overlay_after"][strip + 8 : -8, 8:-8].astype(int)
    # red == green (up to each channel's own contrast stretch): aligned
    assert np.abs(body[..., 0] - body[..., 1]).max() <= 4
    before = panels["overlay_before"][strip + 8 : -8, 8:-8].astype(int)
    assert np.abs(before[..., 0] - before[..., 1]).mean() > 20
    paths = report.write_pair_report(tmp_path / "rep", src, tgt, field, name="p", gt=field)
    names = sorted(Path(p).name for p in paths)
    assert names == ["p_checkerboard.png", "p_epe.png", "p_field.png", "p_morph.png",
                     "p_overlay.png", "p_pearson.png", "p_warped.png"]
    # the warped source is drawn on the target's grey scale: aligned, the two panels agree
    warped, target = panels["warped"][strip:].astype(int), panels["target"][strip:].astype(int)
    assert np.median(np.abs(warped[8:-8, 8:-8] - target[8:-8, 8:-8])) <= 2
    # a constant field has no non-affine part: its morph grid is the regular grid
    from metroem import viz

    assert np.array_equal(panels["morph_grid"][strip:], viz.field_grid(np.zeros((2, SIZE, SIZE))))
    for p in paths:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size[0] >= SIZE
    assert sorted(x.name for x in (tmp_path / "rep").iterdir()) == names  # no temp files


def test_epe_chart_png(tmp_path):
    path = report.write_epe_chart(tmp_path / "c.png", {"m": [0.0, 2.0]}, ["easy", "hard"])
    with Image.open(path) as im:
        assert im.size == (760, 420)


def test_field_from_file_errors(tmp_path):
    from metroem.errors import MetroemError

    np.save(tmp_path / "bad.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(MetroemError, match="cannot read"):
        report.field_from_file(tmp_path / "bad.npy")
    with pytest.raises(MetroemError, match="does not exist"):
        report.field_from_file(tmp_path / "none.npy")
    torch.save(torch.ones(2, 8, 8), tmp_path / "f.pt")
    assert report.field_from_file(tmp_path / "f.pt").shape == (1, 2, 8, 8)


# --- CLI: image pairs --------------------------------------------------------------------------


def _pair_files(tmp_path):
    src = _png(tmp_path / "src.png", _shifted(2, 3, -5))
    tgt = _png(tmp_path / "tgt.png", _shifted(2, 0, 0))
    np.save(tmp_path / "f.npy", _const(3, -5)[0].numpy())
    return src, tgt, str(tmp_path / "f.npy")


def test_cli_pair_metrics_and_report(tmp_path, capsys):
    src, tgt, f = _pair_files(tmp_path)
    assert cli.main(["--src", src, "--tgt", tgt, "--field", f, "--gt", f, "--json",
                     "--report", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    m = json.loads(out[: out.rindex("}") + 1])
    assert m["epe"]["max"] == 0.0
    assert m["after"]["residual"]["ncc"] > 0.999 > m["before"]["residual"]["ncc"]
    assert m["after"]["pearson"]["mean"] > 0.99 > m["before"]["pearson"]["mean"]
    assert m["folds"]["count"] == 0
    assert (tmp_path / "rep" / "pair_overlay.png").is_file()


def test_cli_registered_pair_reports_epe_against_zero_strain_and_morph(tmp_path, capsys):
    """--registered: the truth is 0. A field with a 2 px bump in its centre quarter has a
    known size: the jump of 2 px over two pixels gives |grad f| 1 on its edges, sqrt(2) at
    its corners."""
    src, tgt, _ = _pair_files(tmp_path)
    bump = np.zeros((2, SIZE, SIZE), np.float32)
    q = SIZE // 4
    bump[0, q : 3 * q, q : 3 * q] = 2.0
    np.save(tmp_path / "bump.npy", bump)
    argv = ["--src", src, "--tgt", tgt, "--field", str(tmp_path / "bump.npy"), "--registered"]
    assert cli.main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    m = json.loads(out[: out.rindex("}") + 1])
    assert m["epe"]["max"] == pytest.approx(2.0) and m["epe"]["median"] == 0.0
    assert m["nonaffine"]["max"] > 1.0 and m["strain"]["max"] == pytest.approx(2**0.5)
    assert cli.main(argv) == 0
    assert "morph (truth 0) median" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(argv + ["--gt", str(tmp_path / "bump.npy")])
    assert "not both" in capsys.readouterr().err


def test_cli_pair_runs_the_pyramid_at_the_images_mip(tmp_path, capsys):
    """--mip is the MIP of the image pair (as for metroem align): the pyramid runs it there."""
    from metroem.eval import baselines

    size = 256
    src = _png(tmp_path / "s.png", _shifted(2, 6, -4, size))
    tgt = _png(tmp_path / "t.png", _shifted(2, 0, 0, size))
    pyramid = str(REPO / "models" / "isbi")
    means = {}
    for mip in (0, 1):
        assert cli.main(["--src", src, "--tgt", tgt, "--pyramid_path", pyramid, "--mip",
                         str(mip), "--json"]) == 0
        out = capsys.readouterr().out
        means[mip] = json.loads(out[: out.rindex("}") + 1])["mean_displacement"]
    images = [cli.read_image(p) for p in (src, tgt)]
    for mip in (0, 1):
        field = baselines.align(baselines.metroem_method(pyramid, input_mip=mip), *images)
        assert means[mip] == pytest.approx([float(v) for v in field.mean((0, 2, 3))], abs=1e-4)
    assert means[1] != pytest.approx(means[0], abs=1e-3)  # the stages differ: so do the fields


def test_cli_pair_with_baseline_method(tmp_path, capsys):
    src, tgt, _ = _pair_files(tmp_path)
    assert cli.main(["--src", src, "--tgt", tgt, "--method", "phasecorr"]) == 0
    out = capsys.readouterr().out
    dx, dy = (float(v) for v in re.search(r"field   mean \((\S+), (\S+)\) px", out).groups())
    assert dx == pytest.approx(3, abs=0.15) and dy == pytest.approx(-5, abs=0.15)
    assert "folds 0 " in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to evaluate"),
        (["--src", "{src}"], "needs both --src and --tgt"),
        (["--src", "{src}", "--tgt", "{tgt}"], "no field to evaluate"),
        (["--src", "{tmp}/missing.png", "--tgt", "{tgt}", "--field", "{f}"], "does not exist"),
        (["--src", "{src}", "--tgt", "{tgt}", "--method", "nope"], "unknown --method"),
        (["--src", "{src}", "--tgt", "{small}", "--field", "{f}"], "crop them"),
        (["--src", "{src}", "--tgt", "{tgt}", "--field", "{small_f}"], "at this resolution"),
        (["--src", "{tgt}", "--tgt", "{tgt}", "--field", "{f}", "--method", "dis"], "not both"),
        (["--src", "{src}", "--tgt", "{tgt}", "--image_path", "file://{tmp}/v"], "not both"),
        (["--image_path", "file://{tmp}/v", "--z_start", "2", "--z_end", "1"], "greater than"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    src, tgt, f = _pair_files(tmp_path)
    small = _png(tmp_path / "small.png", _shifted(2, 0, 0, size=64))
    np.save(tmp_path / "small_f.npy", np.zeros((2, 64, 64), np.float32))
    subst = {"src": src, "tgt": tgt, "f": f, "tmp": str(tmp_path), "small": small,
             "small_f": str(tmp_path / "small_f.npy")}
    with pytest.raises(SystemExit) as e:
        cli.main([a.format(**subst) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


# --- CLI: CloudVolume z range ------------------------------------------------------------------

SHIFTS = {0: (0, 0), 1: (4, -3), 2: (-5, 6)}  # observed section z = aligned z moved by this


def _volume(tmp_path) -> tuple[str, str]:
    img, fld = f"file://{tmp_path}/image", f"file://{tmp_path}/field"
    volumes.create_volume(img, (SIZE, SIZE, 3), 1, chunk_xy=64)
    volumes.create_volume(fld, (SIZE, SIZE, 3), 1, dtype="float32", num_channels=2, chunk_xy=64)
    for z, (dx, dy) in SHIFTS.items():
        volumes.write(img, 0, 0, 0, z, _shifted(z, dx, dy)[None, None])
        volumes.write(fld, 0, 0, 0, z, _const(dx, dy))
    return img, fld


def test_cli_volume_pearson_layer_and_pngs(tmp_path, capsys):
    img, fld = _volume(tmp_path)
    dst = f"file://{tmp_path}/pearson"
    rep = tmp_path / "rep"
    assert cli.main(["--image_path", img, "--z_start", "1", "--z_end", "3", "--field_path", fld,
                     "--pearson_dst", dst, "--report", str(rep), "--json", "--chunk", "32"]) == 0
    out = capsys.readouterr().out
    with_field = json.loads(out[out.index("{") : out.rindex("}") + 1])
    # The stored map is the chunked Pearson of the warped neighbours, block for block.
    stored = volumes.read(dst, 0, 0, 0, 2, SIZE // 32, SIZE // 32)[0, 0]
    a, b = (fields.warp_image(torch.from_numpy(_shifted(z, *SHIFTS[z]))[None, None],
                              _const(*SHIFTS[z]))[0, 0] for z in (2, 1))
    assert torch.allclose(stored, metrics.chunked_pearson(a, b, 32), atol=1e-6, equal_nan=True)
    info = volumes.volume_info(dst)
    assert info.resolution[0] == (4.0 * 32, 4.0 * 32, 40.0)
    # the per-section pictures, and the stack page (tests/test_eval_stack.py)
    assert sorted(p.name for p in rep.iterdir()) == [
        "index.md", "pearson_z1.png", "pearson_z2.png", "stack_xz.png", "stack_yz.png",
        "summary.json"]
    # Without the field the misaligned neighbours correlate worse (--cv_path: download's name
    # for the volume, an alias of --image_path).
    assert cli.main(["--cv_path", img, "--z_start", "1", "--z_end", "3", "--json"]) == 0
    out = capsys.readouterr().out
    raw = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert with_field["overall"]["mean"] > raw["overall"]["mean"] + 0.1


def test_cli_volume_bbox_must_match_chunks(tmp_path, capsys):
    img, _ = _volume(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["--image_path", img, "--z_start", "1", "--z_end", "2", "--bbox", "8", "0", "64",
                  "64", "--pearson_dst", f"file://{tmp_path}/p"])
    assert "multiple of --chunk" in capsys.readouterr().err


def test_cli_volume_bbox_partly_outside_is_refused(tmp_path, capsys):
    img, _ = _volume(tmp_path)
    size = volumes.volume_info(img).size[0][0]
    with pytest.raises(SystemExit) as e:
        cli.main(["--image_path", img, "--z_start", "1", "--z_end", "2", "--bbox", str(size - 32),
                  "0", "64", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "is not inside the layer" in err[-1]
    assert "Traceback" not in "\n".join(err)


# --- benchmark smoke runs ----------------------------------------------------------------------


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.needs_shared("isbi")
def test_quality_benchmark_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert _script("quality.py").main(["--quick", "--out", str(tmp_path), "--threads", "1",
                                           "--no-metroem"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "quality.json").read_text())
    table = result["table"]
    assert set(table) == {"shift8", "elastic"}
    # identity scores the deformation itself; a working method beats it by far
    for diff in table:
        assert table[diff]["dis+pc"]["epe_median"] < 0.5 < table[diff]["identity"]["epe_median"]
    assert (tmp_path / "quality.md").read_text().startswith("# Alignment quality")
    assert (tmp_path / "quality_epe.png").is_file()


@pytest.mark.slow
@pytest.mark.needs_shared("isbi", "fibsem")
def test_speed_benchmark_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert _script("speed.py").main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["throughput"]["metroem"]["ratio_to_metroem"] == pytest.approx(1.0)
    assert set(result["train"]) == {"mip2", "mip1", "mip0"}
    # the options table: each way to run the pyramid timed and scored against a known answer
    opts = result["options"]
    assert {"shipped", "NCHW convolutions"} <= set(opts)
    for v in opts.values():
        assert v["seconds"] > 0 and v["fibsem"]["1"]["epe_median"] >= 0
        if not v.get("baseline"):  # plain Farneback may miss the +-48 px drift
            assert v["fibsem"]["1"]["epe_median"] < 5
    assert opts["NCHW convolutions"]["nchw"] and not opts["shipped"]["nchw"]
    assert set(result["threads"]["metroem"]) == {"1"}
    md = (tmp_path / "speed.md").read_text()
    assert "## Options" in md and "| **shipped** |" in md


@pytest.mark.slow
def test_training_loop_benchmark_quick(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert _script("training_loop.py").main(
            ["--quick", "--out", str(tmp_path), "--threads", "1", "--workers", "0", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "training_loop.json").read_text())
    rows = result["runs"]["0"]
    assert [r["mip"] for r in rows] == [3, 2, 1]  # every demo stage trained
    for r in rows:
        assert r["steps"] == 3 and r["steps_per_s"] > 0 and 0 < r["data_share"] < 1
    assert [r["mip"] for r in result["runs"]["1"]] == [3, 2, 1]  # a second run beside it
    assert "| 0 | 0 | 3 |" in (tmp_path / "training_loop.md").read_text()
