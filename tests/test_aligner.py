"""load_aligner / PyramidAligner properties, and module folders as corgie processors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section, pyramid_with_settings, tiny_pyramid
from PIL import Image

import metroem
from metroem import aligner as aligner_mod
from metroem import fields, modules, nets

SPEC = nets.default_spec(levels=4, channels=[4, 8, 8])


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny windows on a shared 2-core machine run far faster so."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def isbi_pair(size: int = 64, y: int = 100, x: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Two consecutive real sections as uint8 (1, 1, size, size), the source shifted."""
    a, b = (np.asarray(Image.open(isbi_section(i))) for i in (0, 1))
    src = a[y + 3 : y + 3 + size, x + 2 : x + 2 + size]
    tgt = b[y : y + size, x : x + size]
    return tuple(torch.from_numpy(np.ascontiguousarray(v))[None, None] for v in (src, tgt))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    """Two stages (MIP 1, 0) with random non-zero weights saved as checkpoint 'rand'."""
    root = tmp_path_factory.mktemp("pyr") / "pyramid"
    return tiny_pyramid(root, SPEC, checkpoint="rand", noise=0.05, seed=0)


def test_load_aligner_is_lazy_export_and_eval_module(pyramid):
    assert metroem.load_aligner is aligner_mod.load_aligner
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    assert isinstance(al, torch.nn.Module) and not al.training
    assert al.mips == [1, 0] and al.input_mip == 0
    assert len(metroem.load_aligner(pyramid, stages=[1]).stages) == 1


def test_spec_changes_apply_per_stage_at_load_time_and_leave_the_folder_alone(pyramid):
    before = {p: p.read_bytes() for p in pyramid.rglob("model_spec.json")}
    al = metroem.load_aligner(pyramid, checkpoint_name="rand", spec_changes={"iterations": 2})
    assert [s.iterations for s in al.stages] == [2, 2]
    al = metroem.load_aligner(pyramid, checkpoint_name="rand",
                              spec_changes=[{}, {"lk_iterations": 1, "learned_levels": False}])
    assert [s.learned for s in al.stages] == [True, False]
    src, tgt = isbi_pair(64)
    with torch.no_grad():
        changed = al(src, tgt)
        plain = metroem.load_aligner(pyramid, checkpoint_name="rand")(src, tgt)
    assert (changed - plain).abs().max() > 1e-3  # the finest stage really ran differently
    assert {p: p.read_bytes() for p in pyramid.rglob("model_spec.json")} == before
    with pytest.raises(metroem.MetroemError, match="one per loaded stage"):
        metroem.load_aligner(pyramid, checkpoint_name="rand", spec_changes=[{}])
    with pytest.raises(metroem.MetroemError, match="heads"):  # would need other weights
        metroem.load_aligner(pyramid, checkpoint_name="rand", spec_changes={"head_channels": 3})


