"""The field convention (metroem/fields.py): warp, compose, resample, invert, interop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metroem import fields


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster (and fair to a shared CPU); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_image(h: int, w: int, n: int = 1, c: int = 1, seed: int = 0) -> torch.Tensor:
    """A smooth float image (sum of low-frequency sinusoids); interpolation is nearly exact."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float64).view(h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, w)
    out = torch.zeros(n, c, h, w, dtype=torch.float64)
    for _ in range(4):
        fx, fy = (torch.rand(2, generator=g) * 0.15).tolist()
        ph = float(torch.rand(1, generator=g)) * 6.28
        amp = torch.rand(n, c, 1, 1, generator=g, dtype=torch.float64)
        out = out + amp * torch.sin(fx * xs + fy * ys + ph)
    return out.float()


def smooth_field(
    h: int, w: int, amp: float, n: int = 1, seed: int = 0, period: float = 40.0
) -> torch.Tensor:
    """A smooth pull field with displacements of about ``amp`` pixels."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float64).view(h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, w)
    ph = torch.rand(n, 2, 2, generator=g, dtype=torch.float64) * 6.28
    a = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * amp
    out = torch.empty(n, 2, h, w, dtype=torch.float64)
    for i in range(n):
        for ch in range(2):
            out[i, ch] = (
                a[i, ch]
                * torch.sin(xs / period + ph[i, ch, 0])
                * torch.cos(ys / period + ph[i, ch, 1])
            )
    return out.float()


def interior(t: torch.Tensor, m: int) -> torch.Tensor:
    return t[..., m:-m, m:-m]


# --- warp -------------------------------------------------------------------------------------


def test_identity_warp_is_exact():
    # float32 normalised coordinates round-trip to pixel centres within ~1e-7 relative error;
    # integer images are rounded back, so they come back bit-exact.
    img = torch.rand(2, 3, 17, 29) * 255
    out = fields.warp_image(img, fields.identity(2, 17, 29))
    assert torch.allclose(out, img, atol=1e-3, rtol=0)
    u8 = torch.randint(0, 256, (2, 1, 17, 29), dtype=torch.uint8)
    assert torch.equal(fields.warp_image(u8, fields.identity(2, 17, 29)), u8)
    f64 = img.double()
    out64 = fields.warp_image(f64, fields.identity(2, 17, 29, dtype=torch.float64))
    assert torch.allclose(out64, f64, atol=1e-9, rtol=0)


@pytest.mark.parametrize("h,w", [(12, 20), (21, 9)])
def test_integer_shift_moves_pixels_exactly(h, w):
    img = torch.rand(1, 1, h, w)
    f = fields.identity(1, h, w)
    f[:, 0] = 3  # channel 0 = x = last axis: out[y, x] = img[y, x + 3]
    out = fields.warp_image(img, f)
    assert torch.allclose(out[..., :, : w - 3], img[..., :, 3:], atol=1e-6)
    assert torch.all(out[..., :, w - 3 :] == 0)  # pulled from outside: no data

    f = fields.identity(1, h, w)
    f[:, 1] = -2  # channel 1 = y = second-to-last axis: out[y, x] = img[y - 2, x]
    out = fields.warp_image(img, f)
    assert torch.allclose(out[..., 2:, :], img[..., : h - 2, :], atol=1e-6)
    assert torch.all(out[..., :2, :] == 0)


def test_field_broadcasts_over_batch_and_channels():
    img = torch.rand(3, 2, 10, 14)
    f = fields.identity(1, 10, 14)
    f[:, 0] = 1
    out = fields.warp_image(img, f)
    assert torch.allclose(out[..., :-1], img[..., 1:], atol=1e-6)


def test_uint8_warp_keeps_dtype_and_values():
    img = torch.randint(1, 256, (1, 1, 8, 11), dtype=torch.uint8)
    f = fields.identity(1, 8, 11)
    f[:, 0] = 2
    out = fields.warp_image(img, f)
    assert out.dtype == torch.uint8
    assert torch.equal(out[..., :-2], img[..., 2:])
    half = fields.identity(1, 8, 11)
    half[:, 0] = 0.5
    mid = fields.warp_image(img, half)
    expect = ((img[..., :-1].float() + img[..., 1:].float()) / 2).round()
    assert mid.dtype == torch.uint8
    assert (mid[..., :-1].float() - expect).abs().max() <= 1


def test_bad_shapes_raise_value_error():
    img = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        fields.warp_image(img, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="spatial size"):
        fields.warp_image(img, torch.zeros(1, 2, 8, 9))
    with pytest.raises(ValueError, match="batch sizes"):
        fields.warp_image(torch.rand(3, 1, 8, 8), torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="src must have shape"):
        fields.warp_image(torch.rand(8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="floating"):
        fields.compose(torch.zeros(1, 2, 8, 8, dtype=torch.int64), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        fields.check_field([[0.0]])


def test_gradcheck_wrt_image_and_field():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 1, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    # Keep displacements away from integers: bilinear is not differentiable at pixel centres.
    f = (0.3 + 0.4 * torch.rand(1, 2, 5, 7, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(fields.warp_image, (img, f), eps=1e-6, atol=1e-5)


# --- compose ----------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(48, 64), (70, 40)])
def test_compose_equals_sequential_warps(h, w):
    first = smooth_field(h, w, amp=3.0, seed=1)
    second = smooth_field(h, w, amp=3.0, seed=2)
    h_field = fields.compose(first, second)

    # As fields: warping an identity-position "coordinate image" sequentially.
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    coords = torch.stack((xs, ys)).unsqueeze(0)
    seq = fields.warp_field(fields.warp_field(coords, first), second)
    one = fields.warp_field(coords, h_field)
    assert (interior(seq - one, 8)).abs().max() < 1e-3
    # Pulled position p + h(p) is where the two warps take each pixel from.
    assert (interior(one - coords - h_field, 8)).abs().max() < 1e-3

    # On a smooth image the composed warp matches two sequential warps.
    img = smooth_image(h, w, seed=3)
    a = fields.warp_image(fields.warp_image(img, first), second)
    b = fields.warp_image(img, h_field)
    assert interior(a - b, 8).abs().max() < 5e-3


def test_compose_many_and_identity():
    f1 = smooth_field(30, 50, 2.0, seed=4)
    f2 = smooth_field(30, 50, 2.0, seed=5)
    f3 = smooth_field(30, 50, 2.0, seed=6)
    ident = fields.identity(1, 30, 50)
    assert torch.allclose(fields.compose(f1, ident), f1, atol=1e-5)
    assert torch.allclose(fields.compose(ident, f1), f1, atol=1e-5)
    many = fields.compose_many([f1, f2, f3])
    assert torch.allclose(many, fields.compose(fields.compose(f1, f2), f3), atol=1e-6)
    with pytest.raises(ValueError):
        fields.compose_many([])


@settings(max_examples=15, deadline=None)
@given(
    tx1=st.floats(-4, 4),
    ty1=st.floats(-4, 4),
    tx2=st.floats(-4, 4),
    ty2=st.floats(-4, 4),
)
def test_translations_add_under_composition(tx1, ty1, tx2, ty2):
    a = fields.identity(1, 20, 30)
    a[:, 0], a[:, 1] = tx1, ty1
    b = fields.identity(1, 20, 30)
    b[:, 0], b[:, 1] = tx2, ty2
    c = fields.compose(a, b)
    expect = torch.tensor([tx1 + tx2, ty1 + ty2]).view(1, 2, 1, 1)
    assert torch.allclose(c, expect.expand_as(c), atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    amp=st.floats(0.1, 3.0),
    h=st.integers(24, 48),
    w=st.integers(24, 48),
)
def test_composition_property_random_smooth_fields(seed, amp, h, w):
    first = smooth_field(h, w, amp, seed=seed, period=15.0)
    second = smooth_field(h, w, amp, seed=seed + 1, period=15.0)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    coords = torch.stack((xs, ys)).unsqueeze(0)
    seq = fields.warp_field(fields.warp_field(coords, first), second)
    one = fields.warp_field(coords, fields.compose(first, second))
    m = math.ceil(2 * amp) + 2
    # Bilinear interpolation of the warped coordinate map is exact only up to curvature;
    # smooth fields with a 15 px period keep the difference well under 1e-3 px per px^2.
    assert interior(seq - one, m).abs().max() < 1e-2 * amp**2 + 1e-4


# --- resampling -------------------------------------------------------------------------------


def test_resample_scales_values():
    f = fields.identity(1, 32, 48)
    f[:, 0], f[:, 1] = 4.0, -2.0
    down = fields.resample_field(f, 0, 1)
    assert down.shape == (1, 2, 16, 24)
    assert torch.allclose(down[:, 0], torch.full((1, 16, 24), 2.0))
    assert torch.allclose(down[:, 1], torch.full((1, 16, 24), -1.0))
    down2 = fields.resample_field(f, 0, 2)
    assert down2.shape == (1, 2, 8, 12) and torch.allclose(down2[:, 0], torch.ones(1, 8, 12))
    up = fields.resample_field(down2, 2, 0)
    assert up.shape == f.shape and torch.allclose(up, f)


def test_down_up_round_trip_of_smooth_field():
    f = smooth_field(64, 96, amp=5.0, seed=7, period=30.0)
    back = fields.upsample_field(fields.downsample_field(f, 1), 1)
    assert back.shape == f.shape
    assert interior(back - f, 4).abs().max() < 0.05
    # Values are in pixels of each MIP: coarse values are half of the fine ones.
    coarse = fields.downsample_field(f, 1)
    assert torch.allclose(coarse[..., 5, 7], f[..., 10:12, 14:16].mean(dim=(-1, -2)) / 2)


def test_downsampled_warp_matches_fine_warp():
    # Same displacement seen at two MIPs: warping then downsampling ~ downsampling then warping.
    img = smooth_image(64, 80, seed=8)
    f = smooth_field(64, 80, amp=4.0, seed=9, period=40.0)
    fine = fields.downsample_image(fields.warp_image(img, f), 1, masked=False)
    coarse = fields.warp_image(
        fields.downsample_image(img, 1, masked=False), fields.downsample_field(f, 1)
    )
    assert interior(fine - coarse, 6).abs().max() < 0.05


def test_downsample_image_masked_keeps_borders():
    img = torch.zeros(1, 1, 4, 4)
    img[..., :, :1] = 100.0  # 1 valid column out of each 2x2 block's 2
    down = fields.downsample_image(img, 1)
    assert down[0, 0, 0, 0] == 100.0 and down[0, 0, 0, 1] == 0.0
    plain = fields.downsample_image(img, 1, masked=False)
    assert plain[0, 0, 0, 0] == 50.0
    u8 = fields.downsample_image(img.to(torch.uint8), 1)
    assert u8.dtype == torch.uint8 and u8[0, 0, 0, 0] == 100


def test_resample_image_up_and_down_shapes():
    img = torch.rand(1, 1, 16, 24)
    assert fields.resample_image(img, 0, 2).shape == (1, 1, 4, 6)
    assert fields.resample_image(img, 2, 0).shape == (1, 1, 64, 96)
    with pytest.raises(ValueError):
        fields.downsample_field(fields.identity(1, 4, 4), -1)


# --- mean translation, Jacobian, inverse, transpose --------------------------------------------


def test_mean_translation_with_and_without_mask():
    f = fields.identity(2, 10, 12)
    f[0, 0], f[0, 1] = 3.0, -1.0
    f[1, 0, :, :6] = 2.0  # left half moves by 2, right half by 0
    assert torch.allclose(fields.mean_translation(f), torch.tensor([[3.0, -1.0], [1.0, 0.0]]))
    mask = torch.zeros(2, 1, 10, 12)
    mask[:, :, :, :6] = 1
    mask[0] = 0  # empty mask -> 0
    t = fields.mean_translation(f, mask)
    assert torch.allclose(t, torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    t3 = fields.mean_translation(f, mask[:, 0])  # (N, H, W) masks are accepted too
    assert torch.allclose(t3, t)
    with pytest.raises(ValueError, match="mask size"):
        fields.mean_translation(f, torch.ones(2, 1, 5, 5))


def test_jacobian_determinant():
    h, w = 9, 13
    t = fields.identity(1, h, w)
    t[:, 0], t[:, 1] = 2.5, -7.0
    jac = fields.jacobian_determinant(t)
    assert jac.shape == (1, h - 1, w - 1)
    assert torch.allclose(jac, torch.ones_like(jac))

    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    scaled = torch.stack((0.2 * xs, -0.1 * ys)).unsqueeze(0)  # p -> (1.2 x, 0.9 y)
    jac = fields.jacobian_determinant(scaled)
    assert torch.allclose(jac, torch.full_like(jac, 1.2 * 0.9), atol=1e-5)

    fold = torch.stack((-1.5 * xs, torch.zeros_like(ys))).unsqueeze(0)  # p -> -0.5 x
    assert (fields.jacobian_determinant(fold) <= 0).all()


@pytest.mark.parametrize("h,w", [(60, 90), (80, 50)])
def test_invert_gives_identity_under_composition(h, w):
    f = smooth_field(h, w, amp=4.0, seed=11, period=25.0)  # |grad| ~ 0.16: fold-free
    inv = fields.invert(f)
    assert interior(fields.compose(f, inv), 10).abs().max() < 0.02
    assert interior(fields.compose(inv, f), 10).abs().max() < 0.05
    img = smooth_image(h, w, seed=12)
    back = fields.warp_image(fields.warp_image(img, f), inv)
    assert interior(back - img, 10).abs().max() < 0.02


def test_transpose_xy_matches_transposed_image():
    img = smooth_image(30, 44, seed=13)
    f = smooth_field(30, 44, amp=3.0, seed=14, period=12.0)
    f_t = fields.transpose_xy(f, is_field=True)
    assert f_t.shape == (1, 2, 44, 30)
    a = fields.warp_image(fields.transpose_xy(img), f_t)
    b = fields.transpose_xy(fields.warp_image(img, f))
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(fields.transpose_xy(f_t, is_field=True), f)


# --- torchfields interop ----------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(20, 36), (33, 17)])
def test_torchfields_interop_non_square(h, w):
    f = smooth_field(h, w, amp=3.0, seed=15, period=10.0)
    img = torch.rand(1, 1, h, w)
    tf = fields.to_torchfields(f)
    assert type(tf).__name__ == "DisplacementField"
    assert torch.allclose(
        torch.Tensor(tf.sample(img)).as_subclass(torch.Tensor),
        fields.warp_image(img, f),
        atol=1e-5,
    )
    back = fields.from_torchfields(tf)
    assert type(back) is torch.Tensor
    assert torch.allclose(back, f, atol=1e-5)


def test_to_normalized_units():
    f = fields.identity(1, 10, 40)
    f[:, 0], f[:, 1] = 20.0, 5.0
    n = fields.to_normalized(f)
    assert torch.allclose(n[:, 0], torch.ones(1, 10, 40))  # 20 px of W=40 -> 1.0
    assert torch.allclose(n[:, 1], torch.ones(1, 10, 40))  # 5 px of H=10 -> 1.0
    assert torch.allclose(fields.from_normalized(n), f)
