"""Tiled inference: chunk plans, window I/O, tiled field == whole field, devices, runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section
from PIL import Image
from torch import nn

import metroem
from metroem import demo_volume, fields, synth, tiling
from metroem.aligner import PyramidAligner
from metroem.errors import MetroemError

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny windows on a shared 2-core machine run far faster so."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sections(size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(Image.open(isbi_section(i))) for i in (0, 1))
    src = np.ascontiguousarray(a[5 : 5 + size, 7 : 7 + size])
    return src, np.ascontiguousarray(b[:size, :size])


class LocalStage(nn.Module):
    """A random conv stage with a bounded receptive field and no image-wide statistics.

    It follows the stage API (saturated field, pixels of its MIP), so the tiled field must equal
    the whole-image field exactly wherever the padding covers the receptive field.
    """

    stride = 4

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 2, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, src_img, tgt_img, src_agg_field=None, **kwargs):
        src, tgt = src_img.float() / 255, tgt_img.float() / 255
        if src_agg_field is not None:
            src = fields.warp_image(src, src_agg_field)
        res = self.c2(torch.tanh(self.c1(torch.cat((src, tgt), 1))))
        res = fields.upsample_field(torch.tanh(res) * 0.5, 2, size=tuple(src.shape[-2:]))
        return res if src_agg_field is None else fields.compose(src_agg_field, res)


def local_pyramid() -> PyramidAligner:
    return PyramidAligner([(2, LocalStage(1)), (1, LocalStage(2)), (0, LocalStage(3))]).eval()


def test_plan_chunks_cover_once():
    chunks = tiling.plan_chunks(70, 45, 32)
    cover = np.zeros((70, 45), int)
    for c in chunks:
        cover[c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w] += 1
    assert (cover == 1).all() and len(chunks) == 3 * 2
    assert [c.index for c in chunks] == list(range(6))


def test_chunking_must_fit_the_pyramid_grid():
    al = local_pyramid()
    assert al.size_multiple() == 16  # MIP 2 stage (x4) with a stride-4 net
    tiling.check_chunking(64, 32, 16)
    with pytest.raises(MetroemError, match="multiple of 16"):
        tiling.check_chunking(40, 32, 16)


def test_npy_window_io_round_trip(tmp_path):
    img = np.arange(37 * 23, dtype=np.uint16).reshape(37, 23)
    np.save(tmp_path / "a.npy", img)
    src = tiling.NpySource(str(tmp_path / "a.npy"))
    win = src.read(-3, 20, 10, 8)
    expected = np.zeros((10, 8), np.uint16)
    expected[3:, :3] = img[:7, 20:23]
    assert src.shape == (37, 23) and np.array_equal(win, expected)
    assert np.array_equal(tiling.ArraySource(img).read(-3, 20, 10, 8), expected)
    out = tiling.NpyWriter(str(tmp_path / "f.npy"), (2, 37, 23), np.float32, create=True)
    out.write(30, 10, np.ones((2, 7, 5), np.float32) * 2)
    back = np.load(tmp_path / "f.npy")
    assert back.shape == (2, 37, 23) and back[:, 30:, 10:15].min() == 2 and back.sum() == 2 * 70


def test_tiled_field_equals_whole_field_for_local_random_pyramid():
    al = local_pyramid()
    a, b = sections(256)
    with torch.no_grad():
        whole = al(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    assert whole.abs().max() > 1  # a real, varying field
    # stage-wise: pad in each stage's own pixels; the receptive field is ~14 of them
    tiled = tiling.align_tiled(al, a, b, chunk=64, pad=16)
    assert (tiled - whole).abs().max() < 1e-4  # everywhere: windows stop at the image border
    short = tiling.align_tiled(al, a, b, chunk=64, pad=4)
    assert (short - whole)[..., 64:-64, 64:-64].abs().max() > 0.01


def demo_pair(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A procedural section (cells ~40 px) deformed (shift ~6 px, elastic) and its neighbour."""
    stack = demo_volume.procedural_stack(2, h, w, seed=0, cell_px=40.0)
    g = torch.Generator().manual_seed(0)
    spec = synth.DeformationSpec(translation=6.0, rotation_deg=0.5, elastic=3.0,
                                 elastic_scale=128.0)
    d = synth.random_field(1, h, w, spec, generator=g)
    src = fields.warp_image(stack[:1].float(), d).round().clamp(0, 255).to(torch.uint8)
    return src[0, 0].numpy(), stack[1, 0].numpy()


