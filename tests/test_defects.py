"""Defects (folds, cracks): masked pixels are no data, a source cut apart is aligned piece by
piece so the field may jump across a fold; synthetic folds with a known answer; mask layers in
`metroem align`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section, tiny_pyramid
from PIL import Image

from metroem import defects, fields, inference, nets, stack, synth, tiling, volumes
from metroem.aligner import load_aligner
from metroem.errors import MetroemError

SPEC = {**nets.default_spec(levels=4, channels=[4, 8, 8]), "nodata_aware": True}
ISBI = Path(__file__).resolve().parents[1] / "models" / "isbi"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyr") / "pyramid"
    return tiny_pyramid(root, SPEC, checkpoint="rand", noise=0.02, seed=0)


def texture(size: int = 64, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """A random texture ``(1, 1, size, size)`` with features ``scale`` px apart, values in
    [20, 235] (no 0: all data)."""
    g = torch.Generator().manual_seed(seed)
    t = synth.elastic_field(1, size, size, 1.0, scale, generator=g)[:, :1]
    return (20 + 215 * (t - t.min()) / (t.max() - t.min())).round()


def whole(pyramid):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_aligner(pyramid)


# --- synthetic folds -----------------------------------------------------------------------------


def test_fold_truth_maps_every_kept_pixel_back():
    """Target pixel p shows the tissue the folded section has at p + field(p): composing the
    fold's own pull (folded from unfolded) with the truth is the identity away from the seam."""
    spec = synth.FoldSpec(width=12.0, radius=300.0)
    fo = synth.fold_section(texture(128), spec, torch.Generator().manual_seed(1))
    s, normal = synth.fold_curve(128, 128, spec, torch.Generator().manual_seed(1))
    push = normal * torch.where(s >= 0, 1.0, -1.0) * spec.width / 2
    residual = (fo["field"] + fields.warp_field(push, fo["field"])).norm(dim=1, keepdim=True)
    away = s.abs() > spec.width / 2 + 1.5  # bilinear sampling of the jump blurs the seam
    assert float(residual[away].max()) < 0.05
    assert torch.equal(fo["lost"] > 0, s.abs() <= spec.width / 2)
    # the field jumps by the width across the fold; the dark line is the defect
    assert float(fo["field"].norm(dim=1).max()) == pytest.approx(spec.width / 2, abs=1e-4)
    line = fo["defect"] > 0
    assert line.any() and float(fo["folded"][line].mean()) < 0.5 * float(fo["folded"][~line]
                                                                        .mean())


# --- pieces --------------------------------------------------------------------------------------


def test_pieces_split_at_a_line_and_keep_specks_with_the_largest():
    valid = np.ones((40, 60), bool)
    valid[:, 20] = False  # a crack: left 20 columns, right 39
    valid[5, 5] = False
    valid[4:7, 45] = False
    valid[5, 44:47] = False  # a one-pixel island at (5, 45) inside the right piece's ring
    valid[5, 45] = True
    pm = defects.piece_map(tiling.ArraySource(valid.astype(np.uint8)), 40, 60)
    assert pm.count == 2 and pm.level == 0
    right, left = pm.mask(1, 0, 0, 40, 60), pm.mask(2, 0, 0, 40, 60)
    assert right[:, 21:].sum() == right.sum() and left[:, :20].sum() == left.sum()
    assert right[5, 45]  # the speck joined the largest piece
    assert not (right | left)[:, 20].any()
    assert not pm.mask(1, -3, -3, 2, 2).any()  # outside the section
    one = defects.piece_map(tiling.ArraySource(np.ones((8, 8), np.uint8)), 8, 8)
    assert one.count == 1
    assert defects.piece_map(tiling.ArraySource(np.zeros((8, 8), np.uint8)), 8, 8).count == 0


