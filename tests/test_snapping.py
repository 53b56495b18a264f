"""One snapping rule (docs/datasets.md): the nearest multiple of the step, exact halves round up
(towards +inf). Patch centres, the translations removed by download_field and by field
generation, and download_image's source-window shifts must all agree on exact halves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from metroem import datasets, download, generate, modules, nets, volumes
from metroem.geometry import remove_translation, snap_centre, snap_to_multiple

pytestmark = pytest.mark.usefixtures("one_thread")

# value / step -> snapped value / step. Halves go up: 0.5 -> 1 but -0.5 -> 0 and -2.5 -> -2
# (round-half-to-even would give 0, 0 and -2; round-half-away-from-zero 1, -1 and -3).
HALVES = {0.5: 1, 1.5: 2, 2.5: 3, -0.5: 0, -1.5: -1, -2.5: -2}
NEAR = {0.49: 0, 0.51: 1, -0.49: 0, -0.51: -1, 3.0: 3, -3.0: -3, 0.0: 0}


def url(path) -> str:
    return "file://" + str(path)


@pytest.mark.parametrize("mip", range(7))
def test_rule_on_numbers_arrays_and_tensors(mip):
    step = 2**mip
    cases = {**HALVES, **NEAR}
    values = [u * step for u in cases]
    expect = [cases[u] * step for u in cases]
    got = [snap_to_multiple(v, step) for v in values]
    assert got == expect and all(type(g) is int for g in got)
    np.testing.assert_array_equal(snap_to_multiple(np.array(values), step), expect)
    for dtype in (torch.float32, torch.float64):
        t = snap_to_multiple(torch.tensor(values, dtype=dtype), step)
        assert t.dtype == dtype and t.tolist() == expect
    if mip:  # integer centres half-way between two grid points move up
        assert snap_centre(3 * step // 2, -step // 2, mip) == (2 * step, 0)


def test_just_below_a_half_rounds_down_exactly():
    # q + 0.5 would round to 1.0 in float32 here; the rule must not.
    q = np.nextafter(np.float32(0.5), np.float32(0))
    assert snap_to_multiple(torch.tensor([q * 256], dtype=torch.float32), 256).item() == 0
    assert snap_to_multiple(torch.tensor([-q * 256], dtype=torch.float32), 256).item() == 0


@pytest.mark.parametrize("mip, coarsest", [(0, 0), (0, 1), (1, 1), (1, 3), (2, 5)])
def test_remove_translation_snaps_halves_up(mip, coarsest):
    step = 2**coarsest
    units = [(0.5, -0.5), (1.5, -2.5), (-1.5, 2.5)]  # mean translation in steps
    f = torch.zeros(len(units), 2, 8, 8)
    for i, (ux, uy) in enumerate(units):
        f[i, 0] = ux * step / 2**mip
        f[i, 1] = uy * step / 2**mip
    f[:, :, 0, :4] += 0.25  # some non-constant content, balanced below
    f[:, :, 1, :4] -= 0.25
    residual, t = remove_translation(f, mip, coarsest)
    expect = [[HALVES[ux] * step, HALVES[uy] * step] for ux, uy in units]
    assert t.dtype == torch.int64 and t.tolist() == expect
    torch.testing.assert_close(residual + t.view(-1, 2, 1, 1) / 2**mip, f, atol=0, rtol=0)
    # a mask restricts the mean: only the top-left quarter, where the field is shifted by 0.25
    mask = torch.zeros(len(units), 1, 8, 8, dtype=torch.bool)
    mask[:, :, 0, :4] = True
    _, tm = remove_translation(f, mip, coarsest, mask)
    shifted = (f[:, :, 0, :4].mean(-1).double() * 2**mip / step).numpy()
    assert tm.tolist() == (np.floor(shifted + 0.5) * step).astype(np.int64).tolist()
    with pytest.raises(ValueError):
        remove_translation(f, coarsest + 1, coarsest)


# ----------------------------------------------------------------------------- download


def constant_field_volume(tmp_path, src_mip: int, means) -> str:
    """512^2 x len(means)+1 field volume with a constant field per section at ``src_mip``
    (section z = i + 1 holds means[i], px at src_mip; section 0 holds zeros)."""
    fld = url(tmp_path / "fld")
    volumes.create_volume(fld, (512, 512, len(means) + 1), 4, dtype="float32", num_channels=2,
                          chunk_xy=64)
    n = 512 >> src_mip
    f = torch.zeros(len(means) + 1, 2, n, n)
    for i, (mx, my) in enumerate(means):
        f[i + 1, 0], f[i + 1, 1] = mx, my
    volumes.write(fld, src_mip, 0, 0, 0, f)
    return fld


@pytest.mark.parametrize("src_mip, dst_mip", [(1, 0), (2, 1), (2, 2), (3, 1)])
def test_download_field_snaps_halves_up(tmp_path, src_mip, dst_mip):
    step = 2 ** max(src_mip, dst_mip)
    units = [(0.5, -0.5), (1.5, -2.5), (-1.5, 2.5)]
    means = [(ux * step / 2**src_mip, uy * step / 2**src_mip) for ux, uy in units]
    fld = constant_field_volume(tmp_path, src_mip, means)
    p = download.download_field(fld, str(tmp_path / "out"), 1, 4, 256, 256, src_mip, dst_mip,
                                32, "c", progress=False)
    d = datasets.read_field_dataset(p)
    assert d.translation.tolist() == [[HALVES[ux] * step, HALVES[uy] * step] for ux, uy in units]
    # what is left is the constant minus the snapped translation, at dst_mip
    full = np.array(means, np.float32) * 2 ** (src_mip - dst_mip)
    left = full - d.translation / 2**dst_mip
    np.testing.assert_array_equal(d.data, np.broadcast_to(left[:, :, None, None], d.data.shape))


def test_download_image_snaps_half_pixel_shifts_up(tmp_path):
    # Field cut at MIP 1 (translations multiples of 2 MIP0 px); images at MIPs 1 and 2, where a
    # translation of 2 or -6 MIP0 px is half a pixel (0.5 and -1.5 px at MIP 2).
    fld = constant_field_volume(tmp_path, 1, [(1.0, -1.0), (-3.0, 3.0)])
    fpath = download.download_field(fld, str(tmp_path / "out"), 1, 3, 256, 256, 1, 1, 32, "c",
                                    progress=False)
    t = datasets.read_field_dataset(fpath).translation
    assert t.tolist() == [[2, -2], [-6, 6]]
    img = url(tmp_path / "img")
    volumes.create_volume(img, (512, 512, 3), 4, chunk_xy=64)
    g = torch.Generator().manual_seed(0)
    for m in (1, 2):
        n = 512 >> m
        volumes.write(img, m, 0, 0, 0, torch.randint(1, 255, (3, 1, n, n), generator=g,
                                                     dtype=torch.uint8))
    paths = download.download_image(img, str(tmp_path / "out"), 1, 3, 256, 256, [1, 2], [32, 16],
                                    field_dset=fpath, progress=False)
    by_mip = {datasets.read_image_dataset(p).attrs["mip"]: datasets.read_image_dataset(p)
              for p in paths}
    assert by_mip[1].translation.tolist() == t.tolist()  # whole pixels at MIP 1: kept
    # at MIP 2: 0.5 -> 1, -0.5 -> 0, -1.5 -> -1, 1.5 -> 2 pixels
    assert by_mip[2].translation.tolist() == [[4, 0], [-4, 8]]
    for i, (dx, dy) in enumerate([(1, 0), (-1, 2)]):
        x0, y0 = 256 // 4 - 8 + dx, 256 // 4 - 8 + dy
        src = volumes.read(img, 2, x0, y0, i + 1, 16)[0, 0].numpy()
        np.testing.assert_array_equal(by_mip[2].data[i, 0], src)


# ----------------------------------------------------------------------------- generate


class ConstantAligner(torch.nn.Module):
    """Stands in for the pyramid in generate_fields: the same constant field for every pair."""

    field = (0.0, 0.0)  # px at the input MIP

    def __init__(self, stages, input_mip: int):
        super().__init__()
        self.stages = stages

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(src.shape[0], 2, *src.shape[-2:])
        out[:, 0], out[:, 1] = self.field
        return out


@pytest.mark.parametrize("shift", [(0.5, -1.5), (2.5, -0.5)])
def test_generate_and_download_agree_on_half_pixels(tiny_run, tmp_path, monkeypatch, shift):
    # The pyramid's coarsest MIP is 1, so translations snap to steps of 2 MIP0 px; generation at
    # stage 0 writes MIP 0 fields. A field of (0.5, -1.5) px at MIP 1 is (1, -3) MIP0 px, i.e.
    # (0.5, -1.5) steps: halves up give (2, -2) (round-half-to-even would give (0, -4)).
    stage0 = tiny_run.module(0)
    modules.save_weights(stage0, "half", nets.build_model(tiny_spec()).state_dict())
    monkeypatch.setattr(ConstantAligner, "field", (shift[0] * 2, shift[1] * 2))  # px at MIP 0
    monkeypatch.setattr(generate, "PyramidAligner", ConstantAligner)
    generate.generate_fields(str(tiny_run.pyramid), str(tiny_run.data), "half", 0)
    gen = datasets.read_field_dataset(
        str(tiny_run.data / datasets.field_filename(0, 128, 128, 1, 0, "half"))
    )
    n = len(gen.translation)
    assert gen.translation.tolist() == [[HALVES[shift[0]] * 2, HALVES[shift[1]] * 2]] * n
    recut = datasets.read_image_dataset(str(tiny_run.data / "x128_y128_z1_MIP0_half.h5"))
    np.testing.assert_array_equal(recut.translation, gen.translation)
    # download_field on the same field (px at MIP 1, cut at MIP 0) removes the same translation
    # and leaves the same residual
    fld = constant_field_volume(tmp_path, 1, [shift] * n)
    cut = datasets.read_field_dataset(download.download_field(
        fld, str(tmp_path / "out"), 1, 1 + n, 256, 256, 1, 0, 32, "c", progress=False
    ))
    np.testing.assert_array_equal(cut.translation, gen.translation)
    np.testing.assert_array_equal(cut.data[:, :, 0, 0], gen.data[:, :, 0, 0])
