"""``metroem ingest``: a folder of section images -> a local precomputed CloudVolume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metroem import fields, ingest, volumes
from metroem.errors import MetroemError

REPO = Path(__file__).resolve().parents[1]


def _write_sections(folder, n=5, h=70, w=90, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"s{i:03d}.png")
        arrays.append(a)
    return np.stack(arrays)


def test_ingest_writes_kept_sections_in_order_at_every_mip(tmp_path):
    stack = _write_sections(tmp_path / "imgs")
    out = tmp_path / "vol"
    m = ingest.ingest_images(str(tmp_path / "imgs"), str(out), num_mips=3, exclude=[1, 3])
    # 70x90 is cropped (centred) to a multiple of 4: 68x88.
    assert m["size"] == [88, 68] and m["crop_origin"] == [1, 1]
    assert m["sections"] == {0: "s000.png", 1: "s002.png", 2: "s004.png"}
    saved = json.loads((out / ingest.MANIFEST).read_text())
    assert saved["sections"]["1"] == "s002.png" and saved["excluded"]["3"] == "s003.png"
    url = "file://" + str(out)
    info = volumes.volume_info(url)
    assert info.size[0] == (88, 68, 3) and info.mips == (0, 1, 2)
    mip0 = volumes.read(url, 0, 0, 0, 0, 88, 68, nz=3)[:, 0].numpy()
    expected = np.maximum(stack[[0, 2, 4], 1:69, 1:89], 1)  # 0 is "no data": raised to 1
    assert np.array_equal(mip0, expected)
    mip2 = volumes.read(url, 2, 0, 0, 1, 22, 17)[0, 0].float()
    ref = fields.downsample_image(volumes.read(url, 0, 0, 0, 1, 88, 68).float(), 2)[0, 0]
    assert (mip2 - ref).abs().max() <= 1.0  # uint8 rounding of the box average


def test_ingest_refuses_to_overwrite_and_leaves_no_temp(tmp_path):
    _write_sections(tmp_path / "imgs", n=2)
    out = tmp_path / "vol"
    ingest.ingest_images(str(tmp_path / "imgs"), str(out), num_mips=1)
    with pytest.raises(MetroemError, match="--overwrite"):
        ingest.ingest_images(str(tmp_path / "imgs"), str(out), num_mips=1)
    ingest.ingest_images(str(tmp_path / "imgs"), str(out), num_mips=2, overwrite=True)
    assert volumes.volume_info("file://" + str(out)).mips == (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "vol"]


@pytest.mark.parametrize(
    "exclude, message", [("0-1", "every section"), ("7", "not a section index"),
                         ("a,b", "bad section list")]
)
def test_ingest_bad_input_is_one_line(tmp_path, exclude, message):
    _write_sections(tmp_path / "imgs", n=2)
    r = subprocess.run(
        [sys.executable, "-m", "metroem.cli", "ingest", str(tmp_path / "imgs"),
         str(tmp_path / "vol"), "--exclude", exclude],
        capture_output=True, text=True,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vol").exists()


def test_ingest_rejects_remote_and_missing_folder(tmp_path):
    with pytest.raises(MetroemError, match="local volumes only"):
        ingest.ingest_images(str(tmp_path), "gs://bucket/layer")
    with pytest.raises(MetroemError, match="does not exist"):
        ingest.ingest_images(str(tmp_path / "nope"), str(tmp_path / "vol"))


# --- issue 15: order, grey levels, colour, unreadable files (through the real command line) ---


def _ingest(*args):
    return subprocess.run([sys.executable, "-m", "metroem.cli", "ingest", *map(str, args)],
                          capture_output=True, text=True)


def _one_error(r, message, header_lines=0):
    """Exit 2 and one ``error:`` line naming ``message``, after ``header_lines`` (run header)."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 + header_lines and lines[-1].startswith("error:"), r.stderr
    assert message in lines[-1], lines[-1]
    assert "Traceback" not in r.stderr