def test_pieces_on_a_coarse_grid_still_see_a_thin_diagonal_crack():
    n = 64
    img = np.ones((n, n), np.uint8)
    for i in range(n):
        img[i, i] = 0  # 1 px diagonal: 8-connected, so the pieces are 4-connected apart
    pm = defects.piece_map(tiling.ArraySource(img), n, n, max_pixels=16 * 16)
    assert pm.level == 2 and pm.count == 2
    a, b = pm.mask(1, 0, 0, n, n), pm.mask(2, 0, 0, n, n)
    assert not (a & b).any()
    assert a[40, 2] != a[2, 40] and (a | b)[40, 2] and (a | b)[2, 40]


def test_two_passes_give_each_target_pixel_its_own_side(monkeypatch):
    """A fake aligner returns +2 px (pull down) for the top piece and -2 px for the bottom one:
    every target pixel gets the field of the piece that lands on it, and each piece's second
    pass sees only its own share of the target."""
    n, line = 64, 32
    src = texture(n)
    mask = torch.zeros(1, 1, n, n)
    mask[..., line - 1 : line + 2, :] = 1
    calls = []

    def fake(s, t):
        calls.append((s.clone(), t.clone()))
        top = bool(s[..., :8, :].ne(0).any())
        f = torch.zeros(1, 2, n, n)
        f[:, 1] = 2.0 if top else -2.0
        return f

    out = defects.align_with_defects(fake, src, texture(n, 1), src_mask=mask)
    assert len(calls) == 4  # two pieces, two passes
    assert torch.all(out[0, 1, :28] == 2.0) and torch.all(out[0, 1, 37:] == -2.0)
    assert torch.all(out[0, 0] == 0)
    # rows no piece covers are bridged from +2 to -2 (continuous, onto the masked line)
    column = out[0, 1, :, 10]
    assert torch.all(column[1:] <= column[:-1]) and -2.0 < float(column[line]) < 2.0
    top_second_target = calls[2][1]
    assert top_second_target[..., :28, :].ne(0).all() and top_second_target[..., 37:, :].eq(0).all()
    # without splitting: one call on the masked source
    calls.clear()
    defects.align_with_defects(fake, src, texture(n, 1), src_mask=mask, split=False)
    assert len(calls) == 1 and calls[0][0][..., line, :].eq(0).all()


def test_content_under_a_mask_does_not_reach_the_field(pyramid):
    al = whole(pyramid)
    src, tgt = texture(64), texture(64, 1)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:30, 10:50] = 1
    other = src.clone()
    other[..., 20:30, 10:50] = 255 - other[..., 20:30, 10:50]
    with torch.no_grad():
        a = al(src, tgt, src_mask=mask)
        b = al(other, tgt, src_mask=mask)
        c = al(other, tgt)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.needs_shared("isbi")
def test_a_fold_is_aligned_with_its_jump():
    """Issue 14 item 3: a synthetic fold on a held-out ISBI section (16 px of tissue lost, both
    sides pulled toward it). Masked and split, the field next to the fold is right; one smooth
    field over the section (no mask, or no split) is off by pixels there."""
    img = torch.from_numpy(np.asarray(Image.open(isbi_section(15)), np.float32)).clamp_min(1)
    img = img[None, None]
    fo = synth.fold_section(img, synth.FoldSpec(width=16.0, radius=1200.0),
                            torch.Generator().manual_seed(15))
    lost = fo["lost"] > 0
    near = (torch.nn.functional.max_pool2d(fo["lost"], 33, 1, 16) > 0) & ~lost
    near[..., :16, :] = near[..., -16:, :] = near[..., :16] = near[..., -16:] = False
    al = load_aligner(ISBI)
    torch.set_num_threads(2)
    errors, split = {}, None
    for name, kw in {"split": dict(src_mask=fo["defect"]),
                     "masked": dict(src_mask=fo["defect"], split=False), "plain": {}}.items():
        with torch.no_grad():
            f = defects.align_with_defects(al, fo["folded"], img, **kw)
        errors[name] = float((f - fo["field"]).norm(dim=1, keepdim=True)[near].median())
        split = f if split is None else split
    assert errors["split"] <= 0.1, errors
    assert errors["masked"] >= 1.0 and errors["plain"] >= 1.0, errors
    # the lost tissue is not invented: rendered, the strip is (nearly) empty
    rendered = fields.warp_image(defects.apply_mask(fo["folded"], fo["defect"]), split)
    assert float(rendered[lost].mean()) < 0.3 * float(rendered[~lost].mean())


