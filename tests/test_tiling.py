"""Tiled inference: chunk plans, window I/O, tiled field == whole field, devices, runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from metroem import fields, tiling
from metroem.aligner import PyramidAligner
from metroem.errors import MetroemError
from metroem.sample_data import isbi_dir

ISBI = isbi_dir()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny windows on a shared 2-core machine run far faster so."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sections(size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(Image.open(ISBI / f"{i:02d}.png")) for i in (0, 1))
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
    tiled = tiling.align_tiled(al, a, b, chunk=64, pad=64)
    assert whole.abs().max() > 1  # a real, varying field
    interior = (tiled - whole)[..., 64:-64, 64:-64].abs().max()
    assert interior < 1e-4  # well within 0.01 px
    # too little padding for the receptive field (about 40 px at MIP0) shows up
    short = tiling.align_tiled(al, a, b, chunk=64, pad=16)
    assert (short - whole)[..., 64:-64, 64:-64].abs().max() > 0.01


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


def test_parse_devices():
    assert tiling.parse_devices("cpu") == [torch.device("cpu")]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert len(tiling.parse_devices("all")) == max(1, n)
    with pytest.raises(MetroemError) as e:
        tiling.parse_devices(f"{n},{n + 2}")
    assert "\n" not in str(e.value) and "not available" in str(e.value)
    with pytest.raises(MetroemError):
        tiling.parse_devices("fast")
    if n == 0:
        with pytest.raises(MetroemError, match="no GPU"):
            tiling.parse_devices("gpu")
    else:
        assert tiling.parse_devices("gpu") == [torch.device("cuda:0")]


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_chunks_on_gpu_match_cpu():
    al = local_pyramid()
    a, b = sections(128)
    cpu = tiling.align_tiled(al, a, b, chunk=64, pad=32)
    gpu = tiling.align_tiled(al.to("cuda"), a, b, chunk=64, pad=32)
    assert torch.allclose(cpu, gpu, atol=1e-3)
