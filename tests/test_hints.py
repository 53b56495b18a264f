"""Issue 15, item 10: the hints of one-line errors and --help name the right command and flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def metroem(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metroem.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=str(REPO))


def error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1
    return lines[-1]


def test_missing_volume_suggests_ingest_and_names_no_foreign_flag(tmp_path):
    line = error_line(metroem("align", "--pyramid_path", "models/demo", "--src_path",
                              tmp_path / "nope", "--z_start", 1, "--z_end", 2, "--pairwise",
                              "--field_path", tmp_path / "f"))
    assert "metroem ingest" in line
    assert "--cv_path" not in line and "metroem-demo-volume" not in line


def test_z_end_past_the_volume_names_z_end(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64), 50 + i, np.uint8)).save(folder / f"{i}.png")
    assert metroem("ingest", folder, tmp_path / "vol", "--num_mips", 4).returncode == 0
    line = error_line(metroem("align", "--pyramid_path", "models/demo", "--src_path",
                              tmp_path / "vol", "--z_start", 1, "--z_end", 9, "--pairwise",
                              "--field_path", tmp_path / "f"))
    assert "pass --z_end 3 or less" in line and "--z_start" not in line
    line = error_line(metroem("align", "--pyramid_path", "models/demo", "--src_path",
                              tmp_path / "vol", "--z_start", 0, "--z_end", 2, "--pairwise",
                              "--field_path", tmp_path / "f"))
    assert "start at --z_start 1" in line
    assert not (tmp_path / "f").exists()


def test_help_texts():
    r = metroem("align", "--help")
    assert r.returncode == 0
    assert "``" not in r.stdout and "align two images" in r.stdout
    r = subprocess.run([sys.executable, "download_image.py", "--help"], capture_output=True,
                       text=True, cwd=str(REPO))
    assert r.returncode == 0
    block = r.stdout[r.stdout.index("--defect_threshold DEFECT_THRESHOLD"):]
    assert "become 0 (no data" in " ".join(block.split())


def test_template_recipe_copies_the_pyramid_before_training():
    """models/README says: copy a definition before training it; the recipe's comment agrees."""
    text = (REPO / "models" / "template_m8m6m4" / "train.yaml").read_text()
    commands = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert any("cp -r models/template_m8m6m4" in ln for ln in commands)
    assert not any("--pyramid_path models/" in ln for ln in commands)


# --- item 9: --threads on every command ---------------------------------------------------------

COMMANDS = ["demo", "demo-volume", "ingest", "download-image", "download-field", "train",
            "generate", "align", "export", "eval", "worker"]


def command_help(name: str, capsys) -> str:
    """``metroem NAME --help`` in this process (the dispatcher's own entry for NAME)."""
    import importlib

    from metroem import cli

    module, func = cli.COMMANDS[name][0].split(":")
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), func)(["--help"])
    assert e.value.code == 0, name
    return capsys.readouterr().out


def test_every_command_takes_threads_and_verbosity(capsys):
    from metroem import cli

    assert set(COMMANDS) <= set(cli.COMMANDS)
    for name in cli.COMMANDS:
        text = " ".join(command_help(name, capsys).split())
        if name != "pretrained":  # lists and copies files: no computation to thread
            assert "--threads N" in text and "one per core" in text, name
        assert "--verbose" in text and "--quiet" in text, name
    assert metroem("align", "--help").returncode == 0  # the dispatcher itself, as installed
    line = error_line(metroem("ingest", "a", "b", "--threads", "0"))
    assert "--threads 0" in line


def test_threads_are_used_and_shown_in_the_header(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("s", "t"):
        img = rng.integers(1, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / f"{name}.png")
    r = metroem("align", "--pyramid_path", "models/demo", "--src", tmp_path / "s.png", "--tgt",
                tmp_path / "t.png", "--field_out", tmp_path / "f.npy", "--no_progress",
                "--threads", 2, "--mip", 1)
    assert r.returncode == 0, r.stderr  # the tests run with OMP_NUM_THREADS=1: 2 is the flag's
    assert r.stderr.splitlines()[0] == "2 CPU threads (--threads)"