# --- metroem align with masks --------------------------------------------------------------------


def _fold_files(tmp_path: Path, n: int = 64) -> tuple[str, str, str, dict]:
    img = texture(n)
    fo = synth.fold_section(img, synth.FoldSpec(width=8.0, radius=400.0, spread=0.0),
                            torch.Generator().manual_seed(4))
    paths = [str(tmp_path / f) for f in ("src.png", "tgt.png", "mask.png")]
    Image.fromarray(fo["folded"][0, 0].round().byte().numpy()).save(paths[0])
    Image.fromarray(img[0, 0].byte().numpy()).save(paths[1])
    Image.fromarray((fo["defect"][0, 0] * 255).byte().numpy()).save(paths[2])
    return *paths, fo


def test_files_with_a_mask_tiled_equal_the_whole_image_pieces(pyramid, tmp_path):
    src, tgt, mask, _ = _fold_files(tmp_path)
    out = str(tmp_path / "f.npy")
    rc = inference.main(["--pyramid_path", str(pyramid), "--src", src, "--tgt", tgt,
                         "--src_mask", mask, "--field_out", out, "--chunk", "32",
                         "--no_progress"])
    assert rc == 0
    got = torch.from_numpy(np.load(out))[None]
    s, t, m = (torch.from_numpy(np.asarray(Image.open(p), np.float32))[None, None]
               for p in (src, tgt, mask))
    assert defects.piece_map(tiling.ArraySource(
        defects.apply_mask(s, m)[0, 0].numpy()), 64, 64).count == 2
    with torch.no_grad():
        expected = defects.align_with_defects(whole(pyramid), s, t, src_mask=m)
        single = whole(pyramid)(defects.apply_mask(s, m), t)
    assert float((got - expected).abs().max()) < 0.01
    assert float((expected - single).abs().max()) > 0.01  # the pieces changed something
    with pytest.raises(SystemExit):  # bad mask: one-line error, nothing written
        small = str(tmp_path / "small.png")
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(small)
        inference.main(["--pyramid_path", str(pyramid), "--src", src, "--tgt", tgt,
                        "--src_mask", small, "--field_out", str(tmp_path / "g.npy"),
                        "--no_progress"])
    assert not (tmp_path / "g.npy").exists() and not (tmp_path / ".g.npy.partial").exists()


def _volume(path: Path, sections: list[torch.Tensor], dtype: str = "uint8") -> str:
    url = volumes.normalize_path(str(path))
    n = sections[0].shape[-1]
    volumes.create_volume(url, (n, n, len(sections)), num_mips=2, dtype=dtype, chunk_xy=32,
                          offset_xyz=(64, 32, 0))
    for z, s in enumerate(sections):
        volumes.write_all_mips(url, 64, 32, z, s.to(getattr(torch, dtype)))
    return url


