"""`metroem eval` on a CloudVolume z range: reslices before/after, consecutive residuals, trend.

The stacks are tilted stripes: two sinusoidal stripe sets whose phase moves with z, so a
reslice shows slanted, continuous lines when the stack is aligned. The raw layer is the aligned
one with a random shift per section.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from metroem import viz, volumes
from metroem.eval import cli, stackview

SIZE, NZ = 64, 8
RNG_SHIFTS = np.random.default_rng(14).integers(3, 9, size=(NZ, 2)) * np.random.default_rng(
    15).choice([-1, 1], size=(NZ, 2))


def _stripes(z: int, dx: float = 0.0, dy: float = 0.0, size: int = SIZE) -> np.ndarray:
    """Section z of the stripe stack, sampled at p + (dx, dy); values 38..218 (never 0)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = xx + dx, yy + dy
    a = np.sin(2 * np.pi * (x + 0.4 * y + 0.5 * z) / 24)
    b = np.sin(2 * np.pi * (0.3 * x - y + 0.4 * z) / 37)
    return (128 + 50 * a + 40 * b).astype(np.float32)


def _layer(path: str, sections: list[np.ndarray], z0: int = 0, size: int = SIZE) -> str:
    volumes.create_volume(path, (size, size, len(sections)), 1, offset_xyz=(0, 0, z0),
                          chunk_xy=32)
    for i, s in enumerate(sections):
        volumes.write(path, 0, 0, 0, z0 + i, s[None, None])
    return path


def _stacks(tmp_path, z0: int = 0) -> tuple[str, str, list[np.ndarray]]:
    """(raw layer, aligned layer, aligned sections as stored) with sections z0..z0+NZ-1."""
    aligned = [_stripes(z) for z in range(NZ)]
    raw = [aligned[0]] + [_stripes(z, *RNG_SHIFTS[z]) for z in range(1, NZ)]
    src = _layer(f"file://{tmp_path}/raw", raw, z0)
    dst = _layer(f"file://{tmp_path}/aligned", aligned, z0)
    return src, dst, [np.rint(a).astype(np.float32) for a in aligned]


def _json(out: str) -> dict:
    return json.loads(out[out.index("{") : out.rindex("}") + 1])


def _strip() -> int:
    """Height of the title strip viz.titled puts above a panel."""
    return viz.titled(np.zeros((1, 1, 3), np.uint8), "t").shape[0] - 1


