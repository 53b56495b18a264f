"""`metroem align`: image files and CloudVolume z ranges, overwrite/resume, kill + resume."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section, pyramid_with_settings, tiny_pyramid
from PIL import Image

from metroem import cli, fields, inference, nets, tiling, volumes
from metroem.aligner import load_aligner
from metroem.errors import MetroemError

SPEC = nets.default_spec(levels=4, channels=[4, 8, 8])
CHUNK, PAD = 32, 16


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny windows on a shared 2-core machine run far faster so."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyr") / "pyramid"
    return tiny_pyramid(root, SPEC, checkpoint="rand", noise=0.02, seed=0)


def section(i: int, size: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(isbi_section(i)))[:size, :size])


def expected_field(pyramid, a, b) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        al = load_aligner(pyramid)
    return tiling.align_tiled(al, a, b, CHUNK, PAD)


def test_help_documents_an_example(capsys):
    with pytest.raises(SystemExit):
        cli.main(["align", "--help"])
    out = capsys.readouterr().out
    assert "example" in out and "--resume" in out
    assert "metroem align --pyramid_path models/demo --src" in out


def test_align_files_png_and_npy(pyramid, tmp_path):
    a, b = section(0, 96), section(1, 96)
    Image.fromarray(a).save(tmp_path / "s.png")
    np.save(tmp_path / "t.npy", b)
    field_out, image_out = tmp_path / "f.npy", tmp_path / "out.png"
    args = ["--pyramid_path", str(pyramid), "--src", str(tmp_path / "s.png"), "--tgt",
            str(tmp_path / "t.npy"), "--field_out", str(field_out), "--image_out", str(image_out),
            "--chunk", str(CHUNK), "--pad", str(PAD), "--no_progress"]
    assert inference.main(args) == 0
    field = np.load(field_out)
    expected = expected_field(pyramid, a, b)
    assert field.shape == (2, 96, 96) and np.abs(field - expected[0].numpy()).max() < 1e-5
    img = np.asarray(Image.open(image_out))
    ref = fields.warp_image(torch.from_numpy(a)[None, None].float(), expected)[0, 0].numpy()
    assert img.dtype == np.uint8 and np.abs(img - ref).max() <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "out.png", "s.png", "t.npy"]
    # an existing output is never replaced without --overwrite; --resume sees it complete
    with pytest.raises(SystemExit) as e:
        inference.main(args)
    assert e.value.code == 2
    assert inference.align_files(str(pyramid), str(tmp_path / "s.png"), str(tmp_path / "t.npy"),
                                 str(field_out), chunk=CHUNK, pad=PAD, resume=True)["skipped"]
    np.save(tmp_path / "t.npy", np.zeros_like(b))
    assert inference.main([*args, "--overwrite"]) == 0
    assert np.abs(np.load(field_out)).max() == 0  # no target data: identity field


def test_bad_inputs_are_one_line_errors(pyramid, tmp_path):
    np.save(tmp_path / "a.npy", section(0, 64))
    np.save(tmp_path / "b.npy", section(1, 48))
    with pytest.raises(MetroemError, match="one size"):
        inference.align_files(str(pyramid), str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                              str(tmp_path / "f.npy"), chunk=CHUNK, pad=PAD)
    with pytest.raises(MetroemError, match="multiple of 16"):
        inference.align_files(str(pyramid), str(tmp_path / "a.npy"), str(tmp_path / "a.npy"),
                              str(tmp_path / "f.npy"), chunk=40, pad=PAD)
    with pytest.raises(MetroemError, match="does not exist"):
        inference.align_files(str(pyramid), str(tmp_path / "nope.png"), str(tmp_path / "a.npy"),
                              str(tmp_path / "f.npy"))


def test_resume_reuses_the_coarse_stage_cache(pyramid, tmp_path, monkeypatch):
    a, b = section(2, 128), section(3, 128)
    np.save(tmp_path / "s.npy", a)
    np.save(tmp_path / "t.npy", b)
    run = [str(pyramid), str(tmp_path / "s.npy"), str(tmp_path / "t.npy")]
    out = tmp_path / "f.npy"

    def crash(*args, **kwargs):
        raise RuntimeError("killed after the coarse stage")

    with monkeypatch.context() as m:
        m.setattr(tiling.StageTiler, "output_chunk", crash)
        with pytest.raises(RuntimeError, match="killed"):
            inference.align_files(*run, str(out), chunk=CHUNK, pad=PAD, progress=False)
    work = tmp_path / ".f.npy.partial"
    # stage 0 (MIP 1): 64 x 64 px in 2 x 2 chunks, all done and cached
    assert len(os.listdir(work / "stage0_done")) == 4 and (work / "stage0.npy").exists()
    with monkeypatch.context() as m:  # resuming must not run the coarse stage again
        m.setattr(tiling.StageTiler, "run_stage_chunk", crash)
        res = inference.align_files(*run, str(out), chunk=CHUNK, pad=PAD, resume=True,
                                    progress=False)
    assert res["chunks_run"] == 16 and not work.exists()
    assert np.abs(np.load(out) - expected_field(pyramid, a, b)[0].numpy()).max() < 1e-5


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(pyramid, tmp_path):
    a, b = section(2, 384), section(3, 384)
    np.save(tmp_path / "s.npy", a)
    np.save(tmp_path / "t.npy", b)
    base = [sys.executable, "-m", "metroem.inference", "--pyramid_path", str(pyramid), "--src",
            str(tmp_path / "s.npy"), "--tgt", str(tmp_path / "t.npy"), "--chunk", str(CHUNK),
            "--pad", str(PAD), "--no_progress"]
    out = tmp_path / "killed.npy"
    markers = tmp_path / ".killed.npy.partial" / "done"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*base, "--field_out", str(out)], stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len([n for n in os.listdir(markers) if n.endswith(".done")]) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len([n for n in os.listdir(markers) if n.endswith(".done")])
    assert 10 <= partial < 144 and not out.exists()
    with pytest.raises(MetroemError, match="--resume"):
        inference.align_files(str(pyramid), str(tmp_path / "s.npy"), str(tmp_path / "t.npy"),
                              str(out), chunk=CHUNK, pad=PAD)
    res = inference.align_files(str(pyramid), str(tmp_path / "s.npy"), str(tmp_path / "t.npy"),
                                str(out), chunk=CHUNK, pad=PAD, resume=True, progress=False)
    assert res["chunks_run"] == 144 - partial
    once = tmp_path / "once.npy"
    inference.align_files(str(pyramid), str(tmp_path / "s.npy"), str(tmp_path / "t.npy"), str(once),
                          chunk=CHUNK, pad=PAD, progress=False)
    assert np.array_equal(np.load(out), np.load(once))


def make_volume(path: Path, n: int = 3, size: int = 64) -> str:
    url = volumes.normalize_path(str(path))
    volumes.create_volume(url, (size, size, n), num_mips=2, chunk_xy=32, offset_xyz=(64, 32, 0))
    for z in range(n):
        volumes.write_all_mips(url, 64, 32, z, torch.from_numpy(section(z + 4, size))[None, None])
    return url


def test_align_volume_writes_field_and_image_at_every_mip(pyramid, tmp_path):
    src = make_volume(tmp_path / "img")
    fpath, ipath = str(tmp_path / "field"), str(tmp_path / "aligned")
    args = ["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "1", "--z_end", "3",
            "--field_path", fpath, "--image_path", ipath, "--chunk", str(CHUNK), "--pad", str(PAD),
            "--no_progress", "--pairwise"]
    assert inference.main(args) == 0
    stage_caches = tmp_path / "field" / inference.MARKER_DIR / "stages"
    assert stage_caches.is_dir() and not os.listdir(stage_caches)  # dropped per finished z
    info = volumes.volume_info(fpath)
    assert info.size == volumes.volume_info(src).size and info.offset[0] == (64, 32, 0)
    for z in (1, 2):
        a, b = section(z + 4, 64), section(z + 3, 64)
        expected = expected_field(pyramid, a, b)
        got = volumes.read(fpath, 0, 64, 32, z, 64)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(volumes.read(fpath, 1, 32, 16, z, 32),
                              fields.downsample_field(expected, 1), atol=1e-5)
        img = volumes.read(ipath, 0, 64, 32, z, 64).float()
        ref = fields.warp_image(torch.from_numpy(a)[None, None].float(), expected)
        assert (img - ref).abs().max() <= 1.0
        assert volumes.read(ipath, 1, 32, 16, z, 32).float().mean() > 0
    assert volumes.read(fpath, 0, 64, 32, 0, 64).abs().max() == 0  # z=0 was not a source
    with pytest.raises(SystemExit):
        inference.main(args)  # exists: no silent overwrite
    assert inference.align_volume(str(pyramid), src, 1, 3, fpath, ipath, chunk=CHUNK, pad=PAD,
                                  pairwise=True, resume=True, progress=False)["chunks_run"] == 0
    assert inference.align_volume(str(pyramid), src, 2, 3, fpath, None, tgt_z=0, chunk=CHUNK,
                                  pad=PAD, overwrite=True, progress=False)["chunks_run"] == 4
    expected = expected_field(pyramid, section(6, 64), section(4, 64))
    assert torch.allclose(volumes.read(fpath, 0, 64, 32, 2, 64), expected, atol=1e-5)
    with pytest.raises(MetroemError, match="z_start 1"):
        inference.align_volume(str(pyramid), src, 0, 2, str(tmp_path / "f2"), chunk=CHUNK, pad=PAD,
                               pairwise=True)


def test_smoothing_and_translation_init_tiled_equal_the_whole_image_aligner(pyramid, tmp_path):
    """--translation_init and --smoothing_nm run tile by tile (phase correlation at the first
    stage's MIP, smoothing as a pass with its own context) and give the whole-image field."""
    size = 192
    a, b = section(0, size + 24)[24:, 24:], section(1, size)  # a(p) = section 0 at p + 24
    np.save(tmp_path / "s.npy", np.ascontiguousarray(a))
    np.save(tmp_path / "t.npy", b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = load_aligner(pyramid, translation_init=True, smoothing_nm=32, resolution_nm=4)
    assert whole.smoothing_px == 8.0
    src, tgt = (torch.from_numpy(v)[None, None] for v in (np.ascontiguousarray(a), b))
    expected = whole(src, tgt)
    start = whole.initial_translation(src.float(), tgt.float(), 0)[0, :, 0, 0]
    assert torch.allclose(start, torch.tensor([-24.0, -24.0]), atol=3)  # (+ the stack's own)
    tiled = tiling.align_tiled(whole, a, b, 64)
    assert (tiled - expected).abs().max() < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a gate half open everywhere: keep = (r + 1) / 2
        half = load_aligner(pyramid, smoothing_nm=32, resolution_nm=4, smoothing_gate=(-1, 1))
    assert (tiling.align_tiled(half, a, b, 64) - half(src, tgt)).abs().max() < 1e-3
    out = tmp_path / "f.npy"
    assert inference.main(["--pyramid_path", str(pyramid), "--src", str(tmp_path / "s.npy"),
                           "--tgt", str(tmp_path / "t.npy"), "--field_out", str(out), "--chunk",
                           "64", "--smoothing_nm", "32", "--resolution_nm", "4",
                           "--translation_init", "--no_progress"]) == 0
    assert np.abs(np.load(out) - expected[0].numpy()).max() < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "s.npy", "t.npy"]
    with pytest.raises(MetroemError, match="--resolution_nm"):
        inference.align_files(str(pyramid), str(tmp_path / "s.npy"), str(tmp_path / "t.npy"),
                              str(tmp_path / "g.npy"), chunk=64, smoothing_nm=32)
    with pytest.raises(SystemExit) as bad:
        inference.main(["--pyramid_path", str(pyramid), "--src", str(tmp_path / "s.npy"),
                        "--tgt", str(tmp_path / "t.npy"), "--field_out", str(tmp_path / "g.npy"),
                        "--smoothing_nm", "32", "--resolution_nm", "4", "--smoothing_gate",
                        "0.9,0.5", "--no_progress"])
    assert bad.value.code == 2
    assert not (tmp_path / "g.npy").exists()


def test_pyramid_default_translation_init_and_its_cli_override(pyramid, tmp_path):
    """A pyramid.json with translation_init starts metroem align from the phase correlation;
    --no_translation_init turns it off for one run."""
    pyr = pyramid_with_settings(pyramid, tmp_path / "pyr", '{"translation_init": true}')
    size = 128
    a, b = section(0, size + 24)[24:, 24:], section(1, size)
    np.save(tmp_path / "s.npy", np.ascontiguousarray(a))
    np.save(tmp_path / "t.npy", b)
    src, tgt = (torch.from_numpy(v)[None, None] for v in (np.ascontiguousarray(a), b))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fields_by_option = {
            flag: load_aligner(pyr, translation_init=on)(src, tgt)[0].numpy()
            for flag, on in (("--translation_init", True), ("--no_translation_init", False))}
    gap = np.abs(fields_by_option["--translation_init"]
                 - fields_by_option["--no_translation_init"]).max()
    assert gap > 0.1  # the two starts give different fields on this pair
    for flags, key in (([], "--translation_init"),  # the pyramid's default
                       (["--no_translation_init"], "--no_translation_init")):
        out = tmp_path / f"f{len(flags)}.npy"
        assert inference.main(["--pyramid_path", str(pyr), "--src", str(tmp_path / "s.npy"),
                               "--tgt", str(tmp_path / "t.npy"), "--field_out", str(out),
                               "--chunk", "64", "--no_progress", *flags]) == 0
        assert np.abs(np.load(out) - fields_by_option[key]).max() < 1e-3, key


def test_align_volume_smoothing_uses_the_layer_resolution(pyramid, tmp_path):
    src = make_volume(tmp_path / "img", size=128)
    res = volumes.volume_info(src).resolution[0][0]
    fpath = str(tmp_path / "field")
    assert inference.main(["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "1",
                           "--z_end", "2", "--field_path", fpath, "--chunk", "64", "--smoothing_nm",
                           str(8 * res), "--translation_init", "--no_progress", "--pairwise"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        al = load_aligner(pyramid, translation_init=True, smoothing_nm=8 * res,
                          resolution_nm=res)
    expected = tiling.align_tiled(al, section(5, 128), section(4, 128), 64)
    got = volumes.read(fpath, 0, 64, 32, 1, 128)
    assert torch.allclose(got, expected, atol=1e-4)
    assert not os.listdir(tmp_path / "field" / inference.MARKER_DIR / "stages")
    with pytest.raises(SystemExit):
        inference.main(["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "1",
                        "--z_end", "2", "--field_path", str(tmp_path / "f2"), "--resolution_nm",
                        "4"])


def test_a_layer_of_another_pixel_size_runs_at_the_pyramids_matching_mip(pyramid, tmp_path):
    """A pyramid that knows its pixel size (pyramid.json) aligns a layer with pixels twice as
    large as its own MIP 0 at its MIP 1 with its stages at MIP 1 and coarser, as
    load_aligner(stages, input_mip=1) on the same images; a layer finer than the pyramid
    starts at its MIP 1 and refuses --mip 0 in one line."""
    import shutil

    src = make_volume(tmp_path / "img", size=128)
    res = volumes.volume_info(src).resolution[0][0]
    pyr = tmp_path / "pyr"
    shutil.copytree(pyramid, pyr)
    (pyr / "pyramid.json").write_text(f'{{"resolution_nm": {res / 2}}}')
    assert inference.mip_offset(str(pyr), res) == 1 and inference.mip_offset(str(pyr), res / 2) == 0
    assert inference.mip_offset(str(pyramid), res) == 0  # no pyramid.json: the layer's MIPs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        al = load_aligner(pyr, stages=[0], input_mip=1)  # the tiny pyramid: MIP 1, 0
    expected = tiling.align_tiled(al, section(5, 128), section(4, 128), 64)
    for extra in ([], ["--mip", "0"]):
        fpath = str(tmp_path / f"field{len(extra)}")
        assert inference.main(["--pyramid_path", str(pyr), "--src_path", src, "--z_start", "1",
                               "--z_end", "2", "--field_path", fpath, "--chunk", "64",
                               "--no_progress", "--pairwise", *extra]) == 0
        got = volumes.read(fpath, 0, 64, 32, 1, 128)
        assert torch.allclose(got, expected, atol=1e-4)
        assert (got - expected_field(pyramid, section(5, 128), section(4, 128))).abs().max() > 0.01
    for i, name in enumerate(("a.npy", "b.npy")):  # image files with their pixel size: the same
        np.save(tmp_path / name, section(5 - i, 128))
    assert inference.main(["--pyramid_path", str(pyr), "--src", str(tmp_path / "a.npy"),
                           "--tgt", str(tmp_path / "b.npy"), "--field_out",
                           str(tmp_path / "ab.npy"), "--chunk", "64", "--resolution_nm", str(res),
                           "--no_progress"]) == 0
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "ab.npy"))[None], expected,
                          atol=1e-4)
    (pyr / "pyramid.json").write_text(f'{{"resolution_nm": {res * 2}}}')  # a finer layer
    fpath = str(tmp_path / "fine")
    assert inference.main(["--pyramid_path", str(pyr), "--src_path", src, "--z_start", "1",
                           "--z_end", "2", "--field_path", fpath, "--chunk", "64",
                           "--no_progress", "--pairwise"]) == 0
    assert volumes.read(fpath, 1, 32, 16, 1, 64).abs().max() > 0  # written from MIP 1 up
    assert not volumes.read(fpath, 0, 64, 32, 1, 128).abs().max() > 0
    with pytest.raises(MetroemError, match="finer than the pyramid's MIP 0; pass --mip 1"):
        inference.align_volume(str(pyr), src, 1, 2, str(tmp_path / "f3"), mip=0,
                               pairwise=True, chunk=64, progress=False)
    assert not os.path.exists(tmp_path / "f3")