def test_stages_run_coarse_to_fine_and_compose(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(64)
    with torch.no_grad():
        field = al(src, tgt)
        s, t = src.float(), tgt.float()
        coarse = al.stages[0](fields.downsample_image(s, 1), fields.downsample_image(t, 1))
        up = fields.upsample_field(coarse, 1)
        expected = al.stages[1](s, t, src_agg_field=up)
    assert field.shape == (1, 2, 64, 64) and field.dtype == torch.float32
    assert torch.allclose(field, expected, atol=1e-5)
    assert field.abs().max() > 0.01  # the random weights really move something


def test_input_mip_gives_field_at_input_resolution(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(64)
    s1, t1 = fields.downsample_image(src, 1).float(), fields.downsample_image(tgt, 1).float()
    with torch.no_grad():
        at1 = al(s1, t1, input_mip=1)
        coarse = al.stages[0](s1, t1)  # the MIP-1 stage sees the images as given
        fine = al.stages[1](
            fields.resample_image(s1, 1, 0),
            fields.resample_image(t1, 1, 0),
            src_agg_field=fields.upsample_field(coarse, 1),
        )
    assert at1.shape == (1, 2, 32, 32)
    assert torch.allclose(at1, fields.downsample_field(fine, 1), atol=1e-5)


def test_raw_uint8_equals_float_and_odd_sizes(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(64)
    src, tgt = src[..., :61, :53], tgt[..., :61, :53]
    with torch.no_grad():
        a = al(src, tgt)
        b = al(src.float(), tgt.float())
    assert a.shape == (1, 2, 61, 53)
    assert torch.equal(a, b)


def test_no_grad_unless_training(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(32)
    assert not al(src, tgt).requires_grad
    al.train()
    out = al(src.float(), tgt.float())
    assert out.requires_grad
    out.abs().sum().backward()
    assert any(p.grad is not None for p in al.parameters())


def test_empty_input_returns_incoming_field_or_zeros(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(32)
    empty = torch.zeros_like(src)
    agg = torch.randn(1, 2, 32, 32)
    assert torch.equal(al(empty, tgt), torch.zeros(1, 2, 32, 32))
    assert torch.equal(al(src, empty, src_agg_field=agg), agg)
    assert al(src[..., :0, :], tgt[..., :0, :]).shape == (1, 2, 0, 32)


def test_field_follows_input_device_and_ignores_corgie_extras(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(32)
    out = al(src, tgt, tgt_agg_field=None, src_mask=None, tgt_plastic=src)
    assert out.device == src.device == al.device
    if torch.cuda.is_available():
        gpu = metroem.load_aligner(pyramid, checkpoint_name="rand", device="cuda")
        assert gpu(src, tgt).device.type == "cpu"
        assert gpu(src.cuda(), tgt.cuda()).device.type == "cuda"
        assert torch.allclose(gpu(src, tgt), out, atol=1e-3)


def test_missing_gpu_is_one_line_error(pyramid):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(metroem.MetroemError) as e:
        metroem.load_aligner(pyramid, device="cuda")
    assert "\n" not in str(e.value) and "GPU" in str(e.value)


# --- corgie / modelhouse ---------------------------------------------------------------------


def corgie_call(processor, src, tgt, agg=None):
    """What corgie's ApplyModel does: one call with a dict of keyword tensors, no no_grad."""
    inputs = {
        "src_img": src,
        "tgt_img": tgt,
        "src_agg_field": agg,
        "tgt_agg_field": None,
        "src_mask": torch.zeros_like(src),
        "tgt_plastic": torch.zeros_like(tgt),
    }
    return processor(**inputs)


def test_module_folder_is_a_corgie_processor(pyramid, monkeypatch, tmp_path):
    modelhouse = pytest.importorskip("modelhouse")
    from torchfields.fields import DisplacementField

    monkeypatch.setattr(sys, "path", list(sys.path))  # modelhouse prepends its temp folder
    monkeypatch.chdir(tmp_path)
    folder = str(modules.discover(pyramid)[1].path)
    params = {"checkpoint_name": "rand", "mip": 0}  # torchfields output is the default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        simple = modelhouse.load_model_simple(folder, **params)
        from_json = modelhouse.load_model(folder, json.dumps(params))
    plain = modules.load_module(folder, "rand")
    src, tgt = isbi_pair(48)
    agg = (torch.ones(1, 2, 48, 48) * 1.5).field()  # corgie hands fields in as DisplacementFields
    for proc in (simple, from_json):
        out = corgie_call(proc, src, tgt, agg)
        assert isinstance(out, DisplacementField)
        assert out.shape == (1, 2, 48, 48) and out.device == src.device
        assert not out.requires_grad
        with torch.no_grad():
            expected = plain(src, tgt, src_agg_field=agg.as_subclass(torch.Tensor))
        assert torch.allclose(out.as_subclass(torch.Tensor), expected, atol=1e-6)
        # what corgie does with the result: shift by the target drift, crop, warp
        out.x += 2.0
        out.y += -1.0
        assert torch.allclose(out.as_subclass(torch.Tensor)[:, 0], expected[:, 0] + 2.0)
        cropped = out[..., 8:-8, 8:-8]
        warped = cropped.from_pixels().sample(src[..., 8:-8, 8:-8].float())
        assert warped.shape == (1, 1, 32, 32) and torch.isfinite(warped).all()
    none_agg = corgie_call(simple, src, tgt)
    assert isinstance(none_agg, DisplacementField)


def test_corgie_processor_smooths_like_metroem_align_when_asked(pyramid, caplog):
    """Processor params smoothing_nm + pixel_nm regularise the stage's field exactly as
    metroem's aligner does (gated by default, "off" smooths everywhere); without them the
    field is raw; missing or wrong params are one-line errors, unknown ones a warning."""
    pytest.importorskip("torchfields")
    from metroem import corgie, regularize
    from metroem.errors import MetroemError

    folder = modules.discover(pyramid)[1].path
    plain = modules.load_module(folder, "rand")
    src, tgt = isbi_pair(96)
    with torch.no_grad():
        raw = plain(src, tgt)
    sigma, window = 64 / 4, regularize.GATE_WINDOW_NM / 4
    for gate in (None, "off", "0.5,0.9"):
        proc = corgie.create(folder, "rand", smoothing_nm=64, pixel_nm=4, smoothing_gate=gate)
        out = corgie_call(proc, src, tgt).as_subclass(torch.Tensor)
        want_gate = regularize.check_gate(regularize.GATE if gate is None else gate)
        expected = regularize.regularized_field(raw, src.float(), tgt.float(), sigma, want_gate,
                                                window)
        assert torch.allclose(out, expected, atol=1e-5)
        assert (out - raw).abs().max() > 0.01  # the smoothing changed the field
    raw_proc = corgie.create(folder, "rand", val=1, scale=2.0)  # corgie's own params: silent
    assert torch.equal(corgie_call(raw_proc, src, tgt).as_subclass(torch.Tensor), raw)
    with pytest.raises(MetroemError, match="needs pixel_nm"):
        corgie.create(folder, "rand", smoothing_nm=640)
    with pytest.raises(MetroemError, match="pixel_nm must be a size in nm"):
        corgie.create(folder, "rand", smoothing_nm=640, pixel_nm="eight")
    with pytest.raises(MetroemError, match="smoothing gate must be two correlations"):
        corgie.create(folder, "rand", smoothing_nm=640, pixel_nm=8, smoothing_gate="high")
    with pytest.raises(MetroemError, match="output=tensor use metroem.load_aligner"):
        corgie.create(folder, "rand", output="tensor", smoothing_nm=640, pixel_nm=8)
    with caplog.at_level("WARNING", logger="metroem.corgie"):
        corgie.create(folder, "rand", smoothing_mn=640)
    assert "smoothing_mn" in caplog.text
    assert corgie.smoothing_pad_px(0, 8) == 0
    gated, plain_pad = corgie.smoothing_pad_px(640, 8), corgie.smoothing_pad_px(640, 8, False)
    assert gated > plain_pad >= 3 * 80 and corgie.smoothing_pad_px(1280, 8) > gated


def test_plain_output_stays_a_tensor(pyramid):
    folder = modules.discover(pyramid)[0].path
    model = modules.load_module(folder, "rand")
    src, tgt = isbi_pair(32)
    with torch.no_grad():
        assert type(model(src, tgt)) is torch.Tensor
    from metroem import corgie

    assert type(corgie.create(folder, "rand", output="tensor")(src, tgt)) is torch.Tensor
    with pytest.raises(metroem.MetroemError, match="output='numpy' is not one of"):
        corgie.create(folder, output="numpy")


def test_input_mip_coarser_than_every_stage_is_refused_unless_there_is_no_data(pyramid):
    al = metroem.load_aligner(pyramid, checkpoint_name="rand")
    src, tgt = isbi_pair(32)
    with pytest.raises(ValueError, match="input MIP 2 is coarser than every stage"):
        al(src, tgt, input_mip=2)
    empty = torch.zeros_like(src)
    with torch.no_grad():
        assert not al(empty, tgt, input_mip=2).any()  # no data: the zero field, no error


def test_smoothing_nm_keeps_the_affine_part_and_drops_the_rest(pyramid):
    """smoothing_nm replaces the field by regularize.smooth_field of it (data-weighted), at
    sigma = length / pixel size, gated by the match (regularize.regularized_field; "off"
    smooths everywhere); bad settings are refused with the flag to fix."""
    from metroem import regularize
    from metroem.errors import MetroemError
    from metroem.eval import metrics

    src, tgt = isbi_pair(96)
    plain = metroem.load_aligner(pyramid, "rand")
    smooth = metroem.load_aligner(pyramid, "rand", smoothing_nm=64, resolution_nm=4,
                                  smoothing_gate="off")
    assert smooth.smoothing_px == 16.0 and smooth.smoothing_gate is None
    raw = plain(src, tgt)
    out = smooth(src, tgt)
    expected = regularize.smooth_field(
        raw, 16.0, regularize.data_weight(src.float(), tgt.float(), raw)
    )
    assert torch.allclose(out, expected, atol=1e-5)
    gated = metroem.load_aligner(pyramid, "rand", smoothing_nm=64, resolution_nm=4)
    assert gated.smoothing_gate == regularize.GATE and gated.gate_window_px == 20.0  # 80 nm
    loose = (-1.0, -0.5)  # every pixel matches "like the same section": kept (where it does
    # not fold: test_regularize), as regularize.regularized_field says with that gate
    kept = metroem.load_aligner(pyramid, "rand", smoothing_nm=64, resolution_nm=4,
                                smoothing_gate=loose)(src, tgt)
    assert torch.allclose(kept, regularize.regularized_field(
        raw, src.float(), tgt.float(), 16.0, loose, 20.0), atol=1e-5)
    assert not torch.allclose(kept, out, atol=1e-2)
    assert torch.allclose(gated(src, tgt), regularize.regularized_field(
        raw, src.float(), tgt.float(), 16.0, regularize.GATE, 20.0), atol=1e-5)
    assert metrics.gradient_norm_stats(out)["p95"] < metrics.gradient_norm_stats(raw)["p95"]
    # at MIP 1 input the same length is half as many pixels
    coarse = fields.resample_image(src.float(), 0, 1), fields.resample_image(tgt.float(), 0, 1)
    raw1 = plain(*coarse, input_mip=1)
    w1 = regularize.data_weight(*coarse, raw1)
    assert torch.allclose(smooth(*coarse, input_mip=1),
                          regularize.smooth_field(raw1, 8.0, w1), atol=1e-5)
    with pytest.raises(MetroemError, match="resolution_nm"):
        metroem.load_aligner(pyramid, "rand", smoothing_nm=64)
    with pytest.raises(MetroemError, match="LOW < HIGH"):
        metroem.load_aligner(pyramid, "rand", smoothing_nm=64, resolution_nm=4,
                             smoothing_gate=(0.9, 0.8))
    with pytest.raises(ValueError, match="smoothing_px"):
        aligner_mod.PyramidAligner([(0, nets.build_model(SPEC))], smoothing_px=-1)


def test_pyramid_json_sets_the_pixel_size_and_a_default_length(pyramid, tmp_path):
    """pyramid.json holds the MIP0 pixel size and an optional default smoothing length;
    explicit arguments win (0 turns the default off); a bad file is a one-line error."""
    from metroem.errors import MetroemError

    pyr = pyramid_with_settings(pyramid, tmp_path / "pyr",
                                '{"resolution_nm": 4, "smoothing_nm": 64}')
    assert modules.pyramid_settings(pyr) == {"resolution_nm": 4.0, "smoothing_nm": 64.0}
    assert metroem.load_aligner(pyr, "rand").smoothing_px == 16.0
    assert metroem.load_aligner(pyr, "rand", smoothing_nm=32).smoothing_px == 8.0
    assert metroem.load_aligner(pyr, "rand", smoothing_nm=0).smoothing_px == 0.0
    assert metroem.load_aligner(pyr, "rand", resolution_nm=8).smoothing_px == 8.0
    (pyr / "pyramid.json").write_text(
        '{"resolution_nm": 4, "smoothing_nm": 64, "smoothing_gate": [0.5, 0.9]}')
    assert metroem.load_aligner(pyr, "rand").smoothing_gate == (0.5, 0.9)
    assert metroem.load_aligner(pyr, "rand", smoothing_gate="off").smoothing_gate is None
    (pyr / "pyramid.json").write_text('{"resolution_nm": 4, "smoothing_nm": 64, '
                                      '"smoothing_gate": "off"}')
    assert metroem.load_aligner(pyr, "rand").smoothing_gate is None
    assert not metroem.load_aligner(pyr, "rand").translation_init  # off unless asked
    (pyr / "pyramid.json").write_text('{"resolution_nm": 4, "translation_init": true}')
    assert metroem.load_aligner(pyr, "rand").translation_init
    assert not metroem.load_aligner(pyr, "rand", translation_init=False).translation_init
    for text, words in (('{"resolution_nm": 0}', "resolution_nm = 0"),
                        ('{"translation_init": 1}', "translation_init = 1; it must be true"),
                        ('{"smoothing_gate": [0.9, 0.1]}', "smoothing_gate = \\[0.9, 0.1\\]"),
                        ('{"smoothing_gate": false}', "smoothing_gate = false"),
                        ('{"pixel": 4}', "unknown key"), ("[1]", "JSON object"),
                        ("{", "not valid JSON")):
        (pyr / "pyramid.json").write_text(text)
        with pytest.raises(MetroemError, match=words):
            metroem.load_aligner(pyr, "rand")
    assert modules.pyramid_settings(pyramid) == {}
    shipped = Path(__file__).resolve().parents[1] / "models" / "isbi"
    # the shipped ISBI pyramid smooths over 640 nm by default (gated: regularize.GATE) and
    # starts each pair from its phase-correlation translation
    assert modules.pyramid_settings(shipped) == {"resolution_nm": 4.0, "smoothing_nm": 640.0,
                                                 "translation_init": True}


def test_a_pyramid_without_weights_is_a_warning_not_a_quiet_info(tmp_path, caplog):
    from metroem import pretrained

    copy = pretrained.copy_pyramid("demo", tmp_path / "copy")  # definitions, no weights
    with caplog.at_level("WARNING", logger="metroem.aligner"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metroem.load_aligner(copy)
    assert "no checkpoint: its network is untrained" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="metroem.aligner"):
        metroem.load_aligner("demo")  # trained: nothing at WARNING
    assert "untrained" not in caplog.text
