"""Demo volume builder (metroem/demo_volume.py): layers, exact ground truth, EM-like stack, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section

from metroem import demo_volume, fields, images, volumes
from metroem.errors import MetroemError

SIZE, NZ, MIPS, MARGIN = 256, 4, 3, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster (and fair to a shared CPU); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> demo_volume.DemoVolume:
    out = tmp_path_factory.mktemp("demo") / "vol"
    return demo_volume.build_demo_volume(
        out, num_sections=NZ, size=SIZE, num_mips=MIPS, seed=3, drift=10.0, chunk_xy=128
    )


def read_all(path: str, mip: int, nz: int = NZ, size: int = SIZE) -> torch.Tensor:
    s = size >> mip
    return volumes.read(path, mip, 0, 0, 0, s, s, nz=nz)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.float().flatten().numpy(), b.float().flatten().numpy())[0, 1])


def inner(t: torch.Tensor, m: int) -> torch.Tensor:
    return t[..., m:-m, m:-m].float()


def test_layers_exist_with_all_mips(tiny):
    assert tiny.mips == (0, 1, 2) and tiny.size == (SIZE, SIZE) and tiny.num_sections == NZ
    for path, dtype, channels in (
        (tiny.image_path, "uint8", 1),
        (tiny.aligned_path, "uint8", 1),
        (tiny.field_path, "float32", 2),
    ):
        info = volumes.volume_info(path)
        assert info.mips == (0, 1, 2) and info.dtype == dtype and info.num_channels == channels
        assert info.size[2] == (SIZE // 4, SIZE // 4, NZ)
        assert info.resolution[0] == (4.0, 4.0, 40.0) and info.resolution[1] == (8.0, 8.0, 40.0)
        coarsest = read_all(path, 2)
        assert coarsest.abs().sum() > 0  # every MIP was written, not left empty
    meta = json.loads((Path(tiny.out_dir) / "demo.json").read_text())
    assert meta["image_path"] == tiny.image_path and meta["source"] == "procedural"
    assert meta["num_sections"] == NZ and meta["mips"] == [0, 1, 2]
    # Nothing temporary is left next to the demo.
    assert [p.name for p in Path(tiny.out_dir).parent.iterdir()] == ["vol"]


def test_observed_sections_are_em_like_and_misaligned(tiny):
    obs = read_all(tiny.image_path, 0)
    aligned = read_all(tiny.aligned_path, 0)
    # Tissue everywhere (margin generated around the view), values 1..255 inside.
    assert (obs == 0).float().mean() < 0.01 and aligned.min() >= 1
    assert 80 < aligned.float().mean() < 220 and aligned.float().std() > 20
    # Misaligned: observed differs from aligned by much more than interpolation would explain.
    assert ((inner(obs, MARGIN) - inner(aligned, MARGIN)) ** 2).mean() > 500


@pytest.mark.parametrize("mip", [0, 1])
def test_ground_truth_field_realigns_each_section(tiny, mip):
    obs = read_all(tiny.image_path, mip)
    aligned = read_all(tiny.aligned_path, mip)
    g = read_all(tiny.field_path, mip)
    back = fields.warp_image(obs.float(), g)
    m = MARGIN >> mip
    err = ((inner(back, m) - inner(aligned, m)) ** 2).mean(dim=(1, 2, 3))
    raw = ((inner(obs, m) - inner(aligned, m)) ** 2).mean(dim=(1, 2, 3))
    assert (err < 0.05 * raw).all(), (err, raw)
    for z in range(NZ):
        assert pearson(inner(back[z], m), inner(aligned[z], m)) > 0.9


def test_procedural_sections_correlate_with_neighbours_only():
    stack = demo_volume.procedural_stack(8, 256, 256, seed=1)
    assert stack.dtype == torch.uint8 and stack.shape == (8, 1, 256, 256) and stack.min() >= 1
    near = [pearson(stack[z], stack[z + 1]) for z in range(7)]
    far = [pearson(stack[z], stack[z + 6]) for z in range(2)]
    assert all(0.2 < r < 0.8 for r in near), near
    assert max(far) < 0.5 * min(near), (near, far)
    assert torch.equal(demo_volume.procedural_stack(8, 256, 256, seed=1), stack)  # seeded
    assert not torch.equal(demo_volume.procedural_stack(8, 256, 256, seed=2), stack)


def test_pair_ground_truth_on_procedural_stack(tiny):
    z = 2
    pair = demo_volume.pair_ground_truth(tiny.field_path, 0, 0, 0, z, SIZE, SIZE)
    obs = read_all(tiny.image_path, 0)
    aligned = read_all(tiny.aligned_path, 0)
    warped = fields.warp_image(obs[z : z + 1].float(), pair)
    # Source z moved onto target z-1: it must look like aligned z deformed the way z-1 was.
    expect = fields.warp_image(
        aligned[z : z + 1].float(), fields.invert(read_all(tiny.field_path, 0)[z - 1 : z])
    )
    m = MARGIN
    assert ((inner(warped, m) - inner(expect, m)) ** 2).mean() < 0.05 * (
        (inner(obs[z], m) - inner(expect, m)) ** 2
    ).mean()
    # A cutout gives the same field as the full-size computation.
    cut = demo_volume.pair_ground_truth(tiny.field_path, 0, 64, 32, z, 96, 128)
    assert cut.shape == (1, 2, 128, 96)
    assert (cut - pair[..., 32:160, 64:160]).abs().max() < 0.05
    with pytest.raises(MetroemError, match="no previous section"):
        demo_volume.pair_ground_truth(tiny.field_path, 0, 0, 0, 0, 32)


def test_pair_ground_truth_aligns_identical_real_sections(tmp_path):
    # The same real image three times: observed z and z-1 then differ only by the known
    # deformations, and the pair field must map one onto the other almost exactly.
    src_dir = tmp_path / "same"
    src_dir.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(isbi_section(7), src_dir / name)
    vol = demo_volume.build_demo_volume(
        tmp_path / "vol", num_sections=3, num_mips=2, sections_dir=src_dir, seed=5, drift=12.0
    )
    assert vol.size == (512, 512) and vol.num_sections == 3
    obs = read_all(vol.image_path, 0, nz=3, size=512).float()
    m = 48
    for mip in (0, 1):
        pair = demo_volume.pair_ground_truth(vol.field_path, mip, 0, 0, 2, 512 >> mip)
        o = read_all(vol.image_path, mip, nz=3, size=512).float()
        warped = fields.warp_image(o[2:3], pair)
        mm = m >> mip
        valid = (inner(warped, mm) > 0) & (inner(o[1:2], mm) > 0)
        err = ((inner(warped, mm) - inner(o[1:2], mm))[valid] ** 2).mean()
        ident = ((inner(o[2:3], mm) - inner(o[1:2], mm))[valid] ** 2).mean()
        assert err < 0.1 * ident, (mip, err, ident)
    assert (obs[0] == 0).any()  # real sections: no margin, 0 where pulled from outside


def test_sections_dir_mode_with_real_images(tmp_path):
    src_dir = tmp_path / "isbi"
    src_dir.mkdir()
    for i in (3, 4, 5):
        shutil.copy(isbi_section(i), src_dir / f"{i:02d}.png")
    vol = demo_volume.build_demo_volume(
        tmp_path / "vol", num_sections=10, size=(256, 192), num_mips=3, sections_dir=src_dir
    )
    assert vol.num_sections == 3 and vol.size == (256, 192) and vol.source == str(src_dir)
    aligned = volumes.read(vol.aligned_path, 0, 0, 0, 0, 256, 192, nz=3)
    real = images.load_sections(src_dir)
    assert torch.equal(aligned, real[..., 160:352, 128:384])  # centre crop, in name order
    obs = volumes.read(vol.image_path, 0, 0, 0, 0, 256, 192, nz=3)
    g = volumes.read(vol.field_path, 0, 0, 0, 0, 256, 192, nz=3)
    back = fields.warp_image(obs.float(), g)
    m = 60
    assert ((inner(back, m) - inner(aligned, m)) ** 2).mean() < 0.1 * (
        (inner(obs, m) - inner(aligned, m)) ** 2
    ).mean()


def test_refuses_to_overwrite_and_bad_input(tmp_path):
    out = tmp_path / "vol"
    demo_volume.build_demo_volume(out, num_sections=1, size=64, num_mips=2, drift=2.0)
    with pytest.raises(MetroemError, match="already exists.*--overwrite"):
        demo_volume.build_demo_volume(out, num_sections=1, size=64, num_mips=2)
    before = volumes.read(str(out / "image"), 0, 0, 0, 0, 64)
    assert volumes.volume_info(str(out / "image")).size[0] == (64, 64, 1)
    demo_volume.build_demo_volume(out, num_sections=2, size=64, num_mips=2, seed=9, overwrite=True)
    assert volumes.volume_info(str(out / "image")).size[0] == (64, 64, 2)
    assert not torch.equal(volumes.read(str(out / "image"), 0, 0, 0, 0, 64), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not a demo")
    with pytest.raises(MetroemError, match="not empty"):
        demo_volume.build_demo_volume(other, num_sections=1, size=64, num_mips=2, overwrite=True)
    assert (other / "keep.txt").exists()
    with pytest.raises(MetroemError, match="multiple of 4"):
        demo_volume.build_demo_volume(tmp_path / "odd", num_sections=1, size=66, num_mips=3)
    with pytest.raises(MetroemError, match="no images"):
        demo_volume.build_demo_volume(tmp_path / "x", sections_dir=other)


def test_cli_builds_and_refuses_existing_output(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "metroem.demo_volume", str(out), "--num_sections", "2"]
    cmd += ["--size", "64", "--num_mips", "2", "--drift", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "field_gt" in done.stdout and (out / "demo.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]
