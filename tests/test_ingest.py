"""``metroem ingest``: a folder of section images -> a local precomputed CloudVolume."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metroem import fields, ingest, volumes
from metroem.errors import MetroemError


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