def test_eval_runs_a_layer_or_files_of_another_pixel_size_at_the_matching_mip(
        pyramid, tmp_path, monkeypatch):
    """metroem eval builds its pyramid method as metroem align does: a layer (its own pixel
    size) or image files (--resolution_nm) twice as coarse as the pyramid run at its MIP 1,
    with the stages at MIP 1 and coarser, and lengths in the data's pixels."""
    import shutil

    from metroem.eval import baselines
    from metroem.eval import cli as eval_cli

    src = make_volume(tmp_path / "img", size=128)
    res = volumes.volume_info(src).resolution[0][0]
    pyr = tmp_path / "pyr"
    shutil.copytree(pyramid, pyr)
    (pyr / "pyramid.json").write_text(f'{{"resolution_nm": {res / 2}}}')
    calls = []
    real = baselines.metroem_method

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(baselines, "metroem_method", spy)
    assert eval_cli.main(["--image_path", src, "--z_start", "1", "--z_end", "2",
                          "--pyramid_path", str(pyr), "--chunk", "32"]) == 0
    for i, name in enumerate(("a.png", "b.png")):
        Image.fromarray(section(5 - i, 128)).save(tmp_path / name)
    assert eval_cli.main(["--src", str(tmp_path / "a.png"), "--tgt", str(tmp_path / "b.png"),
                          "--pyramid_path", str(pyr), "--resolution_nm", str(res),
                          "--smoothing_nm", str(16 * res)]) == 0
    assert [(c["input_mip"], c["stages"]) for c in calls] == [(1, [0]), (1, [0])]
    assert calls[1]["resolution_nm"] == res / 2  # 16 data pixels = 16 * res nm