def test_stagewise_tiling_of_the_trained_demo_pyramid_equals_whole_image():
    """The shipped trained pyramid (MIP 3, 2, 1) at input MIP 1, default per-stage pads.

    3072 x 768 px: tall enough that every stage's windows are cut (chunk 128 + pad 512 < 768
    rows at MIP 3), wide enough for cuts along x at MIP 1 (128 + 576 < 768), small enough for
    ~40 s on 1 thread. The pads grow with each stage's residual blur (8 / 16 / 32 px).
    """
    al = metroem.load_aligner(DEMO, input_mip=1)
    h, w = 3072, 768
    a, b = demo_pair(h, w)
    with torch.no_grad():
        whole = al(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    assert whole.abs().max() > 3  # the pyramid finds the shift
    tiler = tiling.StageTiler(al, h, w, chunk=128)
    assert [p.pad for p in tiler.plans] == [512, 528, 576]
    for p in tiler.coarse:  # every coarse stage has windows that end inside the image
        assert p.height > p.chunk + p.pad
    assert w > tiler.plans[-1].chunk + tiler.plans[-1].pad
    tiled = tiling.align_tiled(al, a, b, chunk=128)
    err = (tiled - whole).norm(dim=1)[0]
    interior = err[32:-32, 32:-32]
    assert interior.max() < 0.01 and interior.median() < 1e-3
    assert err.median() < 1e-3


def test_upsample_region_and_stores_match_whole_operations(tmp_path):
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 2, 13, 11, generator=g)
    mem = tiling.MemoryFieldStore(13, 11)
    mem.write(0, 0, coarse)
    disk = tiling.NpyFieldStore(str(tmp_path / "f.npy"), 13, 11, create=True)
    for c in tiling.plan_chunks(13, 11, 5):
        disk.write(c.y0, c.x0, coarse[..., c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w])
    # reads outside repeat the border
    ref = torch.nn.functional.pad(coarse, (3, 2, 2, 4), mode="replicate")
    for store in (mem, disk):
        assert torch.equal(store.read(-2, -3, 19, 16), ref)
    # any region of the upsampled field, from a crop: exactly the whole upsampling
    for levels in (1, 2):
        up = fields.upsample_field(coarse, levels)
        for y0, x0, hh, ww in ((0, 0, 7, 9), (5, 3, 20, 13), (13 * 2**levels - 6, 1, 6, 5)):
            part = tiling.upsample_region(disk.read, y0, x0, hh, ww, levels)
            assert torch.allclose(part, up[..., y0 : y0 + hh, x0 : x0 + ww], atol=1e-6)
    # images: the strip-wise masked box average equals the whole one
    img = np.asarray(Image.open(isbi_section(0)))[:96, :80].copy()
    img[:40, :30] = 0  # no data
    whole = fields.downsample_image(torch.from_numpy(img)[None, None].float(), 2)
    got = tiling.read_resampled(tiling.ArraySource(img), 2, 4, -2, 16, 20)
    expected = torch.zeros(1, 1, 16, 20)
    expected[..., :, 2:] = whole[..., 4:20, :18]
    assert torch.equal(got, expected)


def test_stage_tiler_checks_its_settings():
    al = local_pyramid()
    assert tiling.StageTiler(al, 100, 70, 32).plans[0].pad % 4 == 0
    with pytest.raises(MetroemError, match="multiple of 16"):
        tiling.StageTiler(al, 100, 70, 40)
    with pytest.raises(MetroemError, match="--pad 6 must be a multiple of 4"):
        tiling.StageTiler(al, 100, 70, 32, pad=6)
    al.input_mip = 1  # a stage at MIP 0 is finer than the input
    with pytest.raises(MetroemError, match="MIP 0"):
        tiling.StageTiler(al, 100, 70, 32)


