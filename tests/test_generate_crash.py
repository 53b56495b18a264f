"""Field generation killed midway: nothing half-written under a final name; a rerun redoes it.

``metroem generate`` is SIGKILLed at moments spread over a clean run's duration (before, during
and after its writes). Whatever the moment, every field/image dataset that carries a final name
reads back complete and equal to the clean run's, no temp file keeps a final name, and running
generation again produces exactly the clean run's files.
"""

from __future__ import annotations

import time
from pathlib import Path

import forked
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_spec

from metroem import datasets, modules, nets

CKPT = "gen"


GENERATE = ["-m", "metroem.cli"]


def _generate_argv(run) -> list[str]:
    return ["generate", "--pyramid_path", str(run.pyramid), "--dataset_path", str(run.data),
            "--checkpoint_name", CKPT, "--stage", "0"]


def _generate(forker, run) -> forked.Tool:
    """``python -m metroem.cli generate ...`` in a fresh process (forked: see tests/forked.py)."""
    return forked.Tool(forker, GENERATE, _generate_argv(run), REPO, subprocess_env(),
                       run.root / "logs")


def _outputs(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every dataset generation writes (checkpoint-tagged field and image files), read back."""
    out = {}
    for s in datasets.list_datasets(str(folder)):
        if s.tag == CKPT:
            d = datasets.read_field_dataset(s.path)
        elif s.kind == "image" and s.suffix == CKPT:
            d = datasets.read_image_dataset(s.path)
        else:
            continue
        out[Path(s.path).name] = (d.data, d.translation)
    return out


@pytest.mark.slow
def test_killed_generation_leaves_complete_files_and_reruns_cleanly(tiny_run):
    # Stage 0 needs weights under the checkpoint name; any fixed weights do.
    stage0 = tiny_run.module(0)
    model = nets.build_model(modules.read_spec(stage0)[0] or tiny_spec())
    modules.save_weights(stage0, CKPT, model.state_dict())

    forker = forked.forkserver()
    t0 = time.time()
    clean = _generate(forker, tiny_run).wait(300)
    duration = time.time() - t0
    assert clean.returncode == 0, clean.stderr
    reference = _outputs(tiny_run.data)
    assert reference, "generation wrote nothing"
    for name in reference:
        (tiny_run.data / name).unlink()

    killed_midway = 0
    for frac in (0.3, 0.5, 0.65, 0.8, 0.9, 0.97):
        proc = _generate(forker, tiny_run)
        time.sleep(duration * frac)
        if proc.poll() is None:
            proc.kill()  # SIGKILL
            killed_midway += 1
        proc.wait(timeout=60)
        # Whatever exists under a final name is complete and equal to the clean run.
        for name, (data, translation) in _outputs(tiny_run.data).items():
            assert np.array_equal(data, reference[name][0]), name
            assert np.array_equal(translation, reference[name][1]), name
        # A rerun redoes it cleanly (stale temp files of the killed writer do not block it).
        again = _generate(forker, tiny_run).wait(300)
        assert again.returncode == 0, again.stderr
        after = _outputs(tiny_run.data)
        assert after.keys() == reference.keys()
        for name, (data, translation) in after.items():
            assert np.array_equal(data, reference[name][0]) and np.array_equal(
                translation, reference[name][1]
            ), name
        for name in after:
            (tiny_run.data / name).unlink()
    assert killed_midway >= 3, "the kills all landed after generation finished"