def test_align_volume_aligns_a_stack_like_the_whole_image_stack(pyramid, tmp_path, capsys):
    """The default for a z range: section z_start-1 is the fixed reference (copied), each
    section is aligned onto the aligned sections before it, tile by tile, and the result equals
    metroem.stack on whole sections with the whole-image aligner."""
    from metroem import stack

    src = make_volume(tmp_path / "img", n=5)
    fpath, ipath = str(tmp_path / "field"), str(tmp_path / "aligned")
    args = ["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "2", "--z_end", "5",
            "--field_path", fpath, "--image_path", ipath, "--chunk", str(CHUNK), "--predecessors",
            "2"]
    # (the default pads, from the nets, cover the whole 64 px region: tiled = whole image)
    assert inference.main(args) == 0
    err = capsys.readouterr().err
    assert "section 1/3 (z 2) done" in err and "section 3/3 (z 4) done" in err and "ETA" in err
    assert len(_drift_lines(err)) == 1  # how the stack's placement moves along z
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = load_aligner(pyramid)
    secs = [torch.from_numpy(section(z + 4, 64))[None, None].float() for z in range(1, 5)]
    aligned, expected = stack.align_stack(secs, stack.aligner_pair_fn(whole), predecessors=2,
                                          dtype=np.uint8)
    assert torch.equal(volumes.read(ipath, 0, 64, 32, 1, 64).float(), secs[0])  # reference
    assert volumes.read(fpath, 0, 64, 32, 1, 64).abs().max() == 0
    assert volumes.read(ipath, 0, 64, 32, 0, 64).abs().max() == 0  # before the reference
    for i, z in enumerate(range(2, 5), start=1):
        got = volumes.read(fpath, 0, 64, 32, z, 64)
        assert (got - expected[i]).abs().max() < 0.01
        img = volumes.read(ipath, 0, 64, 32, z, 64).float()
        assert (img - aligned[i]).abs().max() <= 1.0
        assert volumes.read(ipath, 1, 32, 16, z, 32).float().mean() > 0  # coarser MIP too
    assert not os.listdir(tmp_path / "field" / inference.MARKER_DIR / "stages")
    with pytest.raises(SystemExit):
        inference.main(args)  # exists: no silent overwrite
    with pytest.raises(MetroemError, match="resume"):
        inference.align_volume(str(pyramid), src, 2, 5, fpath, ipath, chunk=CHUNK, resume=True,
                               progress=False)  # other settings (predecessors 1)


