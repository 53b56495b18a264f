"""download_image / download_field on real file:// CloudVolumes (library, CLI and scripts).

The shared volumes sit near the coordinates of the upstream example commands: MIP0 offset
(199168, 134656, 8170), 3584 x 3584 x 12 voxels, 9 MIPs. The image layer holds real ISBI
sections at MIP 3 (and their masked box average at MIP 5); the field layer holds a smooth field
at MIP 8 only (14 x 14 voxels), which is all the upstream chain reads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import isbi_section
from PIL import Image

from metroem import datasets as D
from metroem import fields, volumes
from metroem.download import (
    download_field,
    download_field_main,
    download_image,
    download_image_main,
)
from metroem.errors import MetroemError
from metroem.geometry import snap_centre

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OX, OY, OZ, EXT, NZ = 199168, 134656, 8170, 3584, 12
CX, CY = 200960, 136448  # the upstream example centre


def url(path) -> str:
    return "file://" + str(path)


def isbi(n: int, size: int) -> torch.Tensor:
    """The first ``n`` ISBI sections cropped to ``size``, shape (n, 1, size, size) uint8."""
    imgs = [np.asarray(Image.open(isbi_section(i)))[:size, :size] for i in range(n)]
    return torch.from_numpy(np.stack(imgs)[:, None].copy())


def smooth_field(n: int, h: int, w: int, means, seed: int = 0) -> torch.Tensor:
    """A smooth field (n, 2, h, w) with the given per-section means plus a gentle wave."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    f = torch.zeros(n, 2, h, w)
    for i in range(n):
        a = torch.rand(4, generator=g) * 6
        f[i, 0] = means[i][0] + 0.15 * torch.sin(a[0] * xs + a[1] * ys)
        f[i, 1] = means[i][1] + 0.15 * torch.cos(a[2] * xs - a[3] * ys)
    return f


# Per-section mean of the MIP 8 field (MIP 8 px): a full MIP 8 pixel or more -> non-zero
# translations (multiples of 256 MIP0 px) for most pairs, zero for some.
MEANS8 = [(0.8, -0.7), (-1.3, 0.2), (0.1, 0.1), (0.7, 1.2)] * 3


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    root = tmp_path_factory.mktemp("vols")
    img, fld = url(root / "img"), url(root / "field")
    volumes.create_volume(img, (EXT, EXT, NZ), 9, offset_xyz=(OX, OY, OZ), chunk_xy=64)
    mip3 = isbi(NZ, EXT >> 3)
    volumes.write(img, 3, OX >> 3, OY >> 3, OZ, mip3)
    volumes.write(img, 5, OX >> 5, OY >> 5, OZ, fields.downsample_image(mip3, 2))
    volumes.create_volume(
        fld, (EXT, EXT, NZ), 9, dtype="float32", num_channels=2, offset_xyz=(OX, OY, OZ),
        chunk_xy=64,
    )
    n8 = EXT >> 8
    volumes.write(fld, 8, OX >> 8, OY >> 8, OZ, smooth_field(NZ, n8, n8, MEANS8))
    return {"img": img, "field": fld, "root": root}


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def assert_clean(folder, expected=()) -> None:
    """Only ``expected`` files, no temporary or lock files."""
    have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    assert have == sorted(expected), have


# ----------------------------------------------------------------------------- images