def test_warp_chunk_matches_whole_warp():
    a, _ = sections(96)
    f = torch.zeros(1, 2, 96, 96)
    f[:, 0] = 6.3
    f[:, 1] = torch.linspace(-4, 4, 96).view(96, 1)
    whole = fields.warp_image(torch.from_numpy(a)[None, None].float(), f)
    for c in tiling.plan_chunks(96, 96, 40):
        part = f[..., c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w]
        got = tiling.warp_chunk(tiling.ArraySource(a), part, c)
        ref = whole[..., c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w]
        assert torch.allclose(got, ref, atol=1e-3)


def test_run_chunks_skips_done_and_reraises():
    al = local_pyramid()
    seen = []
    ran = tiling.run_chunks(range(6), lambda m, j: seen.append(j), al, [torch.device("cpu")],
                            is_done=lambda j: j % 2 == 0, progress=False)
    assert ran == 3 and seen == [1, 3, 5]

    def boom(model, job):
        raise RuntimeError(f"job {job} failed")

    with pytest.raises(RuntimeError, match="job 0 failed"):
        tiling.run_chunks(range(3), boom, al, [torch.device("cpu")], progress=False)


def test_stage_chunks_spread_over_two_workers_match_one():
    al = local_pyramid()
    a, b = sections(128)
    one = tiling.align_tiled(al, a, b, chunk=32, pad=8)
    two = tiling.align_tiled(al, a, b, chunk=32, pad=8, devices=[torch.device("cpu")] * 2)
    assert one.abs().max() > 1 and torch.equal(one, two)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_chunks_on_gpu_match_cpu():
    al = local_pyramid()
    a, b = sections(128)
    cpu = tiling.align_tiled(al, a, b, chunk=64, pad=32)
    gpu = tiling.align_tiled(al.to("cuda"), a, b, chunk=64, pad=32)
    assert torch.allclose(cpu, gpu, atol=1e-3)
    demo_cpu = metroem.load_aligner(DEMO, input_mip=1)
    a, b = demo_pair(512, 512)
    ref = tiling.align_tiled(demo_cpu, a, b, chunk=128)
    got = tiling.align_tiled(demo_cpu, a, b, chunk=128, devices=[torch.device("cuda")])
    assert (ref - got).norm(dim=1).median() < 1e-3


def test_stage_wise_tiling_equals_whole_image_for_the_shipped_isbi_pyramid():
    # The real-EM pyramid (Lucas-Kanade step, residual blur, local normalisation): with the
    # default per-stage pads the tiled field matches one whole-image call everywhere.
    root = Path(__file__).resolve().parents[1] / "models" / "isbi"
    al = metroem.load_aligner(str(root), input_mip=0).eval()
    secs = [np.asarray(Image.open(isbi_section(i)), np.float32) for i in (5, 6, 7, 8)]
    src = np.concatenate((secs[1][:256], secs[3][:256]), 1)  # 256 x 1024
    tgt = np.concatenate((secs[0][:256], secs[2][:256]), 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            whole = al(torch.from_numpy(src)[None, None], torch.from_numpy(tgt)[None, None])
        tiled = tiling.align_tiled(al, src, tgt, chunk=128)
    finally:
        torch.set_num_threads(threads)
    d = (tiled - whole).norm(dim=1)[0]
    # Everywhere, border rows included: no-data is treated as the outside of the image
    # (nodata_aware), so a window's edge and the image's edge look the same to the network
    # (0.005 px at most when measured; up to 0.25 px on the outermost rows before).
    assert d.max() < 0.01, float(d.max())
    assert d.median() < 1e-4, float(d.median())
    assert whole.abs().max() > 1.0  # the pair really needed aligning