def _drift_lines(text: str) -> list[tuple[float, float]]:
    """The per-section slopes of metroem align's "placement moves by" lines."""
    return [(float(a), float(b)) for a, b in re.findall(
        r"placement moves by \(([-+0-9.]+), ([-+0-9.]+)\) px per section", text)]


def test_a_detrended_stack_equals_the_whole_image_one_and_resumes(tmp_path, monkeypatch,
                                                                  caplog):
    """--detrend_sections: the serial stack goes to work layers, the output layers get its
    fields with the trend along z removed: detrend.detrend_fields of the work layers to 0.001
    px, and metroem.stack's align_stack(detrend_sections=) on whole sections to the serial
    stacks' own agreement (models/isbi on 192 px ISBI crops, 128 px chunks: up to 0.02 px). An
    interrupted run resumes to the same layers; the work layers are gone after."""
    from metroem import detrend, stack

    pyramid = str(Path(__file__).resolve().parents[1] / "models" / "isbi")
    src, secs = _noisy_volume(tmp_path / "img", (), n=6)
    kw = dict(chunk=128, progress=True, detrend_sections=2.0)
    once = [str(tmp_path / "f1"), str(tmp_path / "i1")]
    with caplog.at_level("INFO", logger="metroem.inference"):
        inference.align_volume(pyramid, src, 1, 6, *once, **kw)
    (serial_slope, flat_slope) = _drift_lines(caplog.text)  # the serial pass, then detrended
    assert math.hypot(*serial_slope) > 0.5 and math.hypot(*flat_slope) < 0.05
    assert "after detrending" in caplog.text and "takes this out" not in caplog.text
    pair = stack.aligner_pair_fn(load_aligner(pyramid))
    aligned, expected = stack.align_stack(secs, pair, dtype=np.uint8, detrend_sections=2.0)
    _, serial = stack.align_stack(secs, pair, dtype=np.uint8)
    inner = (..., slice(16, -16), slice(16, -16))
    assert max((a - b)[inner].abs().max() for a, b in zip(expected, serial, strict=True)) > 0.1
    for z in range(6):
        got = volumes.read(once[0], 0, 64, 32, z, SIZE_192)
        assert (got - expected[z]).abs().max() < 0.05
        img = volumes.read(once[1], 0, 64, 32, z, SIZE_192).float()
        assert (img - aligned[z]).abs().mean() < 0.1  # rounding, and those hundredths of a px
    assert not os.path.exists(tmp_path / "f1" / inference.MARKER_DIR / "serial" / "field")

    calls = [0]
    real = stack.SectionProgress.step

    def stop_in_the_detrend_pass(self, z, note=""):
        calls[0] += 1
        if calls[0] == 8:  # 5 serial sections, then the reference and 2 detrended ones
            raise KeyboardInterrupt
        real(self, z, note)

    monkeypatch.setattr(stack.SectionProgress, "step", stop_in_the_detrend_pass)
    again = [str(tmp_path / "f2"), str(tmp_path / "i2")]
    with pytest.raises(KeyboardInterrupt):
        inference.align_volume(pyramid, src, 1, 6, *again, **kw)
    monkeypatch.setattr(stack.SectionProgress, "step", real)
    work = tmp_path / "f2" / inference.MARKER_DIR / "serial"
    serial_layers = [volumes.read(str(work / k), 0, 64, 32, 0, SIZE_192, nz=6)
                     for k in ("field", "image")]
    exact = detrend.detrend_fields(list(serial_layers[0][:, None]),
                                   list(serial_layers[1][:, None].float()), 2.0)
    with pytest.raises(MetroemError, match="detrend_sections"):  # other settings: refused
        inference.align_volume(pyramid, src, 1, 6, *again, resume=True, chunk=128,
                               progress=False)
    inference.align_volume(pyramid, src, 1, 6, *again, resume=True, **kw)
    got = volumes.read(again[0], 0, 64, 32, 0, SIZE_192, nz=6)
    assert max(float((got[z] - exact[z][0]).abs().max()) for z in range(6)) < 1e-3
    for a, b in zip(once, again, strict=True):
        assert torch.equal(volumes.read(a, 0, 64, 32, 0, SIZE_192, nz=6),
                           volumes.read(b, 0, 64, 32, 0, SIZE_192, nz=6))


