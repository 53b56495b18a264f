"""metroem.regularize: local-linear field smoothing with a physical length."""

from __future__ import annotations

import math

import pytest
import torch

from metroem import regularize, synth
from metroem.errors import MetroemError


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster (and fair to a shared CPU); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _affine(h: int, w: int) -> torch.Tensor:
    m = torch.tensor([[[1.03, 0.02], [-0.05, 0.98]]])
    return synth.affine_field(m, torch.tensor([[10.0, -7.0]]), h, w)


@pytest.mark.parametrize("sigma", [2.0, 16.0, 64.0, 300.0])
def test_affine_field_is_kept_exactly_whatever_the_weights(sigma):
    gen = torch.Generator().manual_seed(0)
    h, w = 130, 171  # not multiples of the coarse grid
    aff = _affine(h, w)
    weight = (torch.rand(1, 1, h, w, generator=gen) > 0.5).float()
    weight[..., :, :60] = 0  # a no-data band
    out = regularize.smooth_field(aff, sigma, weight)
    assert (out - aff).abs().max() < 1e-3


def test_variation_shorter_than_sigma_is_averaged_away():
    gen = torch.Generator().manual_seed(1)
    aff = _affine(128, 128)
    noise = torch.randn(1, 2, 128, 128, generator=gen) * 2
    out = regularize.smooth_field(aff + noise, 16.0, robust_iterations=0)
    rms = (out - aff).pow(2).mean().sqrt()
    assert rms < 0.1 * noise.pow(2).mean().sqrt()


def test_smooth_distortion_longer_than_sigma_is_followed():
    gen = torch.Generator().manual_seed(2)
    slow = synth.elastic_field(1, 256, 256, std=2.0, scale=128, generator=gen)
    out = regularize.smooth_field(slow, 8.0)
    assert (out - slow).abs().median() < 0.05 * slow.abs().median()


def test_robust_weights_discount_a_far_match():
    """A patch pulled 20 px off (a wrong match) leaks much less into its surroundings."""
    field = torch.zeros(1, 2, 128, 128)
    field[:, 0, 56:72, 56:72] = 20.0
    ring = torch.zeros(128, 128, dtype=torch.bool)
    ring[40:88, 40:88] = True
    ring[56:72, 56:72] = False
    plain = regularize.smooth_field(field, 12.0, robust_iterations=0)
    robust = regularize.smooth_field(field, 12.0, robust_iterations=3)
    leak_plain = plain[0, 0][ring].abs().mean()
    leak_robust = robust[0, 0][ring].abs().mean()
    assert leak_robust < 0.5 * leak_plain


def test_a_padded_tile_gives_the_whole_image_result():
    gen = torch.Generator().manual_seed(3)
    sigma = 12.0  # coarse grid of 3 px: tile origins on multiples of 3
    field = synth.elastic_field(1, 420, 420, std=3.0, scale=24, generator=gen)
    field = field + torch.randn(1, 2, 420, 420, generator=gen)
    whole = regularize.smooth_field(field, sigma)
    pad = regularize.support_px(sigma)
    assert pad % 3 == 0
    y0, x0, size = 180, 180, 60
    tile = field[..., y0 - pad : y0 + size + pad, x0 - pad : x0 + size + pad]
    part = regularize.smooth_field(tile, sigma)[..., pad : pad + size, pad : pad + size]
    assert (part - whole[..., y0 : y0 + size, x0 : x0 + size]).abs().max() < 1e-4
    c = 60  # a pad well short of the support changes the result
    cut = regularize.smooth_field(tile[..., c:-c, c:-c], sigma)
    cut = cut[..., pad - c : pad - c + size, pad - c : pad - c + size]
    assert (cut - whole[..., y0 : y0 + size, x0 : x0 + size]).abs().max() > 1e-3


def test_batch_items_are_independent_and_it_is_differentiable():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1, 2, 64, 64, generator=gen)
    b = torch.randn(1, 2, 64, 64, generator=gen)
    both = regularize.smooth_field(torch.cat([a, b]), 8.0)
    assert torch.allclose(both[1:], regularize.smooth_field(b, 8.0), atol=1e-5)
    x = a.clone().requires_grad_(True)
    regularize.smooth_field(x, 8.0).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sigma_zero_is_the_identity_and_lengths_convert_to_pixels():
    f = torch.randn(1, 2, 16, 16)
    assert regularize.smooth_field(f, 0.0) is f
    assert regularize.sigma_px(640, 10) == 64.0
    assert regularize.sigma_px(640, 4, mip=2) == 40.0


def test_data_weight_marks_where_both_images_have_data():
    src = torch.ones(1, 1, 8, 8)
    src[..., :, :2] = 0
    tgt = torch.ones(1, 1, 8, 8)
    tgt[..., 0, :] = 0
    w = regularize.data_weight(src, tgt, torch.zeros(1, 2, 8, 8))
    assert w[0, 0, 0].sum() == 0 and w[0, 0, 3, :2].sum() == 0 and w[0, 0, 3, 2:].all()


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: regularize.sigma_px(-1, 4), "smoothing length"),
        (lambda: regularize.sigma_px(100, 0), "--resolution_nm"),
        (lambda: regularize.smooth_field(torch.zeros(1, 2, 8, 8), math.inf), "finite"),
        (lambda: regularize.smooth_field(torch.zeros(1, 2, 8, 8), 2.0, torch.ones(4, 4)),
         "does not match"),
    ],
)
def test_bad_arguments_name_the_problem(call, words):
    with pytest.raises(MetroemError, match=words):
        call()