def test_reslices_and_residuals_before_after(tmp_path, capsys):
    src, aligned, sections = _stacks(tmp_path)
    rep = tmp_path / "rep"
    assert cli.main(["--src_path", src, "--image_path", aligned, "--z_start", "1",
                     "--z_end", str(NZ), "--report", str(rep), "--json"]) == 0
    out = capsys.readouterr().out
    stack = _json(out)["stack"]
    cons = stack["consecutive"]
    # z 1 is compared with z 0 (inside the layer); 7 sections are drawn.
    assert [p["z"] for p in cons["after"]["pairs"]] == list(range(1, NZ))
    assert stack["z_range"] == [1, NZ]
    assert stack["box"] == {"mip": 0, "x0": 0, "y0": 0, "width": SIZE, "height": SIZE}
    before, after = cons["before"]["median"], cons["after"]["median"]
    assert after["one_minus_r"] < 0.1 < before["one_minus_r"]
    assert after["mad"] < before["mad"] / 2
    for p_before, p_after in zip(cons["before"]["pairs"], cons["after"]["pairs"], strict=True):
        assert p_after["one_minus_r"] < p_before["one_minus_r"]
        assert p_after["pixels"] == SIZE * SIZE
    # 64 px wide: magnified 8x; 4 x 4 x 40 nm: each section 10 x 8 px tall; before above
    # after, 4 px apart.
    scale = {"zoom": 8, "px_per_section": 80}
    assert stack["reslices"]["scale"] == {"xz": scale, "yz": scale}
    assert (stack["reslices"]["y"], stack["reslices"]["x"]) == (SIZE // 2, SIZE // 2)
    for plane in ("xz", "yz"):
        with Image.open(rep / f"stack_{plane}.png") as im:
            assert im.size == (SIZE * 8, 2 * (_strip() + (NZ - 1) * 80) + 4)
    assert sorted(p.name for p in rep.iterdir()) == sorted(
        [f"pearson_z{z}.png" for z in range(1, NZ)]
        + ["index.md", "stack_xz.png", "stack_yz.png", "summary.json"])
    page = (rep / "index.md").read_text()
    assert "![xz reslice at y 32](stack_xz.png)" in page and "(pearson_z3.png)" in page
    assert "MIP 0, box x 0..63, y 0..63" in page
    saved = json.loads((rep / "summary.json").read_text())
    assert saved["consecutive"]["after"]["median"] == pytest.approx(after)
    assert saved["reslices"]["pictures"] == {"xz": "stack_xz.png", "yz": "stack_yz.png"}
    assert "stack before: consecutive 1 - r median" in out


def test_reslice_shows_the_chosen_row_and_column(tmp_path, capsys):
    _, aligned, sections = _stacks(tmp_path)
    rep = tmp_path / "rep"
    assert cli.main(["--image_path", aligned, "--z_start", "0", "--z_end", str(NZ), "--report",
                     str(rep), "--reslice_y", "10", "--reslice_x", "50",
                     "--reslice_z_scale", "3"]) == 0
    out = capsys.readouterr().out
    assert "first section of the layer" in out
    vol = torch.from_numpy(np.stack(sections)).double()  # (z, y, x)
    # each section z-normalised over the whole section
    vol = (vol - vol.mean((1, 2), keepdim=True)) / vol.std((1, 2), keepdim=True, correction=0)

    def drawn(lines: torch.Tensor) -> np.ndarray:
        return stackview.gray_lines(lines.repeat_interleave(3, 0).repeat_interleave(8, 1))

    for plane, expected in (("xz", vol[:, 10, :]), ("yz", vol[:, :, 50])):
        with Image.open(rep / f"stack_{plane}.png") as im:
            png = np.asarray(im.convert("RGB"))
        # no raw layer given: only the "after" panel, each section 3 rows tall, x zoom 8
        assert png.shape == (_strip() + NZ * 3, SIZE * 8, 3)
        assert np.abs(png[_strip() :].astype(int) - drawn(expected)).max() <= 1
    # half a stripe period away the column looks different
    assert np.abs(png[_strip() :].astype(int) - drawn(vol[:, :, 38])).mean() > 50


@pytest.mark.parametrize("direction", [1, -1])
def test_trend_slope_follows_a_drift(tmp_path, capsys, direction):
    """Consecutive sections move by 0.5 px x k more and more (or less and less): 1 - r and the
    MAD grow (shrink) along z; the stack starts at its layer's first section (z 3)."""
    steps = [0.5 * (k if direction > 0 else NZ - k) for k in range(NZ)]
    offsets = np.cumsum(steps)
    sections = [_stripes(0, dx=o, dy=0.3 * o) for o in offsets]
    path = _layer(f"file://{tmp_path}/drift", sections, z0=3)
    assert cli.main(["--image_path", path, "--z_start", "3", "--z_end", str(3 + NZ), "--json",
                     "--report", str(tmp_path / "rep")]) == 0
    stack = _json(capsys.readouterr().out)["stack"]
    after = stack["consecutive"]["after"]
    assert list(stack["consecutive"]) == ["after"]
    assert [p["z"] for p in after["pairs"]] == list(range(4, 3 + NZ))
    for measure in stackview.MEASURES:
        t = after["trend"][measure]
        assert t["slope_per_section"] * direction > 0
        assert (t["last"] - t["first"]) * direction > 0
        assert (t["first_z"], t["last_z"]) == (4, 2 + NZ)
    with Image.open(tmp_path / "rep" / "stack_xz.png") as im:
        assert im.size == (SIZE * 8, _strip() + NZ * 80)


def test_one_section_at_the_layer_start(tmp_path, capsys):
    """A range of only the layer's first section: nothing to compare, a one-section reslice."""
    path = _layer(f"file://{tmp_path}/one", [_stripes(z) for z in range(3)], z0=5)
    rep = tmp_path / "rep"
    assert cli.main(["--image_path", path, "--z_start", "5", "--z_end", "6", "--json",
                     "--report", str(rep)]) == 0
    stack = _json(capsys.readouterr().out)["stack"]
    assert stack["consecutive"] == {} and stack["z_range"] == [5, 6]
    assert "No two consecutive sections" in (rep / "index.md").read_text()
    with Image.open(rep / "stack_yz.png") as im:
        assert im.size == (SIZE * 8, _strip() + 80)


def test_field_path_gives_before_and_after_of_one_layer(tmp_path, capsys):
    """With --field_path the raw layer is --image_path itself, before warping."""
    raw = [_stripes(z, *(RNG_SHIFTS[z] if z else (0, 0))) for z in range(NZ)]
    img = _layer(f"file://{tmp_path}/raw", raw)
    fld = f"file://{tmp_path}/field"
    volumes.create_volume(fld, (SIZE, SIZE, NZ), 1, dtype="float32", num_channels=2,
                          chunk_xy=32)
    for z in range(NZ):
        f = torch.zeros(1, 2, SIZE, SIZE)
        # raw(p) = aligned(p + shift), so warping by -shift aligns it
        f[:, 0], f[:, 1] = (-float(v) for v in (RNG_SHIFTS[z] if z else (0, 0)))
        volumes.write(fld, 0, 0, 0, z, f)
    assert cli.main(["--image_path", img, "--field_path", fld, "--z_start", "1", "--z_end",
                     str(NZ), "--json"]) == 0
    stack = _json(capsys.readouterr().out)["stack"]
    assert stack["layers"] == {"before": img, "after": img}
    med = {k: v["median"]["one_minus_r"] for k, v in stack["consecutive"].items()}
    assert med["after"] < 0.1 < med["before"]


def test_section_residual_and_trend_units():
    a = torch.full((8, 8), 10.0)
    a[:, :4] = 20.0
    b = a + 3.0
    b[0, 0] = 0.0  # no data: not counted
    r = stackview.section_residual(a, b)
    assert r == {"mad": 3.0, "one_minus_r": pytest.approx(0.0, abs=1e-12), "pixels": 63}
    assert math.isnan(stackview.section_residual(a, torch.zeros(8, 8))["mad"])
    t = stackview.linear_trend([1, 2, 3, 4], [0.5, float("nan"), 1.5, 2.0])
    assert t["slope_per_section"] == pytest.approx(0.5)
    assert (t["first"], t["last"], t["pairs"]) == (0.5, 2.0, 3)
    assert stackview.reslice_scale(40, 4, 8, 512) == {"zoom": 1, "px_per_section": 10}
    assert stackview.reslice_scale(40, 1, 8, 600)["px_per_section"] == stackview.Z_REPEAT_MAX
    assert stackview.reslice_scale(40, 4, 1000, 512)["px_per_section"] == 4
    assert stackview.reslice_scale(10, 10, 5, 512)["px_per_section"] == 1
    assert stackview.reslice_scale(40, 16, 30, 128) == {"zoom": 4, "px_per_section": 10}
    assert stackview.reslice_scale(40, 4, 8, 10, px_per_section=3) == {
        "zoom": stackview.MAX_ZOOM, "px_per_section": 3}
    lines = stackview.gray_lines(torch.tensor([[0.0, 1.0, math.nan]]))
    assert lines[0, :, 0].tolist() == [0, 255, 0]  # stretched; NaN (no data) black


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image_path", "{aligned}", "--z_start", "1", "--z_end", "20"], "outside --image_path"),
        (["--image_path", "{aligned}", "--src_path", "{off}", "--z_start", "1", "--z_end", "4"],
         "outside --src_path"),
        (["--image_path", "{aligned}", "--src_path", "file://{tmp}/none", "--z_start", "1",
          "--z_end", "4"], "--src_path: no CloudVolume"),
        (["--image_path", "file://{tmp}/none", "--z_start", "1", "--z_end", "4"],
         "--image_path: no CloudVolume"),
        (["--image_path", "{aligned}", "--src_path", "{small}", "--z_start", "1", "--z_end", "4"],
         "one section size"),
        (["--image_path", "{aligned}", "--z_start", "1", "--z_end", "4", "--reslice_y", "64"],
         "--reslice_y 64 is outside"),
        (["--image_path", "{aligned}", "--z_start", "1", "--z_end", "4", "--reslice_z_scale",
          "0"], "--reslice_z_scale"),
        (["--image_path", "{aligned}", "--src_path", "{raw}", "--z_start", "1", "--z_end", "4",
          "--method", "phasecorr"], "do not go with --pyramid_path/--method"),
        (["--image_path", "{aligned}", "--z_start", "1", "--z_end", "4", "--reslice_x", "3",
          "--method", "phasecorr"], "do not go with --pyramid_path/--method"),
        (["--src_path", "{raw}", "--z_start", "1", "--z_end", "4"], "pass the aligned layer"),
    ],
)
def test_bad_stack_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    raw, aligned, _ = _stacks(tmp_path)
    off = _layer(f"file://{tmp_path}/off", [_stripes(z) for z in range(3)], z0=2)
    small = _layer(f"file://{tmp_path}/small", [_stripes(z, size=48) for z in range(NZ)],
                   size=48)
    subst = {"raw": raw, "aligned": aligned, "off": off, "small": small, "tmp": str(tmp_path)}
    rep = tmp_path / "rep"
    with pytest.raises(SystemExit) as e:
        cli.main([a.format(**subst) for a in argv] + ["--report", str(rep)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not rep.exists()