def test_a_stack_without_smoothing_is_warned_about(pyramid, tmp_path, caplog):
    src = make_volume(tmp_path / "img", n=3)
    with caplog.at_level("WARNING", logger="metroem.inference"):
        inference.align_volume(str(pyramid), src, 1, 3, str(tmp_path / "f"),
                               str(tmp_path / "i"), chunk=CHUNK, progress=False)
    assert "without --smoothing_nm" in caplog.text and "shears and shrinks" in caplog.text
    caplog.clear()
    res = volumes.volume_info(src).resolution[0][0]
    with caplog.at_level("WARNING", logger="metroem.inference"):
        inference.align_volume(str(pyramid), src, 1, 3, str(tmp_path / "f2"),
                               str(tmp_path / "i2"), chunk=CHUNK, progress=False,
                               smoothing_nm=8 * res)
    assert "without --smoothing_nm" not in caplog.text


@pytest.mark.parametrize("extra,match", [
    (["--detrend_sections", "0"], "positive number of sections"),
    (["--detrend_sections", "4", "--pairwise"], "for stacks"),
])
def test_bad_detrend_settings_are_one_line_and_write_nothing(pyramid, tmp_path, capsys, extra,
                                                             match):
    src = make_volume(tmp_path / "img", n=3)
    args = ["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "1", "--z_end", "3",
            "--field_path", str(tmp_path / "f"), "--image_path", str(tmp_path / "i"),
            "--chunk", str(CHUNK), *extra]
    with pytest.raises(SystemExit) as stopped:
        inference.main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "f").exists() and not (tmp_path / "i").exists()


