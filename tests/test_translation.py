"""metroem.translation: phase correlation in torch, in metroem's pull convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metroem import fields, regularize, translation


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, h // 8, w // 8, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False) * 150 + 50


def test_known_shift_on_odd_sizes_and_large_images():
    for h, w, shift in ((201, 333, (13.0, -7.0)), (1200, 700, (-40.0, 25.0))):
        img = _image(h, w)
        t = torch.tensor([shift])
        src = fields.warp_image(img, translation.translation_field(-t, h, w))
        # src(p + t) = img(p): the pull shift aligning src onto img is t
        got = translation.phase_translation(src, img)
        assert torch.allclose(got, t, atol=0.3), (got, t)
        back = fields.warp_image(src, translation.translation_field(got, h, w))
        inner = (slice(60, -60), slice(60, -60))
        assert (back - img)[..., inner[0], inner[1]].abs().median() < 2.0


def test_items_without_data_get_zero_and_batches_are_per_item():
    img = _image(96, 96)
    empty = torch.zeros_like(img)
    t = torch.tensor([[5.0, 3.0]])
    src = fields.warp_image(img, translation.translation_field(-t, 96, 96))
    got = translation.phase_translation(torch.cat([src, empty]), torch.cat([img, img]))
    assert torch.allclose(got[0], t[0], atol=0.3) and got[1].abs().max() == 0


def test_shading_does_not_decide_the_shift():
    """Neighbouring sections (the tissue partly changed), each shaded differently: the target
    darker to the right, the source a gain ramp of 0.4 to 1.6 (strongly uneven illumination).
    The shift is still the tissue's; correlating plainly normalised images, the shading wins
    and the shift lands far off (at 0.6 to 1.4 the significance score alone holds it)."""
    h = w = 256

    def texture(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = regularize._gaussian_blur(torch.randn(1, 1, h, w, generator=g), 2.0)
        return x / x.std()

    a, b = texture(4), texture(104)
    shade = -torch.linspace(-1, 1, w)
    tgt = (128 + 25 * a + 40 * shade).clamp(1, 255)
    neighbour = (128 + 25 * (0.6 * a + 0.8 * b) + 40 * shade).clamp(1, 255)
    t = torch.tensor([[40.0, -22.0]])
    src = fields.warp_image(neighbour, translation.translation_field(-t, h, w))
    src = src * torch.linspace(0.4, 1.6, w)
    got = translation.phase_translation(src, tgt)
    assert torch.allclose(got, t, atol=0.5), got
    plain = translation._flattened  # without the local normalisation (the method before it)
    try:
        translation._flattened = lambda x: x
        assert (translation.phase_translation(src, tgt) - t).norm() > 20
    finally:
        translation._flattened = plain


def test_a_repeated_half_does_not_pull_the_shift_by_half_the_image():
    """Two noisy images of a texture that repeats across their halves match as well per pixel
    at a shift of half the width as at 0, over half the pixels: the whole-image match wins
    (with the mean correlation per overlapping pixel the two tied, and noise picked one)."""
    h, w = 96, 256
    tile = _image(h, w // 2, seed=3)
    clean = torch.cat([tile, tile], dim=-1)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        src = clean + 20 * torch.randn(clean.shape, generator=g)
        tgt = clean + 20 * torch.randn(clean.shape, generator=g)
        got = translation.phase_translation(src.clamp(1, 255), tgt.clamp(1, 255))
        assert got.abs().max() < 1.0, (seed, got)
