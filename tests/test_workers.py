"""metroem.workers: a stack in blocks, on python-task-queue workers (fq:// folder queues)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from metroem import fields, inference, tiling, volumes, workers
from metroem.errors import MetroemError

sys.path.insert(0, os.path.dirname(__file__))
from test_align_cli import CHUNK, make_volume, one_thread, pyramid  # noqa: E402,F401

pytest.importorskip("taskqueue")


def read_all(path: str, n: int) -> torch.Tensor:
    return volumes.read(path, 0, 64, 32, 0, 64, nz=n).float()


def test_compose_chunk_equals_composing_whole_fields():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(1, 2, 40, 56, generator=g) * 3
    second = torch.randn(1, 2, 40, 56, generator=g) * 4
    whole = fields.compose(first, second)
    store = tiling.MemoryFieldStore(40, 56)
    store.field = first
    for c in tiling.plan_chunks(40, 56, 16):
        part = second[..., c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w]
        got = tiling.compose_chunk(store.read, part, c)
        assert torch.allclose(got, whole[..., c.y0 : c.y0 + c.h, c.x0 : c.x0 + c.w], atol=1e-4)


def test_one_block_is_the_serial_stack(pyramid, tmp_path):  # noqa: F811
    src = make_volume(tmp_path / "img", n=4)
    kw = dict(chunk=CHUNK, progress=False)
    serial = [str(tmp_path / "f1"), str(tmp_path / "i1")]
    inference.align_volume(str(pyramid), src, 1, 4, *serial, **kw)
    blocked = [str(tmp_path / "f2"), str(tmp_path / "i2")]
    out = inference.align_volume(str(pyramid), src, 1, 4, *blocked, block_size=8, **kw)
    assert out["blocks"] == 1
    assert (read_all(serial[0], 4) - read_all(blocked[0], 4)).abs().max() < 1e-4
    assert (read_all(serial[1], 4) - read_all(blocked[1], 4)).abs().max() <= 1


def test_one_block_detrended_is_the_serial_detrended_stack(pyramid, tmp_path,  # noqa: F811
                                                          caplog):
    """--detrend_sections with --block_size: stitching keeps each section's placement sums and
    the detrending tasks apply the corrections; one block is the serial run, detrended."""
    src = make_volume(tmp_path / "img", n=5)
    kw = dict(chunk=CHUNK, progress=False, detrend_sections=2.0)
    serial = [str(tmp_path / "f1"), str(tmp_path / "i1")]
    inference.align_volume(str(pyramid), src, 1, 5, *serial, **kw)
    plain = [str(tmp_path / "f0"), str(tmp_path / "i0")]
    inference.align_volume(str(pyramid), src, 1, 5, *plain, chunk=CHUNK, progress=False)
    assert (read_all(serial[0], 5) - read_all(plain[0], 5)).abs().max() > 0.05  # it did act
    blocked = [str(tmp_path / "f2"), str(tmp_path / "i2")]
    caplog.clear()
    with caplog.at_level("INFO", logger="metroem"):
        out = inference.align_volume(str(pyramid), src, 1, 5, *blocked, block_size=8, **kw)
    assert out["blocks"] == 1
    drift = [r.getMessage() for r in caplog.records if "placement moves" in r.getMessage()]
    assert len(drift) == 2 and "after detrending" in drift[1]  # the whole stack's, once
    assert (read_all(serial[0], 5) - read_all(blocked[0], 5)).abs().max() < 1e-3
    assert (read_all(serial[1], 5) - read_all(blocked[1], 5)).abs().max() <= 1
    work = tmp_path / "f2" / inference.MARKER_DIR / "serial"
    assert not (work / "field").exists() and not (work / "image").exists()


def test_blocks_and_references():
    job = workers.StackJob("/w", "p", "s", 5, 12, "f", "i", block_size=3)
    assert job.blocks() == [(4, [5, 6, 7]), (7, [8, 9, 10]), (10, [11])]


@pytest.mark.slow
@pytest.mark.parametrize("detrend", [None, 2.0])
def test_two_queue_workers_give_the_single_process_stack(pyramid, tmp_path,  # noqa: F811
                                                         detrend):
    src = make_volume(tmp_path / "img", n=6)
    kw = dict(chunk=CHUNK, block_size=2, progress=False, detrend_sections=detrend)
    single = [str(tmp_path / "f1"), str(tmp_path / "i1")]
    out = inference.align_volume(str(pyramid), src, 1, 6, *single, **kw)
    assert out["blocks"] == 3
    queue = f"fq://{tmp_path / 'queue'}"
    multi = [str(tmp_path / "f2"), str(tmp_path / "i2")]
    rc = inference.main(["--pyramid_path", str(pyramid), "--src_path", src, "--z_start", "1",
                         "--z_end", "6", "--field_path", multi[0], "--image_path", multi[1],
                         "--chunk", str(CHUNK), "--block_size", "2", "--queue", queue,
                         "--no_progress"]
                        + (["--detrend_sections", str(detrend)] if detrend else []))
    assert rc == 0
    assert volumes.read(multi[0], 0, 64, 32, 0, 64, nz=6).abs().max() == 0  # only enqueued
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "metroem.cli", "worker", queue,
                               "--lease_seconds", "120"], env=env, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    ran = [int(e.split("done: ")[1].split()[0]) for e in errs]
    # three block tasks, then three stitching tasks (then three detrending tasks)
    assert sum(ran) == 3 + 3 + (3 if detrend else 0)
    for a, b in zip(single, multi, strict=True):
        volumes.forget(b)
        assert torch.equal(read_all(a, 6), read_all(b, 6))
    assert read_all(single[0], 6)[0].abs().max() == 0  # z 0, the reference: zero field
    assert read_all(single[0], 6)[5].abs().max() > 0


def test_queue_bad_inputs_are_one_line_errors(pyramid, tmp_path, capsys):  # noqa: F811
    src = make_volume(tmp_path / "img", n=3)
    (tmp_path / "plain").write_text("x")
    f, i = str(tmp_path / "f"), str(tmp_path / "i")
    with pytest.raises(MetroemError, match="cannot open the task queue"):
        inference.align_volume(str(pyramid), src, 1, 3, f, i, chunk=CHUNK, block_size=1,
                               queue=f"fq://{tmp_path / 'plain' / 'q'}")
    with pytest.raises(MetroemError, match="--block_size"):
        inference.align_volume(str(pyramid), src, 1, 3, f, i, chunk=CHUNK, queue="fq:///tmp/q")
    with pytest.raises(MetroemError, match="for stacks"):
        inference.align_volume(str(pyramid), src, 1, 3, f, None, chunk=CHUNK, pairwise=True,
                               block_size=2)
    assert not os.path.exists(f) and not os.path.exists(i)
    with pytest.raises(SystemExit) as e:
        workers.main([f"fq://{tmp_path / 'missing'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: queue") and "Traceback" not in "".join(err)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MetroemError, match="no stack job"):
            workers.StackJob.load(str(tmp_path))