def test_an_interrupted_stack_resumes_to_the_same_stack(pyramid, tmp_path, monkeypatch):
    from metroem import stack

    src = make_volume(tmp_path / "img", n=4)
    kw = dict(chunk=CHUNK, pad=PAD, progress=True)
    once = [str(tmp_path / "f1"), str(tmp_path / "i1")]
    inference.align_volume(str(pyramid), src, 1, 4, *once, **kw)
    calls = [0]
    real = stack.SectionProgress.step

    def stop_after_one(self, z, note=""):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        real(self, z, note)

    monkeypatch.setattr(stack.SectionProgress, "step", stop_after_one)
    again = [str(tmp_path / "f2"), str(tmp_path / "i2")]
    with pytest.raises(KeyboardInterrupt):
        inference.align_volume(str(pyramid), src, 1, 4, *again, **kw)
    with pytest.raises(MetroemError, match="--resume"):
        inference.align_volume(str(pyramid), src, 1, 4, *again, **kw)
    monkeypatch.setattr(stack.SectionProgress, "step", real)
    out = inference.align_volume(str(pyramid), src, 1, 4, *again, resume=True, **kw)
    assert out["chunks_run"] == 4  # only the last section was left
    for a, b in zip(once, again, strict=True):
        assert torch.equal(volumes.read(a, 0, 64, 32, 0, 64, nz=4),
                           volumes.read(b, 0, 64, 32, 0, 64, nz=4))


