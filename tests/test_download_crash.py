"""download_image.py / download_field.py killed midway, rerun, and run twice at once.

Real subprocesses on real file:// volumes: a cut big enough to take a few seconds with
``--parallel 1`` is SIGKILLed as soon as its temporary file holds data. The final name must
never appear before a writer finishes, a rerun must complete and clean up the dead writer's
temporary and lock files, and a second concurrent writer must stop with a one-line error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_cases import child_env

from metroem import datasets, volumes

REPO = Path(__file__).resolve().parents[1]
SIZE, NZ = 1024, 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vols(tmp_path_factory) -> dict[str, str]:
    """Random (incompressible, so slow to write) image and field volumes."""
    root = tmp_path_factory.mktemp("crash_vols")
    g = torch.Generator().manual_seed(0)
    image = volumes.normalize_path(str(root / "image"))
    volumes.create_volume(image, (SIZE, SIZE, NZ), 1, chunk_xy=64)
    volumes.write(image, 0, 0, 0, 0, torch.randint(1, 255, (NZ, 1, SIZE, SIZE), generator=g))
    fld = volumes.normalize_path(str(root / "field"))
    volumes.create_volume(fld, (SIZE, SIZE, NZ), 1, dtype="float32", num_channels=2,
                          chunk_xy=64)
    volumes.write(fld, 0, 0, 0, 0, torch.randn(NZ, 2, SIZE, SIZE, generator=g))
    return {"image": image, "field": fld}


def _command(tool: str, vols: dict, dst: Path) -> tuple[list[str], str]:
    common = ["--dst_folder", str(dst), "--z_start", "1", "--z_end", str(NZ), "--x_offset",
              str(SIZE // 2), "--y_offset", str(SIZE // 2), "--parallel", "1"]
    if tool == "image":
        argv = ["download_image.py", "--cv_path", vols["image"], *common, "--mip", "0",
                "--patch_size", str(SIZE)]
        name = datasets.image_filename(SIZE // 2, SIZE // 2, 1, 0)
    else:
        argv = ["download_field.py", "--cv_path", vols["field"], *common, "--src_mip", "0",
                "--dst_mip", "0", "--patch_size", str(SIZE), "--suffix", "k"]
        name = datasets.field_filename(0, SIZE // 2, SIZE // 2, 1, 0, "k")
    return [sys.executable, str(REPO / argv[0]), *argv[1:]], name


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=str(REPO))


def _wait_for_data(proc: subprocess.Popen, dst: Path, final: str, timeout: float = 120) -> Path:
    """Poll until the writer's temp file holds data; the final name must not exist meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert not (dst / final).exists(), "the final name appeared before the writer finished"
        temps = list(dst.glob(f".{final}.tmp-*")) if dst.is_dir() else []
        if temps and temps[0].stat().st_size > 64 * 1024:
            return temps[0]
        if proc.poll() is not None:
            raise AssertionError(f"writer ended before writing data: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("the writer never wrote data")


def _check_complete(tool: str, vols: dict, path: Path) -> None:
    if tool == "image":
        d = datasets.read_image_dataset(str(path))
        assert d.data.shape == (NZ - 1, 2, SIZE, SIZE)
        for i in (0, NZ - 2):  # first and last pair equal the volume's sections
            z = i + 1
            np.testing.assert_array_equal(d.data[i, 0], volumes.read(vols["image"], 0, 0, 0, z,
                                                                     SIZE)[0, 0].numpy())
            np.testing.assert_array_equal(d.data[i, 1], volumes.read(vols["image"], 0, 0, 0,
                                                                     z - 1, SIZE)[0, 0].numpy())
    else:
        d = datasets.read_field_dataset(str(path))
        assert d.data.shape == (NZ - 1, 2, SIZE, SIZE) and np.isfinite(d.data).all()
        raw = volumes.read(vols["field"], 0, 0, 0, NZ - 1, SIZE)[0].numpy()
        t = d.translation[-1].astype(np.float32).reshape(2, 1, 1)
        np.testing.assert_allclose(d.data[-1] + t, raw, atol=1e-5)


@pytest.mark.parametrize("tool", ["image", "field"])
def test_killed_download_leaves_no_final_file_and_rerun_completes(vols, tmp_path, tool):
    dst = tmp_path / "out"
    cmd, final = _command(tool, vols, dst)
    proc = _start(cmd)
    temp = _wait_for_data(proc, dst, final)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    left = sorted(os.listdir(dst))
    assert final not in left and temp.name in left  # the dead writer's debris, hidden
    assert all(n.startswith(".") for n in left)
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(os.listdir(dst)) == [final]  # stale temp and lock files are gone
    _check_complete(tool, vols, dst / final)


def test_two_writers_of_one_dataset(vols, tmp_path):
    dst = tmp_path / "out"
    cmd, final = _command("image", vols, dst)
    # The second writer is download_image's real entry point in a process that has already
    # imported metroem, so it starts writing at once when told to (imports take seconds).
    second = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom metroem.download import download_image_main\n"
         "sys.stdin.readline()\ndownload_image_main(sys.argv[1:])", *cmd[2:]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(), cwd=str(REPO),
    )
    first = _start(cmd)
    try:
        _wait_for_data(first, dst, final)
        _, err2 = second.communicate("go\n", timeout=120)
    finally:
        _, err = first.communicate(timeout=300)
        second.kill()
    assert second.returncode == 2 and "Traceback" not in err2
    line = err2.strip().splitlines()[-1]
    assert line.startswith("error: another process") and f"pid {first.pid}" in line
    assert first.returncode == 0, err[-2000:]
    assert sorted(os.listdir(dst)) == [final]
    _check_complete("image", vols, dst / final)