def test_a_stack_with_a_mask_layer(pyramid, tmp_path):
    """`metroem align` on a z range with --mask_path: the folded section is aligned in pieces
    (the first section after the reference equals the whole-image pieces), its defect stays
    empty in the aligned image, and bad mask layers are one-line errors that write nothing."""
    src_png, tgt_png, _, fo = _fold_files(tmp_path)
    ref = torch.from_numpy(np.asarray(Image.open(tgt_png), np.float32))[None, None]
    folded = torch.from_numpy(np.asarray(Image.open(src_png), np.float32))[None, None]
    defect = fo["defect"]
    src = _volume(tmp_path / "img", [ref, folded, ref])
    mask = _volume(tmp_path / "mask", [torch.zeros_like(ref), defect, torch.zeros_like(ref)])
    f, i = str(tmp_path / "f"), str(tmp_path / "i")
    rc = inference.main(["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "1",
                         "--z_end", "3", "--field_path", f, "--image_path", i, "--chunk", "32",
                         "--mask_path", mask, "--no_progress"])
    assert rc == 0
    al, start = whole(pyramid), torch.zeros(1, 2, 64, 64)  # from the reference's field
    with torch.no_grad():
        expected = defects.align_with_defects(lambda s, t: al(s, t, src_agg_field=start),
                                              folded, ref, src_mask=defect)
    got = volumes.read(f, 0, 64, 32, 1, 64)
    assert float((got - expected).abs().max()) < 0.01
    # the whole stack equals metroem.stack's definition with masks: section 2 goes onto the
    # reference, not onto the folded section 1
    _, whole_fields = stack.align_stack([ref, folded, ref], stack.aligner_pair_fn(al),
                                        dtype=np.uint8, masks=[None, defect, None])
    for z in (1, 2):
        layer = volumes.read(f, 0, 64, 32, z, 64)
        assert float((layer - whole_fields[z]).abs().max()) < 0.01, z
    aligned = volumes.read(i, 0, 64, 32, 1, 64).float()
    masked = fields.warp_image(defects.apply_mask(folded, defect), got)  # the line: no data
    assert float((aligned - masked).abs().max()) <= 1.0
    assert float((aligned - fields.warp_image(folded, got)).abs().max()) > 5.0

    bad = {
        "missing": (str(tmp_path / "nothing"), None, "cannot be opened"),
        "size": (_volume(tmp_path / "m32", [torch.zeros(1, 1, 32, 32)] * 3), None,
                 "image layer's size"),
        "sections": (_volume(tmp_path / "m1", [torch.zeros_like(ref)]), None, "no section 1"),
        "mip": (mask, 5, "no MIP 5"),
    }
    for name, (path, mip, hint) in bad.items():
        out = [str(tmp_path / f"{name}_f"), str(tmp_path / f"{name}_i")]
        with pytest.raises(MetroemError, match=hint):
            inference.align_volume(str(pyramid), src, 1, 3, *out, chunk=32, mask_path=path,
                                   mask_mip=mip, progress=False)
        assert not any(os.path.exists(p) for p in out), name


# --- the fold benchmark --------------------------------------------------------------------------


def test_fold_pairs_carry_their_answer():
    """The truth of a fold pair undoes fold and deformation: the source sampled along it is the
    unfolded section, away from the fold and the border; the zero field is far from it."""
    from metroem.eval import folds

    section = texture(128, 3, scale=12.0)  # smooth: resampling twice barely blurs it
    pair = folds.fold_pair("t", section[0, 0], section[0, 0], gap=1)  # gap 1: no noise
    back = fields.warp_image(pair.src, pair.gt)
    near = torch.nn.functional.max_pool2d(pair.lost, 9, 1, 4) > 0
    keep = ~near & (fields.warp_image(pair.src_defect, pair.gt) == 0)
    keep[..., :16, :] = keep[..., -16:, :] = keep[..., :16] = keep[..., -16:] = False
    assert float((back - section)[keep].abs().median()) < 1.0
    assert folds.fold_errors(pair.gt, pair) == {"near": 0.0, "near_p95": 0.0, "far": 0.0}
    zero = folds.fold_errors(torch.zeros_like(pair.gt), pair)
    assert zero["near"] > 2 and zero["far"] > 0.5
    again = folds.fold_pair("t", section[0, 0], section[0, 0], gap=1)
    assert torch.equal(again.src, pair.src)  # seeded by name


@pytest.mark.needs_shared("isbi")
@pytest.mark.needs_shared("fibsem")
@pytest.mark.slow
def test_fold_benchmark_quick_run_writes_its_table(tmp_path):
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "folds.py"), "--quick", "--threads", "1",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "METROEM_SHARED_DATA": str(Path(isbi_section(0)).parents[1])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "folds.json").read_text())
    isbi = result["tables"]["ISBI, same section (gap 0)"]
    # split at the fold, the shipped pyramid gets the jump; one smooth field cannot
    assert isbi["metroem masked split"]["near"] < 0.3 < isbi["metroem"]["near"]
    assert isbi["identity"]["far"] > 2
    assert "| metroem masked split |" in (tmp_path / "folds.md").read_text()