def test_image_pairs_equal_volume_cutouts_and_mips_are_concentric(vols, tmp_path):
    # An off-grid centre snaps to the nearest multiple of 2^5 = 32.
    assert snap_centre(CX + 15, CY - 8, 5) == (CX, CY)
    paths = download_image(
        vols["img"], str(tmp_path), 8175, 8179, CX + 15, CY - 8, [3, 5], [64, 32], progress=False
    )
    assert [os.path.basename(p) for p in paths] == [
        "x200960_y136448_z8175_MIP3.h5", "x200960_y136448_z8175_MIP5.h5"
    ]
    assert_clean(tmp_path, [os.path.basename(p) for p in paths])
    d3, d5 = D.read_image_dataset(paths[0]), D.read_image_dataset(paths[1])
    for d, mip, s in [(d3, 3, 64), (d5, 5, 32)]:
        assert d.data.shape == (4, 2, s, s) and d.data.dtype == np.uint8
        x0, y0 = CX // 2**mip - s // 2, CY // 2**mip - s // 2
        for i, z in enumerate(range(8175, 8179)):
            src = volumes.read(vols["img"], mip, x0, y0, z, s)[0, 0].numpy()
            tgt = volumes.read(vols["img"], mip, x0, y0, z - 1, s)[0, 0].numpy()
            np.testing.assert_array_equal(d.data[i, 0], src)
            np.testing.assert_array_equal(d.data[i, 1], tgt)
        assert (d.attrs["x_offset"], d.attrs["y_offset"], d.attrs["mip"]) == (CX, CY, mip)
        assert d.z == [8175, 8176, 8177, 8178] and not d.translation.any()
        assert d.attrs["source"] == vols["img"] and list(d.attrs["resolution"]) == [
            4 * 2**mip, 4 * 2**mip, 40
        ]
    # Same centre: the middle 16 MIP5 px cover exactly the 64 MIP3 px patch.
    down = fields.downsample_image(torch.from_numpy(d3.data), 2).numpy()
    np.testing.assert_array_equal(d5.data[:, :, 8:24, 8:24], down)
    assert not np.array_equal(d5.data[:, :, 7:23, 8:24], down)  # and not one pixel off


def test_defects_blank_pixels(vols, tmp_path):
    defects = url(tmp_path / "defects")
    volumes.create_volume(defects, (EXT, EXT, NZ), 9, offset_xyz=(OX, OY, OZ), chunk_xy=64)
    mask = torch.zeros(NZ, 1, EXT >> 3, EXT >> 3, dtype=torch.uint8)
    mask[5, 0, 200:230, 210:260] = 200  # z = 8175: the source of pair 0, target of pair 1
    mask[5, 0, 240:250, 200:205] = 1  # below the threshold: kept
    volumes.write(defects, 3, OX >> 3, OY >> 3, OZ, mask)
    out = tmp_path / "out"
    (p,) = download_image(
        vols["img"], str(out), 8175, 8177, CX, CY, [3], [64], cv_path_defects=defects,
        defect_threshold=10, parallel=2, progress=False,
    )
    d = D.read_image_dataset(p).data
    x0, y0 = CX // 8 - 32 - (OX >> 3), CY // 8 - 32 - (OY >> 3)  # patch origin in mask pixels
    m = mask[5, 0, y0 : y0 + 64, x0 : x0 + 64].numpy() > 10
    assert m.any() and (~m).any()
    raw = volumes.read(vols["img"], 3, CX // 8 - 32, CY // 8 - 32, 8175, 64)[0, 0].numpy()
    for got in (d[0, 0], d[1, 1]):  # section 8175 wherever it appears
        assert (got[m] == 0).all()
        np.testing.assert_array_equal(got[~m], raw[~m])
    assert D.read_image_dataset(p).attrs["defects"] == defects


# ----------------------------------------------------------------------------- fields


def test_field_dataset_matches_independent_resampling(vols, tmp_path):
    p = download_field(
        vols["field"], str(tmp_path), 8175, 8180, CX, CY, 8, 5, 64, "precomputed", progress=False
    )
    assert os.path.basename(p) == "field_0_x200960_y136448_z8175_MIP5_precomputed.h5"
    d = D.read_field_dataset(p)
    assert d.data.shape == (5, 2, 64, 64) and d.attrs["tag"] == "precomputed"
    assert (d.translation % 256 == 0).all() and d.translation.any()  # snapped at MIP 8
    n8 = EXT >> 8
    whole = volumes.read(vols["field"], 8, OX >> 8, OY >> 8, 8175, n8, n8, nz=5)
    up = fields.upsample_field(whole, 3)  # the whole section at MIP 5
    x0, y0 = CX // 32 - 32 - (OX >> 5), CY // 32 - 32 - (OY >> 5)
    expected = up[:, :, y0 : y0 + 64, x0 : x0 + 64]
    full = torch.from_numpy(d.data) + torch.from_numpy(d.translation / 32).float()[..., None, None]
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=0)
    # The removed translation is the mean, to within half a MIP 8 pixel (128 MIP0 px).
    mean0 = fields.mean_translation(expected).numpy() * 32
    assert np.abs(mean0 - d.translation).max() <= 128
    expect_t = np.round(np.array(MEANS8[5:10])) * 256
    np.testing.assert_array_equal(d.translation, expect_t)