def _left_over(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_ingest_orders_numbers_as_numbers_and_prints_the_mapping(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):  # section i is filled with value 10 + i, named without zero padding
        Image.fromarray(np.full((16, 16), 10 + i, np.uint8)).save(folder / f"{i}.png")
    r = _ingest(folder, tmp_path / "vol", "--num_mips", "1")
    assert r.returncode == 0, r.stderr
    assert "z    2 <- 2.png" in r.stdout and "z   11 <- 11.png" in r.stdout
    assert "<- 6.png" not in r.stdout  # only the first and last three mappings are printed
    url = "file://" + str(tmp_path / "vol")
    got = volumes.read(url, 0, 0, 0, 0, 16, 16, nz=12)[:, 0, 0, 0].tolist()
    assert got == [10 + i for i in range(12)]  # string order would put 10.png at z = 2


@pytest.mark.parametrize("names, message", [
    (["a1.png", "b01.png"], "both carry section number 1"),
    (["s0.png", "s1.png", "overview.png"], "overview.png in"),
    (["s0.png", "s1.tif"], "mixes image types"),
])
def test_ingest_refuses_an_ambiguous_order(tmp_path, names, message):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in names:
        Image.fromarray(np.full((8, 8), 5, np.uint8)).save(folder / n)
    _one_error(_ingest(folder, tmp_path / "vol"), message)
    assert not (tmp_path / "vol").exists() and _left_over(tmp_path) == []


def test_ingest_keeps_16_bit_grey_levels_or_rescales_on_request(tmp_path):
    import tifffile

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    stack = rng.integers(1000, 60000, (3, 32, 32), dtype=np.uint16)
    for i, a in enumerate(stack):
        tifffile.imwrite(folder / f"sec{i}.tif", a)
    r = _ingest(folder, tmp_path / "vol16", "--num_mips", "2")
    assert r.returncode == 0, r.stderr
    assert "grey levels kept: uint16 layer" in r.stdout
    url = "file://" + str(tmp_path / "vol16")
    assert volumes.volume_info(url).dtype == "uint16"
    got = volumes.read(url, 0, 0, 0, 0, 32, 32, nz=3)[:, 0].numpy()
    assert np.array_equal(got, stack)  # every grey level survives (was: 2 distinct values)
    r = _ingest(folder, tmp_path / "vol8", "--num_mips", "1", "--dtype", "uint8")
    assert r.returncode == 0, r.stderr
    assert "rescaled: uint16 sections -> uint8 layer, 0.5-99.5 percentile range" in r.stdout
    got8 = volumes.read("file://" + str(tmp_path / "vol8"), 0, 0, 0, 0, 32, 32, nz=3).numpy()
    assert len(np.unique(got8)) > 200 and got8.min() >= 1
    # the order of grey levels is kept: brighter in, brighter out
    assert np.corrcoef(got8.ravel().astype(float), stack.ravel().astype(float))[0, 1] > 0.99


def test_ingest_keeps_float_sections(tmp_path):
    import tifffile

    folder = tmp_path / "imgs"
    folder.mkdir()
    stack = np.random.default_rng(1).random((2, 16, 16), dtype=np.float32) + 0.5
    for i, a in enumerate(stack):
        tifffile.imwrite(folder / f"{i}.tif", a)
    r = _ingest(folder, tmp_path / "vol", "--num_mips", "1")
    assert r.returncode == 0, r.stderr
    url = "file://" + str(tmp_path / "vol")
    assert volumes.volume_info(url).dtype == "float32"
    assert np.array_equal(volumes.read(url, 0, 0, 0, 0, 16, 16, nz=2)[:, 0].numpy(), stack)


def test_ingest_and_align_agree_on_colour(tmp_path):
    """Grey stored as RGB is accepted by both commands; a real colour image by neither."""
    grey = np.random.default_rng(2).integers(1, 255, (64, 64), dtype=np.uint8)
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    ok.mkdir(), bad.mkdir()
    for i in range(2):
        Image.fromarray(np.stack([grey] * 3, -1)).save(ok / f"{i}.png")
    colour = np.stack([grey, grey // 2, grey], -1)
    Image.fromarray(np.stack([grey] * 3, -1)).save(bad / "0.png")
    Image.fromarray(colour).save(bad / "1.png")
    r = _ingest(ok, tmp_path / "vol", "--num_mips", "1")
    assert r.returncode == 0, r.stderr
    got = volumes.read("file://" + str(tmp_path / "vol"), 0, 0, 0, 0, 64, 64)[0, 0].numpy()
    assert np.array_equal(got, grey)
    _one_error(_ingest(bad, tmp_path / "vol2"), "1.png is a colour image")
    r = subprocess.run([sys.executable, "-m", "metroem.cli", "align", "--pyramid_path",
                        "models/demo", "--src", str(bad / "1.png"), "--tgt", str(bad / "0.png"),
                        "--field_out", str(tmp_path / "f.npy"), "--no_progress"],
                       capture_output=True, text=True, cwd=str(REPO))
    _one_error(r, "1.png is a colour image", header_lines=1)


@pytest.mark.parametrize("content", ["truncated", "text"])
def test_ingest_names_an_unreadable_image_in_one_line(tmp_path, content):
    folder = tmp_path / "imgs"
    _write_sections(folder, n=3)
    bad = folder / "s001.png"
    if content == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_text("not an image\n")
    _one_error(_ingest(folder, tmp_path / "vol"), "cannot read")
    r = _ingest(folder, tmp_path / "vol")
    assert "s001.png" in r.stderr
    assert not (tmp_path / "vol").exists() and _left_over(tmp_path) == []


def test_align_refuses_a_float_source_as_png_before_writing(tmp_path):
    import tifffile

    a = np.random.default_rng(3).random((64, 64), dtype=np.float32) + 0.5
    tifffile.imwrite(tmp_path / "s.tif", a)
    tifffile.imwrite(tmp_path / "t.tif", a)
    r = subprocess.run([sys.executable, "-m", "metroem.cli", "align", "--pyramid_path",
                        "models/demo", "--src", str(tmp_path / "s.tif"), "--tgt",
                        str(tmp_path / "t.tif"), "--image_out", str(tmp_path / "x.png"),
                        "--no_progress"], capture_output=True, text=True, cwd=str(REPO))
    _one_error(r, "PNG holds 8/16-bit images", header_lines=1)
    assert ".tif or .npy" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif", "t.tif"]  # no .partial
