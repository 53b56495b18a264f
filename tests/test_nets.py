"""Stage aligner network: shapes, saturated semantics, spec round trip, learning."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import isbi_section
from PIL import Image

from metroem import fields, nets


def _tiny(**over) -> dict:
    base = dict(channels=[4, 8], local_radius=1, head_channels=4, global_radius=2,
                global_translation=True)
    base.update(over)
    return nets.default_spec(**base)


def _isbi(i: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(isbi_section(i)))).float()[None, None]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Tiny tensors: one thread is faster and does not stall when the CPUs are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (5, 90), (1, 1)])
def test_output_shape_any_size(hw):
    model = nets.build_model(nets.default_spec())
    src = torch.randint(1, 255, (2, 1, *hw), dtype=torch.uint8)
    out = model(src, src.clone())
    assert out.shape == (2, 2, *hw) and out.dtype == torch.float32


def test_identity_at_init_without_priors_and_uint8_input():
    # Without the block-matching prior and with the global head's gain at 0, the residual heads'
    # zero-initialised last layers make an untrained net the identity.
    model = nets.build_model(nets.default_spec(local_prior=False, global_gain_init=0.0))
    src = torch.randint(1, 255, (1, 1, 40, 48), dtype=torch.uint8)
    tgt = torch.randint(1, 255, (1, 1, 40, 48), dtype=torch.uint8)
    out = model(src, tgt, tgt_agg_field=None, src_mask=None)  # corgie's extra kwargs ignored
    assert out.abs().max() < 1e-6


def test_untrained_block_matching_prior_recovers_a_shift_on_real_em():
    # The prior alone (untrained heads) is a multi-scale block matcher: on a real section moved
    # by a known sub-pixel translation it finds the shift; on identical images it stays ~0.
    img = _isbi(3)[..., :256, :256]
    true = torch.tensor([3.4, -2.6]).view(1, 2, 1, 1).expand(1, 2, 256, 256)
    src = fields.warp_image(img, -true)  # src(p) = img(p - t): warping src by t gives img back
    model = nets.build_model(nets.default_spec())
    with torch.no_grad():
        out = model(src, img)
        same = model(img, img)
    inner = (slice(None), slice(None), slice(48, -48), slice(48, -48))
    err = (out - true)[inner].norm(dim=1)
    assert err.median() < 1.0, float(err.median())  # of a 4.3 px shift; training sharpens it
    assert same[inner].norm(dim=1).median() < 0.05


def test_saturated_output_is_compose_of_incoming_and_residual():
    model = nets.build_model(_tiny())
    with torch.no_grad():  # make the net non-trivial
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    src, tgt = torch.rand(2, 1, 24, 20) + 0.1, torch.rand(2, 1, 24, 20) + 0.1
    t = 2 * torch.randn(2, 2, 1, 1).expand(2, 2, 24, 20).contiguous()
    out = model(src, tgt, src_agg_field=t)
    res = model(fields.warp_image(src, t), tgt)
    assert res.abs().max() > 1e-3
    assert torch.allclose(out, fields.compose(t, res), atol=1e-5)


def test_no_data_returns_incoming_field():
    model = nets.build_model(_tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    agg = torch.randn(2, 2, 16, 16)
    src = torch.zeros(2, 1, 16, 16)
    src[1] = torch.rand(1, 16, 16) + 0.1
    out = model(src, torch.rand(2, 1, 16, 16) + 0.1, src_agg_field=agg)
    assert torch.equal(out[0], agg[0])  # item 0 has no data
    assert model(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)).abs().max() == 0


def test_spec_round_trip_and_json():
    model = nets.build_model(_tiny(smooth_output=False, concat_features=True))
    spec = json.loads(json.dumps(model.spec))
    clone = nets.build_model(spec)
    clone.load_state_dict(model.state_dict())
    x, y = torch.rand(1, 1, 16, 16) + 0.1, torch.rand(1, 1, 16, 16) + 0.1
    assert torch.equal(clone(x, y), model(x, y))
    assert not hasattr(type(model), "train") or type(model).train is torch.nn.Module.train


def test_bad_specs_raise_value_error_naming_the_key():
    with pytest.raises(ValueError, match="chanels"):
        nets.build_model({"chanels": [4]})
    with pytest.raises(ValueError, match="finest_level"):
        nets.default_spec(finest_level=9)
    with pytest.raises(ValueError, match="local_radius"):
        nets.default_spec(local_radius=[1, 2])


def test_levels_shorthand_trims_per_level_lists():
    spec = nets.default_spec(levels=3)
    assert len(spec["channels"]) == 2 and len(spec["head_channels"]) == 3
    assert nets.build_model(spec).num_levels == 3


def test_gradients_reach_every_parameter():
    model = nets.build_model(_tiny(concat_features=True))
    with torch.no_grad():
        model.global_head.gain.fill_(1.0)
        for head in model.heads.values():
            head.net[-1].weight.normal_(0, 0.1)
    src, tgt = torch.rand(2, 1, 20, 20) + 0.1, torch.rand(2, 1, 20, 20) + 0.1
    model(src, tgt).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_finite_with_a_no_data_item():
    model = nets.build_model(_tiny())
    with torch.no_grad():
        model.global_head.gain.fill_(1.0)
    src = torch.rand(2, 1, 16, 16) + 0.1
    src[0] = 0
    out = model(src, torch.rand(2, 1, 16, 16) + 0.1, src_agg_field=torch.zeros(2, 2, 16, 16))
    out.sum().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_count_parameters():
    model = nets.build_model(_tiny())
    assert nets.count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_soft_argmax_finds_the_peak_of_a_cost_volume():
    r = 3
    scores = torch.zeros(2, (2 * r + 1) ** 2)
    scores[0, (2 + r) * (2 * r + 1) + (-1 + r)] = 1.0  # dy=2, dx=-1
    scores[1, (0 + r) * (2 * r + 1) + (3 + r)] = 1.0  # dy=0, dx=3
    t = nets.soft_argmax_translation(scores, r, temperature=20.0)
    assert torch.allclose(t, torch.tensor([[-1.0, 2.0], [3.0, 0.0]]), atol=1e-3)
    uniform = nets.soft_argmax_translation(torch.rand(1, 49), r, temperature=0.0)
    assert uniform.abs().max() < 1e-5  # symmetric window, uniform weights -> no shift


def test_global_head_recovers_integer_translation_of_features():
    head = nets.GlobalTranslation(radius=4, temperature=20.0)
    with torch.no_grad():
        head.gain.fill_(1.0)
    ft = torch.randn(1, 16, 24, 24)
    fs = torch.roll(ft, shifts=(-2, 3), dims=(2, 3))  # fs[y, x] = ft[y + 2, x - 3]
    # so fs(p + (dx=3, dy=-2)) = ft(p): the pull translation is (3, -2)
    ones = torch.ones(1, 1, 24, 24)
    t = head(ft, fs, ones, ones)
    assert torch.allclose(t, torch.tensor([[3.0, -2.0]]), atol=0.05)


def test_tiny_net_overfits_a_translated_pair():
    img = _isbi(0)
    tgt = img[..., 100:164, 100:164]
    src = img[..., 97:161, 104:168]  # src(p + (-4, 3)) = tgt(p)
    # Prior off and global gain at 0: the net starts at the identity and must learn the shift.
    spec = nets.default_spec(
        levels=3, global_translation=True, global_radius=2, local_prior=False, global_gain_init=0.0
    )
    model = nets.build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tn = nets.normalize_image(tgt)[0]
    sn = nets.normalize_image(src)[0]
    losses = []
    for _ in range(40):
        warped = fields.warp_image(sn, model(src, tgt))
        valid = ((warped != 0) & (tn != 0)).float()
        loss = ((warped - tn) ** 2 * valid).sum() / valid.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert min(losses[-5:]) < 0.2 * losses[0]
    with torch.no_grad():
        t = fields.mean_translation(model(src, tgt)[..., 16:-16, 16:-16])[0]
    assert (t - torch.tensor([-4.0, 3.0])).norm() < 0.75


def test_per_level_lists_follow_the_number_of_levels():
    short = nets.default_spec(channels=[4, 8])
    assert len(short["local_radius"]) == len(short["head_channels"]) == 3
    deep = nets.default_spec(channels=[4, 8, 8, 8, 8, 8])
    assert len(deep["local_radius"]) == 7 and deep["local_radius"][-1] == deep["local_radius"][4]
    out = nets.build_model(short)(torch.rand(1, 1, 32, 32) + 0.1, torch.rand(1, 1, 32, 32) + 0.1)
    assert out.shape == (1, 2, 32, 32)


def test_lucas_kanade_step_recovers_a_sub_pixel_shift_and_ignores_no_data():
    # One Gauss-Newton step on a real section moved by a known sub-pixel shift: the update is the
    # shift to within a few hundredths of a pixel; where the weight is 0 there is no update.
    img = _isbi(5)[..., :128, :128]
    img = (img - img.mean()) / img.std()
    t = torch.tensor([0.35, -0.2]).view(1, 2, 1, 1).expand(1, 2, 128, 128)
    warped = fields.warp_image(img, -t)  # pulling warped by +t gives img back
    weight = torch.ones(1, 1, 128, 128)
    weight[..., :, :64] = 0
    step = nets.lucas_kanade_step(warped, img, weight, nets._gaussian_kernel(4.0))
    right = step[..., 24:-24, 80:-24]
    assert (right - t[..., :1, :1]).norm(dim=1).median() < 0.05
    assert step[..., :, :40].abs().max() < 1e-6  # farther than the window from any weight
    same = nets.lucas_kanade_step(img, img, weight, nets._gaussian_kernel(4.0))
    assert same.abs().max() < 1e-6


def test_lk_refinement_sharpens_an_untrained_stage_and_keeps_state_dict_keys():
    img = _isbi(3)[..., :256, :256]
    true = torch.tensor([1.3, -0.7]).view(1, 2, 1, 1).expand(1, 2, 256, 256)
    src = fields.warp_image(img, -true)
    plain = nets.build_model(nets.default_spec())
    refined = nets.build_model(nets.default_spec(lk_iterations=2))
    refined.load_state_dict(plain.state_dict())  # no new parameters or persistent buffers
    inner = (slice(None), slice(None), slice(48, -48), slice(48, -48))
    with torch.no_grad():
        e0 = (plain(src, img) - true)[inner].norm(dim=1).median()
        e1 = (refined(src, img) - true)[inner].norm(dim=1).median()
    assert e1 < 0.5 * e0 and e1 < 0.1, (float(e0), float(e1))
    with pytest.raises(ValueError, match="lk_iterations"):
        nets.default_spec(lk_iterations=-1)
    with pytest.raises(ValueError, match="lk_sigma"):
        nets.default_spec(lk_sigma=0)


def test_residual_sigma_blurs_the_stage_residual_and_adds_no_state():
    # The stage's residual is the unsmoothed one, blurred (192 px is a multiple of the net's
    # stride, so no padding is involved), and on a smooth known deformation of a real section
    # the blur does not move the field off target.
    img = _isbi(7)[..., :192, :192]
    yy, xx = torch.meshgrid(torch.arange(192.0), torch.arange(192.0), indexing="ij")
    true = torch.stack((1.5 * torch.sin(yy / 40), 1.0 * torch.cos(xx / 50)))[None]
    src = fields.warp_image(img, fields.invert(true))
    plain = nets.build_model(nets.default_spec())
    smooth = nets.build_model(nets.default_spec(residual_sigma=6.0))
    smooth.load_state_dict(plain.state_dict())  # no new parameters or persistent buffers
    with torch.no_grad():
        a, b = plain(src, img), smooth(src, img)
    inner = (slice(None), slice(None), slice(40, -40), slice(40, -40))
    # blurred at the finest level (half resolution) and upsampled ~ blurred at full resolution
    full = nets.gaussian_blur(a, nets._gaussian_kernel(6.0))
    assert (b - full)[inner].abs().max() < 0.02, float((b - full)[inner].abs().max())
    assert (b - a).abs().max() > 1e-3  # it did something
    err_a = (a - true)[inner].norm(dim=1).median()
    err_b = (b - true)[inner].norm(dim=1).median()
    assert err_b < err_a + 0.05, (float(err_a), float(err_b))
    with pytest.raises(ValueError, match="residual_sigma"):
        nets.default_spec(residual_sigma=-1.0)


def test_iterations_run_the_stage_again_from_its_own_field():
    img = _isbi(3)[..., :128, :128]
    true = torch.tensor([2.6, -1.4]).view(1, 2, 1, 1).expand(1, 2, 128, 128)
    src = fields.warp_image(img, -true)
    torch.manual_seed(0)
    once = nets.build_model(nets.default_spec(levels=3))
    twice = nets.build_model(nets.default_spec(levels=3, iterations=2))
    twice.load_state_dict(once.state_dict())  # parameter-free: same weights
    agg = torch.zeros(1, 2, 128, 128)
    agg[:, 0] = 0.5
    with torch.no_grad():
        first = once(src, img)
        assert torch.allclose(twice(src, img), once(src, img, src_agg_field=first), atol=1e-5)
        step = once(src, img, src_agg_field=agg)
        assert torch.allclose(twice(src, img, src_agg_field=agg),
                              once(src, img, src_agg_field=step), atol=1e-5)
    assert (first - twice(src, img)).abs().max() > 1e-3  # the second pass did something
    with pytest.raises(ValueError, match="iterations"):
        nets.default_spec(iterations=0)
    # the tiling pad covers every pass
    from metroem import tiling
    q = tiling.stage_quantum(once)
    assert tiling.default_stage_pad(twice) >= 2 * (tiling.default_stage_pad(once) - q)
    assert tiling.default_stage_pad(twice) > tiling.default_stage_pad(once)


def test_level_smooth_sigma_overrides_the_blur_of_chosen_levels_only():
    img = _isbi(5)[..., :128, :128]
    src = fields.warp_image(img, torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 128, 128))
    base = nets.build_model(nets.default_spec(levels=4))
    same = nets.build_model(nets.default_spec(levels=4, level_smooth_sigma=[1.0] * 4))
    wide = nets.build_model(nets.default_spec(levels=4, level_smooth_sigma=[1, 1, 1, 4.0]))
    # parameter-free: the same weights load, and no state is added
    same.load_state_dict(base.state_dict())
    wide.load_state_dict(base.state_dict())
    assert set(wide.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        a, b, c = base(src, img), same(src, img), wide(src, img)
    assert torch.equal(a, b)  # smooth_sigma at every level == no override
    assert (a - c).abs().max() > 1e-3  # the coarsest level's blur changed the field
    # the blur is applied where it should be: an override of an unrefined level does nothing
    fine = nets.build_model(nets.default_spec(levels=4, finest_level=1,
                                              level_smooth_sigma=[9.0, 1, 1, 1]))
    fine.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.equal(fine(src, img), base(src, img))
    # the tiling pad covers the wider blur
    from metroem import tiling
    assert tiling.default_stage_pad(wide) > tiling.default_stage_pad(base)
    assert tiling.default_stage_pad(fine) == tiling.default_stage_pad(base)  # level 0 unused
    with pytest.raises(ValueError, match="level_smooth_sigma"):
        nets.default_spec(levels=4, level_smooth_sigma=[1.0, 2.0])
    with pytest.raises(ValueError, match="level_smooth_sigma"):
        nets.default_spec(levels=4, level_smooth_sigma=[1.0, 1.0, 1.0, -1.0])


def test_prior_factor_gives_nearly_the_same_cost_volume_on_a_coarser_grid():
    # The NCC sums of a real section and its shifted copy, taken on a 2x coarser grid, pick the
    # same best shift almost everywhere and correlate closely with the full-resolution ones.
    img = _isbi(4)[..., :128, :128]
    img = (img - img.mean()) / img.std()
    src = fields.warp_image(img, torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 128, 128))
    k = nets._gaussian_kernel(5.0)
    fine = nets.local_ncc_cost(img, src, 2, k)
    coarse = nets.local_ncc_cost(img, src, 2, k, factor=2, coarse_kernel=nets._gaussian_kernel(2.5))
    assert coarse.shape == fine.shape
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    agree = (fine.argmax(1) == coarse.argmax(1))[..., 16:-16, 16:-16].float().mean()
    assert agree > 0.95, float(agree)
    r = torch.corrcoef(torch.stack((fine[inner].flatten(), coarse[inner].flatten())))[0, 1]
    assert r > 0.95, float(r)
    # odd sizes: the coarse grid is cut from the same place, the answer cropped back
    odd = nets.local_ncc_cost(img[..., :77, :91], src[..., :77, :91], 1, k, 2,
                              nets._gaussian_kernel(2.5))
    assert odd.shape == (1, 9, 77, 91)


def test_prior_factor_is_checked_and_kept_on_the_tiling_grid():
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match="prior_factor"):
            nets.default_spec(prior_factor=bad)
    model = nets.build_model(nets.default_spec(prior_factor=2))  # 5 levels, stride 16, grid 16
    assert model.grid == 16
    assert model.prior_factors == [2, 2, 2, 2, 1]  # level 4 at factor 2 would need a 32 grid
    small = nets.build_model(nets.default_spec(channels=[8, 16], prior_factor=4))  # stride 4
    assert small.grid == 8 and small.prior_factors == [4, 4, 1]
    plain = nets.build_model(nets.default_spec())
    assert set(plain.state_dict()) == set(model.state_dict())  # parameter-free


def test_prior_factor_changes_the_field_of_an_untrained_stage_little():
    img = _isbi(3)[..., :256, :256]
    true = torch.tensor([2.3, -1.6]).view(1, 2, 1, 1).expand(1, 2, 256, 256)
    src = fields.warp_image(img, -true)
    plain = nets.build_model(nets.default_spec())
    fast = nets.build_model(nets.default_spec(prior_factor=2))
    fast.load_state_dict(plain.state_dict())
    inner = (slice(None), slice(None), slice(48, -48), slice(48, -48))
    with torch.no_grad():
        e0 = (plain(src, img) - true)[inner].norm(dim=1).median()
        e1 = (fast(src, img) - true)[inner].norm(dim=1).median()
    assert e1 < max(2 * e0, 0.3), (float(e0), float(e1))


def test_a_stage_without_learned_levels_is_its_lucas_kanade_steps_alone(monkeypatch):
    # learned_levels: false runs no encoder and no head; the field is the LK steps from zero on
    # the normalised images, which recovers a sub-pixel shift. The weights stay loadable.
    img = _isbi(6)[..., :128, :128]
    true = torch.tensor([0.6, -0.4]).view(1, 2, 1, 1).expand(1, 2, 128, 128)
    src = fields.warp_image(img, -true)
    learned = nets.build_model(nets.default_spec(channels=[8, 16], lk_iterations=2))
    model = nets.build_model(
        nets.default_spec(channels=[8, 16], lk_iterations=2, learned_levels=False)
    )
    model.load_state_dict(learned.state_dict())  # same keys: switch either way in the spec
    assert not model.learned

    def no_encoder(x):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(model.encoder, "forward", no_encoder)
    with torch.no_grad():
        field = model(src, img)
        _, _, x = model._inputs(src, img)
        direct = model._lucas_kanade(x[:1], x[1:], fields.identity(1, 128, 128))
    assert torch.allclose(field, direct, atol=1e-6)
    assert (field - true)[..., 24:-24, 24:-24].norm(dim=1).median() < 0.1
    with pytest.raises(ValueError, match="lk_iterations"):
        nets.default_spec(learned_levels=False)
    with pytest.raises(ValueError, match="learned_levels"):
        nets.default_spec(learned_levels="no", lk_iterations=1)


def test_channels_last_convolutions_give_the_same_field(monkeypatch):
    img = _isbi(2)[..., :128, :128]
    src = fields.warp_image(img, torch.full((1, 2, 128, 128), 1.5))
    torch.manual_seed(3)
    fast = nets.build_model(nets.default_spec(channels=[8, 16, 24]))
    assert fast.heads["1"].net[0].weight.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(nets, "CONV_FORMAT", torch.contiguous_format)
    plain = nets.build_model(nets.default_spec(channels=[8, 16, 24]))
    plain.load_state_dict(fast.state_dict())
    assert plain.heads["1"].net[0].weight.is_contiguous()
    with torch.no_grad():
        a = plain(src, img)
        monkeypatch.setattr(nets, "CONV_FORMAT", torch.channels_last)
        b = fast(src, img)
    assert a.abs().max() > 0.5  # a real field
    assert (a - b).abs().max() < 1e-3, float((a - b).abs().max())


def test_nodata_aware_ncc_and_blur_treat_no_data_like_the_outside_of_the_image():
    # With validity masks, the NCC cost volume and the masked blur of an image padded with
    # no-data equal those of the unpadded image exactly, border included.
    img = _isbi(8)[..., :96, :96]
    img = (img - img.mean()) / img.std()
    src = fields.warp_image(img, torch.full((1, 2, 96, 96), 0.7))
    k = nets._gaussian_kernel(3.0)
    ones = torch.ones(1, 1, 96, 96)
    alone = nets.local_ncc_cost(img, src, 1, k, valid=(ones, ones))
    p = 24
    pad = lambda t: torch.nn.functional.pad(t, (p, p, p, p))  # noqa: E731
    padded = nets.local_ncc_cost(pad(img), pad(src), 1, k, valid=(pad(ones), pad(ones)))
    assert torch.allclose(padded[..., p:-p, p:-p], alone, atol=1e-4)
    plain = nets.local_ncc_cost(pad(img), pad(src), 1, k)[..., p:-p, p:-p]
    assert (plain - alone).abs().max() > 0.05  # without masks the border is not the same
    field = torch.randn(1, 2, 96, 96)
    blurred = nets.masked_blur(field, k, ones)
    assert torch.allclose(nets.masked_blur(pad(field), k, pad(ones))[..., p:-p, p:-p], blurred,
                          atol=1e-5)
    const = nets.masked_blur(torch.full((1, 2, 96, 96), 2.5), k, ones)
    assert torch.allclose(const, torch.full_like(const, 2.5))  # a constant field stays so
    m = torch.ones(1, 1, 6, 6)
    m[..., 2, 3] = 0
    e = nets._erode(m)
    assert e[..., 1:4, 2:5].sum() == 0 and e[..., 0, :].sum() == 0 and e[..., 3, 0] == 0
    assert e.sum() == 4 * 4 - 9 + 0  # interior 4x4, minus the 3x3 around the hole


def test_nodata_aware_encoder_and_heads_zero_what_has_no_data():
    torch.manual_seed(1)
    model = nets.build_model(nets.default_spec(channels=[4, 8], nodata_aware=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases: no-data would not be 0 alone
    x = torch.randn(2, 2, 64, 64)
    x[:, 1] = 1.0
    x[..., :, 40:] = 0  # no data on the right
    masks = model._level_masks(x)
    feats = model.encoder(x, masks)
    assert feats[1][..., :, 20:].abs().max() == 0 and feats[1][..., :, :20].abs().max() > 0
    assert feats[2][..., :, 10:].abs().max() == 0
    unmasked = model.encoder(x)
    assert unmasked[2][..., :, 12:].abs().max() > 0  # biases leak into no-data without masks
    head = model.heads["1"]
    out = head(torch.randn(1, head.net[0].in_channels, 32, 32), masks[1][:1])
    assert out[..., :, 20:].abs().max() == 0


def test_nodata_aware_stage_changes_little_when_no_data_surrounds_the_tissue():
    # A real 256^2 neighbour pair, once alone and once inside 32 px of no-data: with
    # nodata_aware the field in the tissue barely moves; without, it moves far more.
    s = _isbi(11)[..., :256, :256].clamp_min(1)
    t = _isbi(10)[..., :256, :256].clamp_min(1)
    p = 32
    pad = lambda a: torch.nn.functional.pad(a, (p, p, p, p))  # noqa: E731
    changes = {}
    for aware in (False, True):
        torch.manual_seed(0)
        model = nets.build_model(nets.default_spec(nodata_aware=aware, lk_iterations=1))
        with torch.no_grad():
            d = (model(pad(s), pad(t))[..., p:-p, p:-p] - model(s, t)).norm(dim=1)
        changes[aware] = (float(d.median()), float(d.max()))
    assert changes[True][0] < 0.5 * changes[False][0], changes
    assert changes[True][1] < changes[False][1], changes