def small_pair_volumes(tmp_path, units: str):
    """512 x 512 x 4 volumes, 3 MIPs: random image at MIP 1 and 2, field at MIP 1."""
    img, fld = url(tmp_path / "img"), url(tmp_path / "fld")
    volumes.create_volume(img, (512, 512, 4), 3, chunk_xy=64)
    g = torch.Generator().manual_seed(3)
    base = torch.rand(4, 1, 32, 32, generator=g)
    mip1 = (torch.nn.functional.interpolate(base, size=256, mode="bicubic") * 200 + 30)
    mip1 = mip1.clamp(1, 255).round().to(torch.uint8)
    volumes.write(img, 1, 0, 0, 0, mip1)
    volumes.write(img, 2, 0, 0, 0, fields.downsample_image(mip1, 1))
    volumes.create_volume(fld, (512, 512, 4), 3, dtype="float32", num_channels=2, chunk_xy=64)
    f1 = smooth_field(4, 256, 256, [(10.4, -7.3), (0.0, 0.0), (-5.2, 3.9), (2.0, 2.0)], seed=1)
    volumes.write(fld, 1, 0, 0, 0, f1 * (2 if units == "mip0" else 1))
    return img, fld, f1


def invariant_holds(src0, src1, f_full, f_res, margin: int = 2) -> None:
    """src0(p + f(p)) == src1(p + f(p) - t) wherever both samples land inside the windows."""
    a = fields.warp_image(src0, f_full)
    b = fields.warp_image(src1, f_res)
    s = src0.shape[-1]
    grid = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(s), indexing="xy"))
    inside = torch.ones(src0.shape[0], s, s, dtype=torch.bool)
    for f in (f_full, f_res):
        q = grid + f
        inside &= ((q >= margin) & (q <= s - 1 - margin)).all(dim=1)
    assert inside.float().mean() > 0.5
    diff = (a - b).abs()[:, 0][inside]
    assert diff.max() < 1e-4, diff.max()


def test_translation_invariant_downsampling_path_mip0_units(tmp_path):
    img, fld, f1 = small_pair_volumes(tmp_path, "mip0")
    out = tmp_path / "data"
    fp = download_field(fld, str(out), 1, 4, 256, 256, 1, 2, 64, "gt", field_units="mip0",
                        progress=False)
    d = D.read_field_dataset(fp)
    assert (d.translation % 4 == 0).all() and d.translation.any()
    # Exact content: MIP1 window (in MIP1 px) box-averaged to MIP 2.
    window = f1[1:4, :, 128 - 64 : 128 + 64, 128 - 64 : 128 + 64]
    full = torch.from_numpy(d.data) + torch.from_numpy(d.translation / 4).float()[..., None, None]
    torch.testing.assert_close(full, fields.downsample_field(window, 1), atol=1e-4, rtol=0)
    plain = download_image(img, str(out / "plain"), 1, 4, 256, 256, [2], [64], progress=False)[0]
    moved = download_image(img, str(out), 1, 4, 256, 256, [1, 2], [128, 64], field_dset=fp,
                           progress=False)
    m = D.read_image_dataset(moved[1])
    np.testing.assert_array_equal(m.translation, d.translation)
    assert m.attrs["field_dset"] == fp
    np.testing.assert_array_equal(D.read_image_dataset(moved[0]).translation, d.translation)
    p = D.read_image_dataset(plain)
    np.testing.assert_array_equal(p.data[:, 1], m.data[:, 1])  # targets never move
    to_f = lambda a: torch.from_numpy(a.astype(np.float32) / 255)  # noqa: E731
    invariant_holds(to_f(p.data[:, 0:1]), to_f(m.data[:, 0:1]), full, torch.from_numpy(d.data))
    # PairDataset joins the field to the moved pairs.
    ds = D.PairDataset(str(out), mip=2, field_stage=0, field_tag="gt")
    assert len(ds) == 3 and torch.equal(ds[2]["field"], torch.from_numpy(d.data[2]))