SIZE_192 = 192  # the shipped pyramid's coarse stage needs sections of about 192 px or more


def _noisy_volume(path: Path, wrong: tuple[int, ...], n: int = 7,
                  size: int = SIZE_192) -> tuple[str, list]:
    """ISBI sections with the ``wrong`` ones replaced by noise (not tissue)."""
    g = torch.Generator().manual_seed(11)
    secs = [torch.from_numpy(section(z + 4, size))[None, None].float() for z in range(n)]
    for z in wrong:
        secs[z] = (torch.rand(1, 1, size, size, generator=g) * 200 + 20).round()
    url = volumes.normalize_path(str(path))
    volumes.create_volume(url, (size, size, n), num_mips=2, chunk_xy=32, offset_xyz=(64, 32, 0))
    for z, s in enumerate(secs):
        volumes.write_all_mips(url, 64, 32, z, s.to(torch.uint8))
    return url, secs


def test_a_stack_skips_a_misaligned_section_and_stops_a_runaway(tmp_path, capsys):
    """Layers give the verdicts of metroem.stack's guard (models/isbi on 192 px ISBI crops): a
    wrong section is flagged and not a target; three in a row stop the run with one line, the
    stack before them complete; --resume --runaway_stop 0 finishes it. (The fields of a stack
    equal metroem.stack's: test_align_volume_aligns_a_stack_like_the_whole_image_stack.)"""
    from metroem import stack

    pyramid = str(Path(__file__).resolve().parents[1] / "models" / "isbi")
    whole = stack.aligner_pair_fn(load_aligner(pyramid))
    src, secs = _noisy_volume(tmp_path / "one", (4,))
    f, i = str(tmp_path / "f"), str(tmp_path / "i")
    args = ["--pyramid_path", pyramid, "--src_path", src, "--z_start", "1", "--z_end", "7",
            "--field_path", f, "--image_path", i, "--chunk", str(SIZE_192)]
    assert inference.main(args) == 0
    err = capsys.readouterr().err
    guard = stack.MisalignmentGuard()
    stack.align_stack(secs, whole, dtype=np.uint8, guard=guard)
    assert guard.flagged == {4} and guard.records[4]["target"] == 3  # z 5 onto z 3
    assert "(z 4) done (r " in err and "misaligned, not a target)" in err
    assert err.count("misaligned, not a target)") == 1  # z 5, aligned onto z 3, is fine

    src, secs = _noisy_volume(tmp_path / "run", (3, 4, 5))
    f, i = str(tmp_path / "f2"), str(tmp_path / "i2")
    args = ["--pyramid_path", pyramid, "--src_path", src, "--z_start", "1", "--z_end", "7",
            "--field_path", f, "--image_path", i, "--chunk", str(SIZE_192), "--no_progress"]
    with pytest.raises(SystemExit) as stopped:
        inference.main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: runaway misalignment: z 3, 4, 5") and "--resume" in err[-1]
    assert volumes.read(i, 0, 64, 32, 6, SIZE_192).abs().max() == 0  # nothing after the stop
    assert volumes.read(i, 0, 64, 32, 2, SIZE_192).float().mean() > 0  # before it: complete
    assert inference.main(args + ["--resume", "--runaway_stop", "0"]) == 0
    assert volumes.read(i, 0, 64, 32, 6, SIZE_192).float().mean() > 0
    with pytest.raises(MetroemError, match="misaligned_ratio"):
        inference.align_volume(pyramid, src, 1, 7, str(tmp_path / "f3"), str(tmp_path / "i3"),
                               misaligned_ratio=1.5, progress=False)
    assert not (tmp_path / "f3").exists()


def test_stack_bad_inputs_are_one_line_errors(pyramid, tmp_path):
    src = make_volume(tmp_path / "img", n=3)
    f, i = str(tmp_path / "f"), str(tmp_path / "i")
    cases = [
        ((src, 1, 3, f, None), "--image_path"),
        ((src, 0, 2, f, i), "--z_start 1"),
        ((src, 1, 9, f, i), "--z_end 3"),
    ]
    for args, hint in cases:
        with pytest.raises(MetroemError, match=hint):
            inference.align_volume(str(pyramid), *args, chunk=CHUNK, pad=PAD, progress=False)
    with pytest.raises(MetroemError, match="predecessors"):
        inference.align_volume(str(pyramid), src, 1, 3, f, i, pairwise=True, predecessors=2,
                               chunk=CHUNK, pad=PAD)
    assert not (tmp_path / "f").exists() and not (tmp_path / "i").exists()
