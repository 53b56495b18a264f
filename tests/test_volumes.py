"""CloudVolume I/O (metroem/volumes.py) on real file:// volumes in tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metroem import volumes
from metroem.errors import MetroemError


def url(path) -> str:
    return "file://" + str(path)


def test_uint8_image_round_trip_exact(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (128, 96, 4), num_mips=1, chunk_xy=64)
    data = torch.randint(1, 256, (2, 1, 96, 128), dtype=torch.uint8)
    volumes.write(path, 0, 0, 0, 1, data)
    back = volumes.read(path, 0, 0, 0, 1, 128, 96, nz=2)
    assert back.dtype == torch.uint8 and back.shape == (2, 1, 96, 128)
    assert torch.equal(back, data)
    info = volumes.volume_info(path)
    assert info.dtype == "uint8" and info.num_channels == 1 and info.mips == (0,)
    assert info.size[0] == (128, 96, 4) and info.resolution[0] == (4.0, 4.0, 40.0)


def test_float_field_round_trip_exact(tmp_path):
    path = url(tmp_path / "field")
    volumes.create_volume(path, (64, 48, 2), num_mips=1, dtype="float32", num_channels=2)
    data = torch.randn(2, 2, 48, 64) * 10
    volumes.write(path, 0, 0, 0, 0, data)
    back = volumes.read(path, 0, 0, 0, 0, 64, 48, nz=2)
    assert back.dtype == torch.float32 and torch.equal(back, data)
    # Channel order survives: channel 0 is x displacement.
    assert torch.equal(back[:, 0], data[:, 0]) and not torch.equal(back[:, 0], back[:, 1])


def test_non_chunk_aligned_write(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (100, 100, 1), num_mips=1, chunk_xy=32)
    patch = torch.randint(1, 256, (1, 1, 23, 37), dtype=torch.uint8)
    volumes.write(path, 0, 13, 29, 0, patch)
    full = volumes.read(path, 0, 0, 0, 0, 100, 100)
    assert torch.equal(full[..., 29:52, 13:50], patch)
    full[..., 29:52, 13:50] = 0
    assert torch.all(full == 0)  # nothing else was touched; unwritten chunks read as 0


def test_axis_order_x_first_in_cloudvolume(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (40, 24, 1), num_mips=1, chunk_xy=16)
    img = torch.zeros(1, 1, 24, 40, dtype=torch.uint8)  # (z, c, y, x)
    img[0, 0, 3, 30] = 200  # row y=3, column x=30
    img[0, 0, 20, 5] = 100
    volumes.write(path, 0, 0, 0, 0, img)
    back = volumes.read(path, 0, 0, 0, 0, 40, 24)
    assert back[0, 0, 3, 30] == 200 and back[0, 0, 20, 5] == 100
    raw = np.asarray(volumes.open_volume(path)[0:40, 0:24, 0:1])  # CloudVolume: (x, y, z, c)
    assert raw.shape == (40, 24, 1, 1)
    assert raw[30, 3, 0, 0] == 200 and raw[5, 20, 0, 0] == 100
    # A cutout at an offset keeps the orientation too.
    sub = volumes.read(path, 0, 28, 2, 0, 4, 3)
    assert sub.shape == (1, 1, 3, 4) and sub[0, 0, 1, 2] == 200


def test_write_all_mips_downsamples_images_and_fields(tmp_path):
    img_path, field_path = url(tmp_path / "img"), url(tmp_path / "field")
    volumes.create_volume(img_path, (64, 32, 1), num_mips=3, chunk_xy=16)
    volumes.create_volume(
        field_path, (64, 32, 1), num_mips=3, dtype="float32", num_channels=2, chunk_xy=16
    )
    img = torch.full((1, 1, 32, 64), 120, dtype=torch.uint8)
    img[..., :, :1] = 0  # no data: masked average keeps tissue at 120
    img[..., 16:, 32:] = 40
    volumes.write_all_mips(img_path, 0, 0, 0, img)
    field = torch.zeros(1, 2, 32, 64)
    field[:, 0], field[:, 1] = 8.0, -4.0
    volumes.write_all_mips(field_path, 0, 0, 0, field, is_field=True)
    for mip in range(3):
        k = 2**mip
        f = volumes.read(field_path, mip, 0, 0, 0, 64 // k, 32 // k)
        assert torch.allclose(f[:, 0], torch.full_like(f[:, 0], 8.0 / k))
        assert torch.allclose(f[:, 1], torch.full_like(f[:, 1], -4.0 / k))
        im = volumes.read(img_path, mip, 0, 0, 0, 64 // k, 32 // k)
        assert im.shape == (1, 1, 32 // k, 64 // k)
        # The no-data column x = 0 did not darken the coarse border pixel.
        assert im[0, 0, 0, 0] == (0 if mip == 0 else 120) and im[0, 0, 0, 1] == 120
        assert im[0, 0, -1, -1] == 40 and im[0, 0, 0, -1] == 120


def test_write_all_mips_rejects_unaligned_offset(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (64, 64, 1), num_mips=3, chunk_xy=16)
    with pytest.raises(MetroemError, match="multiple of 4"):
        volumes.write_all_mips(path, 2, 0, 0, torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_missing_chunks_read_as_zero(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (64, 64, 3), num_mips=2, chunk_xy=32)
    assert torch.all(volumes.read(path, 0, 0, 0, 2, 64, 64) == 0)
    assert torch.all(volumes.read(path, 1, 0, 0, 0, 32, 32) == 0)
    # Unbounded reads outside the volume give 0 too.
    out = volumes.read(path, 0, 48, 48, 0, 32, 32)
    assert out.shape == (1, 1, 32, 32) and torch.all(out == 0)


def test_bounded_read_outside_raises_with_bounds(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (100, 60, 3), num_mips=2, chunk_xy=32)
    with pytest.raises(MetroemError, match=r"x\[90,110\).*x\[0,100\) y\[0,60\) z\[0,3\)"):
        volumes.read(path, 0, 90, 0, 0, 20, 10, bounded=True)
    with pytest.raises(MetroemError, match=r"MIP 1 .*x\[0,50\) y\[0,30\)"):
        volumes.read(path, 1, 0, 25, 0, 10, 10, bounded=True)
    inside = volumes.read(path, 1, 0, 0, 0, 50, 30, bounded=True)
    assert inside.shape == (1, 1, 30, 50)


def test_missing_path_and_missing_mip(tmp_path):
    with pytest.raises(MetroemError, match="no CloudVolume"):
        volumes.read(url(tmp_path / "nothing"), 0, 0, 0, 0, 8)
    path = url(tmp_path / "img")
    volumes.create_volume(path, (64, 64, 1), num_mips=2, chunk_xy=32)
    with pytest.raises(MetroemError, match=r"no MIP 5 \(it has MIPs 0..1\)"):
        volumes.read(path, 5, 0, 0, 0, 8)
    # One line each, as the CLI prints them.
    try:
        volumes.read(path, 5, 0, 0, 0, 8)
    except MetroemError as e:
        assert "\n" not in str(e)


def test_plain_paths_are_accepted(tmp_path):
    plain = str(tmp_path / "img")
    volumes.create_volume(plain, (32, 32, 1), num_mips=1, chunk_xy=32)
    data = torch.randint(1, 256, (1, 1, 32, 32), dtype=torch.uint8)
    volumes.write(plain, 0, 0, 0, 0, data)
    assert torch.equal(volumes.read(url(tmp_path / "img"), 0, 0, 0, 0, 32), data)
    assert torch.equal(volumes.read(plain, 0, 0, 0, 0, 32), data)
    assert volumes.normalize_path(plain) == url(tmp_path / "img")
    assert volumes.normalize_path("gs://bucket/layer") == "gs://bucket/layer"


def test_create_over_existing_needs_overwrite(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (32, 32, 1), num_mips=1, chunk_xy=32)
    with pytest.raises(MetroemError, match="already exists"):
        volumes.create_volume(path, (64, 64, 1), num_mips=1)
    volumes.create_volume(path, (64, 64, 2), num_mips=2, overwrite=True)
    info = volumes.volume_info(path)
    assert info.size[0] == (64, 64, 2) and info.mips == (0, 1)


def test_write_checks_shape_and_channels(tmp_path):
    path = url(tmp_path / "field")
    volumes.create_volume(path, (32, 32, 1), num_mips=1, dtype="float32", num_channels=2)
    with pytest.raises(MetroemError, match=r"\(nz, C, H, W\)"):
        volumes.write(path, 0, 0, 0, 0, torch.zeros(2, 32, 32))
    with pytest.raises(MetroemError, match="2 channels, data has 1"):
        volumes.write(path, 0, 0, 0, 0, torch.zeros(1, 1, 32, 32))


def test_integer_layer_rounds_and_clips(tmp_path):
    path = url(tmp_path / "img")
    volumes.create_volume(path, (4, 1, 1), num_mips=1, chunk_xy=4)
    volumes.write(path, 0, 0, 0, 0, torch.tensor([[[[-3.0, 1.6, 254.4, 300.0]]]]))
    back = volumes.read(path, 0, 0, 0, 0, 4, 1)
    assert back.flatten().tolist() == [0, 2, 254, 255]