def test_upstream_command_chain(vols, tmp_path, monkeypatch, capsys):
    """The three upstream invocations, as written (smaller patches), with ~ in the paths."""
    monkeypatch.setenv("HOME", str(tmp_path))
    common = ["--z_start", "8175", "--z_end", "8180", "--x_offset", "200960", "--y_offset",
              "136448"]
    download_image_main(["--dst_folder", "~/data", *common, "--mip", "3", "5", "--patch_size",
                         "64", "64", "--cv_path", vols["img"]])
    download_field_main(["--dst_folder", "~/data/", *common, "--src_mip", "8", "--dst_mip", "5",
                         "--patch_size", "64", "--suffix", "precomputed", "--cv_path",
                         vols["field"]])
    data = tmp_path / "data"
    fname = "field_0_x200960_y136448_z8175_MIP5_precomputed.h5"
    assert_clean(data, ["x200960_y136448_z8175_MIP3.h5", "x200960_y136448_z8175_MIP5.h5", fname])
    plain = D.read_image_dataset(str(data / "x200960_y136448_z8175_MIP5.h5"))
    # The plain MIP5 pairs do not match the translated field: a clear error, with the fix.
    with pytest.raises(MetroemError) as e:
        D.PairDataset(str(data), mip=5, field_stage=0)
    assert "--field_dset" in one_line(e)
    third = ["--dst_folder", "~/data", *common, "--mip", "5", "--patch_size", "64", "--cv_path",
             vols["img"], "--field_dset", "~/data/" + fname]
    capsys.readouterr()
    with pytest.raises(SystemExit) as ex:  # the MIP5 file from the first command is there
        download_image_main(third)
    err = capsys.readouterr().err
    assert ex.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "already exists; pass --overwrite" in err
    download_image_main([*third, "--overwrite"])
    moved = D.read_image_dataset(str(data / "x200960_y136448_z8175_MIP5.h5"))
    fd = D.read_field_dataset(str(data / fname))
    np.testing.assert_array_equal(moved.translation, fd.translation)
    shift = fd.translation // 32  # MIP5 px
    x0, y0 = CX // 32 - 32, CY // 32 - 32
    for i, z in enumerate(range(8175, 8180)):
        src = volumes.read(vols["img"], 5, x0 + shift[i, 0], y0 + shift[i, 1], z, 64)[0, 0]
        np.testing.assert_array_equal(moved.data[i, 0], src.numpy())
    np.testing.assert_array_equal(moved.data[:, 1], plain.data[:, 1])
    # src(p + f(p)) on the plain window == src'(p + f'(p)) on the moved window.
    f_res = torch.from_numpy(fd.data)
    f_full = f_res + torch.from_numpy(fd.translation / 32).float()[..., None, None]
    to_f = lambda a: torch.from_numpy(a.astype(np.float32) / 255)  # noqa: E731
    invariant_holds(to_f(plain.data[:, 0:1]), to_f(moved.data[:, 0:1]), f_full, f_res)
    ds = D.PairDataset(str(data), mip=5, field_stage=0)
    assert len(ds) == 5 and ds[0]["field"].shape == (2, 64, 64)
    assert_clean(data, ["x200960_y136448_z8175_MIP3.h5", "x200960_y136448_z8175_MIP5.h5", fname])


# ----------------------------------------------------------------------------- bad input

GOOD = dict(z_start=8175, z_end=8178, x_offset=CX, y_offset=CY, mips=[3, 5], patch_sizes=[64])

