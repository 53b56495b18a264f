"""Benchmark pairs (metroem.eval.pairs): reproducible draws that do not shift when the list of
difficulties changes, and pairs whose recorded fields are the right ones."""

import pytest
import torch

from metroem import fields, synth
from metroem.errors import MetroemError
from metroem.eval import metrics, pairs


def _stack(nz: int = 4, size: int = 64) -> torch.Tensor:
    """Smooth random 'sections' (values >= 1, 0 stays no-data)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(nz, 1, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x[:, 0].clamp(0, 1) * 200 + 20).float()


def _same(a: pairs.BenchmarkPair, b: pairs.BenchmarkPair) -> bool:
    return torch.equal(a.src, b.src) and torch.equal(a.deformation, b.deformation)


def test_same_seed_same_pairs_and_draws_differ():
    stack = _stack()
    one = pairs.make_pairs(stack, ["elastic"], 2)
    again = pairs.make_pairs(stack, ["elastic"], 2)
    three = pairs.make_pairs(stack, ["elastic"], 2, draws=3)
    assert len(one) == 4 and len(three) == 12
    assert all(_same(a, b) for a, b in zip(one, again, strict=True))
    # draw 0 of a multi-draw run is the single-draw pair
    first = [p for p in three if p.draw == 0]
    assert all(_same(a, b) for a, b in zip(one, first, strict=True))
    # the other draws are different deformations of the same sections, with their own names
    same_z = [p for p in three if p.kind == "neighbour" and p.z == one[-1].z]
    assert sorted(p.draw for p in same_z) == [0, 1, 2]
    assert not torch.allclose(same_z[0].deformation, same_z[1].deformation)
    assert len({p.name for p in three}) == len(three)
    assert pairs.make_pairs(stack, ["elastic"], 2, seed=1)[0].deformation.ne(
        one[0].deformation).any()


def test_adding_a_difficulty_leaves_the_other_pairs_alone(monkeypatch):
    stack = _stack()
    before = pairs.make_pairs(stack, ["shift8", "elastic"], 2)
    extra = {"extra": synth.DeformationSpec(translation=3)} | dict(pairs.DIFFICULTIES)
    monkeypatch.setattr(pairs, "DIFFICULTIES", extra)
    after = pairs.make_pairs(stack, ["shift8", "elastic"], 2)
    assert all(_same(a, b) for a, b in zip(before, after, strict=True))


def test_pairs_carry_their_true_fields():
    stack = _stack()
    for p in pairs.make_pairs(stack, ["mixed48"], 1, draws=2):
        # the recorded h undoes the deformation: warping the deformed source by h gives back
        # the undeformed section (same pairs) wherever the source has data
        assert p.src.shape == p.tgt.shape == p.h.shape[1:]
        if p.kind == "same":
            assert p.gt is not None and torch.equal(p.gt, p.h)
            # warp(src, gt) is the target up to noise (std 8) and interpolation
            warped = fields.warp_image(p.src[None, None], p.gt[None])[0, 0]
            assert (warped - p.tgt)[pairs.gt_valid_mask(p)].abs().median() < 12.0
        else:
            assert p.gt is None and torch.equal(p.tgt, stack[p.z - 1])
            back = fields.warp_image(p.src[None, None], p.h[None])[0, 0]
            m = pairs.gt_valid_mask(p)
            assert m.float().mean() > 0.3
            assert (back - p.src_undeformed)[m].abs().median() < 2.0
            # an aligner that returns h on the deformed pair and 0 on the undeformed one is
            # perfectly equivariant
            target = metrics.equivariance_target(torch.zeros(1, 2, *p.tgt.shape), p.h)
            assert torch.allclose(target[0], p.h, atol=1e-5)


def test_mixed48_is_the_full_range_with_every_part():
    spec = pairs.DIFFICULTIES["mixed48"]
    assert spec.translation == 48 and spec.rotation_deg > 0 and spec.scale > 0
    assert spec.shear > 0 and 0 < spec.elastic < pairs.DIFFICULTIES["elastic"].elastic


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(difficulties=["nope"]), "unknown difficulty 'nope'"),
        (dict(per_difficulty=9), "per_difficulty must be in [1, 3]"),
        (dict(draws=0), "draws must be >= 1"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(MetroemError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pairs.make_pairs(_stack(), **kwargs)
