"""`metroem export`: one torch.export program that runs without metroem and equals the aligner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isbi_section, pyramid_with_settings, tiny_pyramid
from PIL import Image

from metroem import export, modules, nets, regularize
from metroem.aligner import load_aligner
from metroem.errors import MetroemError

REPO = Path(modules.__file__).resolve().parent.parent
# small enough that torch.export captures the two-stage pyramid in about a minute; with the
# shipped pyramid's inference settings (no-data handling, coarse NCC grid, a Lucas-Kanade step)
SPEC = nets.default_spec(levels=3, channels=[4, 8], local_radius=[1, 1, 1], head_channels=[8, 8, 8],
                         nodata_aware=True, prior_factor=2, lk_iterations=1)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyr") / "pyramid"
    return tiny_pyramid(root, SPEC, checkpoint="rand", noise=0.02, seed=1)


@pytest.fixture(scope="module")
def exported(pyramid, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "pyr.pt2"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # no deprecated torch API
            warnings.simplefilter("error", FutureWarning)
            assert export.main(["--pyramid_path", str(pyramid), str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def real_inputs(sizes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a, b = (np.asarray(Image.open(isbi_section(i))) for i in (5, 6))
    return [
        tuple(torch.from_numpy(x[:h, :w].copy())[None, None] for x in (a, b)) for h, w in sizes
    ]


def aligner(pyramid):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_aligner(pyramid)


ISOLATED = textwrap.dedent(
    """
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "metroem" not in repr(f).lower()]
    sys.path[:] = [p for p in sys.path if p and "metroem" not in p and p != {repo!r}]
    try:
        import metroem
    except ImportError:
        pass
    else:
        raise SystemExit("metroem is still importable")
    import torch
    model = torch.export.load({model!r}).module()
    outs = [model(s.float(), t.float()) for s, t in torch.load({inputs!r})]
    torch.save(outs, {out!r})
    assert not any(k.startswith("metroem") or k.startswith("_metroem") for k in sys.modules)
    """
)


def run(model, s, t):
    with torch.no_grad():
        return model(s.float(), t.float())


def test_export_matches_whole_image_aligner_for_any_size(pyramid, exported):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model, info = export.load_exported(str(exported))
    al = aligner(pyramid)
    # sizes above, below and at multiples of the size multiple (16 here), odd and even
    inputs = real_inputs([(40, 56), (96, 64), (150, 131), (13, 9), (33, 200)])
    outs = [run(model, s, t) for s, t in inputs]
    with torch.no_grad():
        for (s, t), got in zip(inputs, outs, strict=True):
            expected = al(s, t)
            assert got.shape == expected.shape == (1, 2, *s.shape[-2:])
            assert got.dtype == torch.float32
            assert (got - expected).abs().max() < export.CHECK_TOLERANCE
    assert max(float(o.abs().max()) for o in outs) > 0.01  # the exported net does something
    # tissue inside no-data (the fills run in the program, a no-op skipped by the aligner)
    (s, t), = real_inputs([(72, 88)])
    s, t = (torch.nn.functional.pad(x, (16, 8, 24, 16)) for x in (s.clamp_min(1), t.clamp_min(1)))
    with torch.no_grad():
        assert (run(model, s, t) - al(s, t)).abs().max() < export.CHECK_TOLERANCE
    # batches (a pair without data gets a zero field), attributes, bad shapes
    (s, t), = real_inputs([(64, 64)])
    pair = run(model, torch.cat([s, t, torch.zeros_like(s)]), torch.cat([t, s, t]))
    with torch.no_grad():
        expected = al(torch.cat([s, t]), torch.cat([t, s]))
    assert pair.shape == (3, 2, 64, 64) and (pair[:2] - expected).abs().max() < 1e-2
    assert not pair[2].any()
    assert not pair.requires_grad
    assert info["input_mip"] == 0 and info["mips"] == [1, 0]
    assert not run(model, torch.zeros_like(s), t).any()
    with pytest.raises(Exception):  # noqa: B017 - torch reports the shape mismatch its own way
        run(model, s, t[..., :32])
    with pytest.raises(MetroemError, match="--overwrite"):
        export.export_pyramid(str(pyramid), str(exported))


def test_export_that_disagrees_with_the_pyramid_is_never_written(pyramid, tmp_path, monkeypatch):
    """The program is checked against the loaded pyramid before anything is written (here a
    stand-in for the captured program, with perturbed weights: no minutes-long capture)."""

    class Captured:
        def __init__(self, module):
            self.copy = module

        def module(self):
            with torch.no_grad():
                for p in self.copy.aligner.stages[-1].parameters():
                    p.mul_(1.5)
            return self.copy

    monkeypatch.setattr(export, "_capture", lambda module, multiple: Captured(module))
    out = tmp_path / "x.pt2"
    with pytest.raises(MetroemError, match="differs from the loaded one"):
        export.export_pyramid(str(pyramid), str(out))
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_export_runs_without_metroem(pyramid, exported, tmp_path):
    inputs = real_inputs([(40, 56), (150, 131)])
    torch.save(inputs, tmp_path / "inputs.pt")
    script = ISOLATED.format(repo=str(REPO), model=str(exported),
                             inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "outs.pt"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    al = aligner(pyramid)
    with torch.no_grad():
        for (s, t), got in zip(inputs, torch.load(tmp_path / "outs.pt"), strict=True):
            assert (got - al(s, t)).abs().max() < export.CHECK_TOLERANCE


@pytest.mark.slow
def test_export_carries_the_field_smoothing_and_its_gate(pyramid, tmp_path):
    """With a smoothing length (here 128 nm at 4 nm pixels: a 32 px window on an 8 px grid)
    the program returns the smoothed, gated field the aligner gives, at sizes on and off the
    smoothing grid; its info file records the settings in pixels."""
    out = tmp_path / "smooth.pt2"
    assert export.main(["--pyramid_path", str(pyramid), str(out), "--smoothing_nm", "128",
                        "--resolution_nm", "4"]) == 0
    model, info = export.load_exported(str(out))
    assert info["smoothing_px"] == 32 and info["smoothing_gate"] == list(regularize.GATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smooth = load_aligner(pyramid, smoothing_nm=128, resolution_nm=4)
    raw = aligner(pyramid)
    for s, t in real_inputs([(40, 56), (96, 64), (150, 131), (33, 200)]):
        got = run(model, s, t)
        with torch.no_grad():
            expected, unsmoothed = smooth(s, t), raw(s, t)
        assert (got - expected).abs().max() < export.CHECK_TOLERANCE
        assert (expected - unsmoothed).abs().max() > 0.05  # the smoothing is in the program


def test_export_of_a_pyramid_that_starts_from_phase_correlation_says_it_does_not(
        pyramid, tmp_path, caplog):
    """A pyramid whose pyramid.json starts pairs from the phase-correlation translation exports
    the field without that start (the program has no such step) and says so."""
    import logging

    pyr = pyramid_with_settings(pyramid, tmp_path / "pyr", '{"translation_init": true}')
    out = tmp_path / "pc.pt2"
    with caplog.at_level(logging.WARNING, logger="metroem.export"):
        assert export.main(["--pyramid_path", str(pyr), str(out)]) == 0
    assert "phase-correlation start" in caplog.text and "not exported" in caplog.text
    model, _ = export.load_exported(str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unstarted = load_aligner(pyr, translation_init=False)
    for s, t in real_inputs([(96, 64)]):
        with torch.no_grad():
            assert (run(model, s, t) - unstarted(s, t)).abs().max() < export.CHECK_TOLERANCE