IMAGE_CASES = {
    "wrong path": (dict(cv_path="nowhere"), "no CloudVolume at"),
    "empty z": (dict(z_end=8175), "empty z range"),
    "z below volume": (dict(z_start=8170), "needs sections [8169,"),
    "z above volume": (dict(z_end=8190), "has z [8170, 8182)"),
    "patch outside": (dict(patch_sizes=[64, 128]), "outside the volume"),
    "offset outside": (dict(x_offset=OX - 1024), "outside the volume"),
    "missing mip": (dict(mips=[3, 9]), "has no MIP 9"),
    "count mismatch": (dict(patch_sizes=[64, 64, 64]), "3 patch sizes for 2 MIPs"),
    "odd patch": (dict(patch_sizes=[63]), "positive even"),
    "duplicate mips": (dict(mips=[3, 3]), "distinct"),
    "field volume as image": (dict(cv_path="FIELD"), "has 2 channels"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_input(vols, tmp_path, case):
    change, expect = IMAGE_CASES[case]
    kw = {**GOOD, "cv_path": vols["img"], **change}
    if kw["cv_path"] == "nowhere":
        kw["cv_path"] = str(tmp_path / "nowhere")
    if kw["cv_path"] == "FIELD":
        kw["cv_path"] = vols["field"]
    out = tmp_path / "out"
    with pytest.raises(MetroemError) as e:
        download_image(dst_folder=str(out), progress=False, **kw)
    assert expect in one_line(e)
    assert_clean(out)


FIELD_GOOD = dict(z_start=8175, z_end=8177, x_offset=CX, y_offset=CY, src_mip=8, dst_mip=5,
                  patch_size=64, suffix="p")
FIELD_CASES = {
    "image volume": (dict(cv_path="IMG"), "a field volume has 2"),
    "missing mip": (dict(src_mip=9), "has no MIP 9"),
    "patch outside": (dict(patch_size=256), "field volume spans"),
    "z outside": (dict(z_start=8160), "has z [8170, 8182)"),
    "empty z": (dict(z_end=8175), "empty z range"),
    "units": (dict(field_units="px"), "--field_units"),
    "no suffix": (dict(suffix=None), "--suffix is required"),
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_bad_field_input(vols, tmp_path, case):
    change, expect = FIELD_CASES[case]
    kw = {**FIELD_GOOD, "cv_path": vols["field"], **change}
    if kw["cv_path"] == "IMG":
        kw["cv_path"] = vols["img"]
    out = tmp_path / "out"
    with pytest.raises(MetroemError) as e:
        download_field(dst_folder=str(out), progress=False, **kw)
    assert expect in one_line(e)
    assert_clean(out)


def test_field_dset_must_match_the_cut(vols, tmp_path):
    fdir = tmp_path / "f"
    fp = download_field(vols["field"], str(fdir), 8175, 8178, CX, CY, 8, 5, 64, "p",
                        progress=False)
    out = tmp_path / "out"
    cases = [
        (dict(z_end=8177), "covers z [8175, 8176, 8177] but this cut has z [8175, 8176]"),
        (dict(mips=[3]), "is at MIP 5 but --mips is [3]"),
        (dict(x_offset=CX + 256), "pass --x_offset 200960 --y_offset 136448"),
        (dict(patch_sizes=[32]), "use --patch_size 64"),
    ]
    for change, expect in cases:
        kw = {**GOOD, "mips": [5], "patch_sizes": [64], **change}
        with pytest.raises(MetroemError) as e:
            download_image(vols["img"], str(out), field_dset=fp, progress=False, **kw)
        assert expect in one_line(e), change
    with open(fp, "r+b") as f:  # a truncated field dataset is reported, not half-used
        f.truncate(os.path.getsize(fp) // 3)
    with pytest.raises(MetroemError) as e:
        download_image(vols["img"], str(out), field_dset=fp, progress=False,
                       **{**GOOD, "mips": [5]})
    assert fp in one_line(e) and "re-cut" in str(e.value)
    assert_clean(out)


def test_existing_output_is_kept_without_overwrite(vols, tmp_path):
    (p,) = download_image(vols["img"], str(tmp_path), 8175, 8177, CX, CY, [5], [32],
                          progress=False)
    before = open(p, "rb").read()
    with pytest.raises(MetroemError) as e:
        download_image(vols["img"], str(tmp_path), 8175, 8177, CX, CY, [3, 5], [32],
                       progress=False)
    assert "already exists; pass --overwrite" in one_line(e)
    assert open(p, "rb").read() == before
    assert_clean(tmp_path, [os.path.basename(p)])  # the MIP3 file was not written either


# ----------------------------------------------------------------------------- failure midway


@pytest.fixture
def nan_volume(tmp_path):
    """A float32 image volume whose third section is NaN (passes validation, fails reading)."""
    path = url(tmp_path / "nanimg")
    volumes.create_volume(path, (64, 64, 5), 1, dtype="float32", chunk_xy=64)
    data = torch.rand(5, 1, 64, 64) + 0.5
    data[3, 0, 30, 30] = float("nan")
    volumes.write(path, 0, 0, 0, 0, data)
    return path


@pytest.mark.parametrize("parallel", [1, 2])
def test_failure_midway_leaves_nothing(nan_volume, tmp_path, parallel):
    out = tmp_path / "out"
    with pytest.raises(MetroemError) as e:
        download_image(nan_volume, str(out), 1, 5, 32, 32, [0], [32], parallel=parallel,
                       progress=False)
    assert "NaN" in one_line(e) and "z=3" in str(e.value)
    assert_clean(out)
    # The same call on the good sections works and reads float data unchanged.
    (p,) = download_image(nan_volume, str(out), 1, 3, 32, 32, [0], [32], progress=False)
    d = D.read_image_dataset(p)
    assert d.data.dtype == np.float32
    np.testing.assert_array_equal(d.data[1, 0], volumes.read(nan_volume, 0, 16, 16, 2, 32)[0, 0])


def test_keyboard_interrupt_midway_leaves_nothing(vols, tmp_path, monkeypatch):
    real_read, calls = volumes.read, []

    def read_then_interrupt(*args, **kwargs):
        calls.append(args)
        if len(calls) == 5:  # pair 0 (4 reads at two MIPs) done and written, then Ctrl-C
            raise KeyboardInterrupt
        return real_read(*args, **kwargs)

    monkeypatch.setattr(volumes, "read", read_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        download_image(vols["img"], str(out), 8175, 8179, CX, CY, [3, 5], [64], progress=False)
    assert len(calls) == 5
    assert_clean(out)


# ----------------------------------------------------------------------------- CLI scripts


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
        timeout=120,
    )


def test_cli_errors_are_one_line_exit_2(vols, tmp_path):
    out = tmp_path / "out"
    args = ["--dst_folder", str(out), "--z_start", "8175", "--z_end", "8180", "--x_offset",
            str(CX), "--y_offset", str(CY), "--cv_path", vols["img"]]
    r = run_script("download_image.py", *args, "--mip", "3", "9", "--patch_size", "64")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "has no MIP 9" in r.stderr and "Traceback" not in r.stderr
    r = run_script("download_field.py", *args, "--src_mip", "8", "--dst_mip", "5")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "--patch_size" in r.stderr  # a usage error is one line too
    assert_clean(out)


@pytest.mark.slow
def test_upstream_scripts_as_subprocesses(vols, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    common = ["--z_start", "8175", "--z_end", "8180", "--x_offset", "200960", "--y_offset",
              "136448"]
    cmds = [
        ["download_image.py", "--dst_folder", "~/data", *common, "--mip", "3", "5",
         "--patch_size", "64", "64", "--cv_path", vols["img"]],
        ["download_field.py", "--dst_folder", "~/data/", *common, "--src_mip", "8", "--dst_mip",
         "5", "--patch_size", "64", "--suffix", "precomputed", "--cv_path", vols["field"]],
        ["download_image.py", "--dst_folder", "~/data-field", *common, "--mip", "5",
         "--patch_size", "64", "--cv_path", vols["img"], "--field_dset",
         "~/data/field_0_x200960_y136448_z8175_MIP5_precomputed.h5"],
    ]
    for cmd in cmds:
        r = subprocess.run([sys.executable, os.path.join(REPO, cmd[0]), *cmd[1:]], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert os.path.exists(r.stdout.strip().splitlines()[-1])
    assert len(D.list_datasets(str(tmp_path / "data"))) == 3
    assert D.read_image_dataset(
        str(tmp_path / "data-field" / "x200960_y136448_z8175_MIP5.h5")
    ).translation.any()
