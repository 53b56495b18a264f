"""`metroem export`: one TorchScript file that runs without metroem and matches the aligner."""

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
from PIL import Image

from metroem import export, modules, nets, tiling
from metroem.aligner import load_aligner
from metroem.errors import MetroemError
from metroem.sample_data import isbi_dir

ISBI = isbi_dir()
REPO = Path(modules.__file__).resolve().parent.parent
SPEC = nets.default_spec(levels=4, channels=[4, 8, 8])
CHUNK, PAD = 64, 32


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pyr") / "pyramid"
    torch.manual_seed(1)
    for stage, mip in enumerate((1, 0)):
        info = modules.create_module(root, stage, mip, "t", SPEC)
        model = nets.build_model(SPEC)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        modules.save_weights(info.path, "rand", model.state_dict())
    return root


@pytest.fixture(scope="module")
def exported(pyramid, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "pyr.pt"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert export.main([str(pyramid), str(out), "--chunk", str(CHUNK), "--pad", str(PAD)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def real_inputs(sizes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a, b = (np.asarray(Image.open(ISBI / f"{i:02d}.png")) for i in (5, 6))
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
    model = torch.jit.load({model!r})
    outs = [model(s, t) for s, t in torch.load({inputs!r})]
    torch.save(outs, {out!r})
    assert not any(k.startswith("metroem") or k.startswith("_metroem") for k in sys.modules)
    """
)


def test_export_matches_tiled_aligner_for_any_size(pyramid, exported):
    model = torch.jit.load(str(exported))
    al = aligner(pyramid)
    inputs = real_inputs([(40, 56), (96, 64), (150, 131)])
    outs = [model(s, t) for s, t in inputs]
    for (s, t), got in zip(inputs, outs, strict=True):
        expected = tiling.align_windows(al, s[0, 0].numpy(), t[0, 0].numpy(), CHUNK, PAD)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4
    assert max(float(o.abs().max()) for o in outs) > 0.01  # the exported net does something
    # one chunk is one aligner call on the zero-padded window
    s, t = inputs[0]
    win = tiling.window_size(CHUNK, PAD, al.size_multiple())
    pads = (PAD, win - PAD - 56, PAD, win - PAD - 40)
    with torch.no_grad():
        direct = al(*(torch.nn.functional.pad(x.float(), pads) for x in (s, t)))
    assert (outs[0] - direct[..., PAD : PAD + 40, PAD : PAD + 56]).abs().max() < 1e-4
    # batches, attributes, no silent overwrite
    (s, t), = real_inputs([(64, 64)])
    pair = model(torch.cat([s, t]), torch.cat([t, s]))
    assert pair.shape == (2, 2, 64, 64) and torch.allclose(pair[1:], model(t, s), atol=1e-5)
    assert model.chunk == CHUNK and model.pad == PAD and model.input_mip == 0
    with pytest.raises(MetroemError, match="--overwrite"):
        export.export_pyramid(str(pyramid), str(exported), chunk=CHUNK, pad=PAD)


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
    for (s, t), got in zip(inputs, torch.load(tmp_path / "outs.pt"), strict=True):
        expected = tiling.align_windows(al, s[0, 0].numpy(), t[0, 0].numpy(), CHUNK, PAD)
        assert (got - expected).abs().max() < 1e-4
