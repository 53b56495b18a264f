"""metroem.translation: phase correlation in torch, in metroem's pull convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metroem import fields, translation


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
