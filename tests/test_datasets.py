"""Atomic writes, file locks, the h5 schema (write/read/validate) and PairDataset."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from metroem import datasets as D
from metroem.atomic import FileLock, atomic_path, atomic_write_bytes, lock_path_for
from metroem.errors import MetroemError

# ----------------------------------------------------------------------------- helpers


def names(folder) -> set[str]:
    return set(os.listdir(folder))


def assert_no_hidden(folder) -> None:
    hidden = [n for n in os.listdir(folder) if n.startswith(".")]
    assert hidden == [], f"temp/lock files left behind: {hidden}"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def image_attrs(n: int, mip: int = 2, x: int = 1024, y: int = 2048, z0: int = 10) -> dict:
    return {"mip": mip, "x_offset": x, "y_offset": y, "z": list(range(z0, z0 + n)), "source": "s"}


def field_attrs(n: int, mip: int = 2, x: int = 1024, y: int = 2048, z0: int = 10) -> dict:
    return {**image_attrs(n, mip, x, y, z0), "stage": 0, "tag": "t"}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- atomic


def test_atomic_path_renames_on_success(tmp_path):
    final = tmp_path / "out.bin"
    with atomic_path(str(final)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp).startswith(".out.bin.tmp-")
        with open(tmp, "wb") as f:
            f.write(b"abc")
        assert not final.exists()
    assert final.read_bytes() == b"abc"
    assert names(tmp_path) == {"out.bin"}


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_atomic_path_removes_temp_on_exception(tmp_path, exc):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_path(str(final)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise exc()
    assert final.read_bytes() == b"old"
    assert names(tmp_path) == {"out.bin"}


def test_atomic_write_bytes(tmp_path):
    atomic_write_bytes(str(tmp_path / "a"), b"1")
    atomic_write_bytes(str(tmp_path / "a"), b"22")
    assert (tmp_path / "a").read_bytes() == b"22"
    assert names(tmp_path) == {"a"}


def test_file_lock_held_by_live_process(tmp_path):
    target = tmp_path / "x.h5"
    lock = lock_path_for(str(target))
    live = os.getppid()  # our parent is alive
    with open(lock, "w") as f:
        f.write(f"{live}\n")
    with pytest.raises(MetroemError) as e:
        FileLock(str(target)).acquire()
    msg = one_line(e)
    assert f"another process (pid {live}) is writing {target}" in msg
    assert f"remove the stale lock file {lock}" in msg
    assert os.path.exists(lock)  # not stolen


def test_file_lock_takes_over_stale_lock_and_releases(tmp_path):
    target = tmp_path / "x.h5"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now dead
    with open(lock_path_for(str(target)), "w") as f:
        f.write(f"{proc.pid}\n")
    with FileLock(str(target)) as lk:
        assert open(lk.path).read().strip() == str(os.getpid())
        with pytest.raises(MetroemError):  # a second writer in a live process is refused
            FileLock(str(target)).acquire()
    assert names(tmp_path) == set()


def test_file_lock_appears_with_its_pid_already_written(tmp_path, monkeypatch):
    """The lock is linked into place after the pid is written: a process killed while taking
    it never leaves a lock without a pid (which a resume right after would have to refuse)."""
    target = tmp_path / "x.h5"
    seen = []
    real_link = os.link

    def watching_link(src, dst):
        seen.append(open(src).read())
        real_link(src, dst)

    monkeypatch.setattr(os, "link", watching_link)
    with FileLock(str(target)) as lk:
        assert seen == [f"{os.getpid()}\n"] and open(lk.path).read() == seen[0]
        assert names(tmp_path) == {lk.path.rsplit("/", 1)[1]}  # the temporary name is gone
    assert names(tmp_path) == set()


# ----------------------------------------------------------------------------- names


def test_filename_builders_and_parsers_round_trip():
    n = D.image_filename(200960, -136448, 8175, 12)
    assert n == "x200960_y-136448_z8175_MIP12.h5"
    assert D.parse_image_filename("/a/b/" + n) == D.ImageName(200960, -136448, 8175, 12, None)
    s = D.image_filename(1, 2, 3, 4, suffix="a_b")
    assert D.parse_image_filename(s) == D.ImageName(1, 2, 3, 4, "a_b")
    f = D.field_filename(1, 200960, 136448, 8175, 5, "precomputed_v2")
    assert f == "field_1_x200960_y136448_z8175_MIP5_precomputed_v2.h5"
    assert D.parse_field_filename(f) == D.FieldName(1, 200960, 136448, 8175, 5, "precomputed_v2")
    assert D.parse_image_filename(f) is None and D.parse_field_filename(n) is None
    assert D.parse_image_filename("x1_y2_z3_MIP.h5") is None
    with pytest.raises(MetroemError):
        D.field_filename(0, 1, 2, 3, 4, "a/b")


# ----------------------------------------------------------------------------- write / read


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_image_round_trip(tmp_path, rng, dtype):
    pairs = (rng.random((3, 2, 16, 16)) * 255).astype(dtype)
    t = np.array([[0, 0], [32, -64], [0, 32]])
    path = D.write_image_dataset(
        str(tmp_path / D.image_filename(1024, 2048, 10, 2)), pairs, image_attrs(3), translation=t
    )
    out = D.read_image_dataset(path)
    assert out.data.dtype == dtype
    np.testing.assert_array_equal(out.data, pairs)
    np.testing.assert_array_equal(out.translation, t)
    assert out.z == [10, 11, 12]
    a = out.attrs
    assert (a["axis_order"], a["kind"], a["mip"], a["patch_size"]) == ("zyx", "image", 2, 16)
    assert a["dtype"] == np.dtype(dtype).name and a["normalisation"] == "none"
    assert a["schema_version"] == D.SCHEMA_VERSION and "metroem_version" in a
    with h5py.File(path) as f:  # lossless storage: gzip, never scaleoffset
        assert f["img"].compression == "gzip" and f["img"].scaleoffset is None
    assert names(tmp_path) == {os.path.basename(path)}


def test_field_round_trip_exact(tmp_path, rng):
    fld = rng.normal(0, 3, (2, 2, 8, 8)).astype(np.float32)
    t = np.array([[256, 0], [-512, 256]])
    path = str(tmp_path / D.field_filename(0, 1024, 2048, 10, 2, "t"))
    D.write_field_dataset(path, fld, t, field_attrs(2))
    out = D.read_field_dataset(path)
    np.testing.assert_array_equal(out.data, fld)  # bit-exact: no lossy compression
    np.testing.assert_array_equal(out.translation, t)
    assert out.attrs["stage"] == 0 and out.attrs["tag"] == "t" and out.attrs["kind"] == "field"
    meta = D.read_field_dataset(path, load_data=False)
    assert meta.data is None and meta.shape == (2, 2, 8, 8) and meta.z == [10, 11]
    np.testing.assert_array_equal(meta.translation, t)


def test_writer_refuses_overwrite_and_nan(tmp_path, rng):
    path = str(tmp_path / "x0_y0_z1_MIP0.h5")
    D.write_image_dataset(path, np.ones((1, 2, 4, 4), np.float32), image_attrs(1))
    with pytest.raises(MetroemError) as e:
        D.write_image_dataset(path, np.zeros((1, 2, 4, 4), np.float32), image_attrs(1))
    assert "already exists; pass --overwrite" in one_line(e)
    D.write_image_dataset(path, np.zeros((1, 2, 4, 4)), image_attrs(1), overwrite=True)
    assert D.read_image_dataset(path).data.max() == 0
    bad = np.zeros((2, 2, 4, 4), np.float32)
    bad[1, 0, 2, 2] = np.nan
    other = str(tmp_path / "x0_y0_z1_MIP1.h5")
    with pytest.raises(MetroemError) as e:
        D.write_image_dataset(other, bad, image_attrs(2))
    assert "NaN" in one_line(e)
    assert names(tmp_path) == {"x0_y0_z1_MIP0.h5"}
    with pytest.raises(MetroemError):
        D.write_image_dataset(other, np.zeros((2, 4, 4)), image_attrs(2))


def write_upstream(path, arr_xy, key="img"):
    """What upstream MetroEM writes: (N, 2, S, S) in CloudVolume (x, y) order, no attributes."""
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=arr_xy)


@pytest.mark.parametrize("key", ["img", "main"])
def test_reads_upstream_files_transposed(tmp_path, rng, key):
    pairs_yx = rng.random((2, 2, 8, 8)).astype(np.float32)
    path = str(tmp_path / "x100_y200_z7_MIP3.h5")
    write_upstream(path, np.swapaxes(pairs_yx, -1, -2), key)  # stored as [..., x, y]
    out = D.read_image_dataset(path)
    np.testing.assert_array_equal(out.data, pairs_yx)
    assert out.attrs["axis_order"] == "xy" and out.attrs["mip"] == 3
    assert out.z == [7, 8] and out.translation.tolist() == [[0, 0], [0, 0]]
    ds = D.PairDataset(str(tmp_path), mip=3)
    assert len(ds) == 2
    item = ds[1]
    np.testing.assert_array_equal(item["src"][0].numpy(), pairs_yx[1, 0])
    np.testing.assert_array_equal(item["tgt"][0].numpy(), pairs_yx[1, 1])
    assert item["z"] == 8


def make_good(tmp_path, rng, n=4, s=32) -> str:
    path = str(tmp_path / "x0_y0_z1_MIP0.h5")
    D.write_image_dataset(path, rng.random((n, 2, s, s)).astype(np.float32), image_attrs(n))
    return path


def test_truncated_file_is_reported(tmp_path, rng):
    path = make_good(tmp_path, rng)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(MetroemError) as e:
        D.read_image_dataset(path)
    msg = one_line(e)
    assert path in msg and "re-cut" in msg


def test_corrupt_bytes_are_reported(tmp_path, rng):
    path = make_good(tmp_path, rng)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # scribble over the middle of the pair data
        f.seek(size // 2)
        f.write(b"\x00garbage!" * 200)
    with pytest.raises(MetroemError) as e:
        D.read_image_dataset(path)
    assert path in one_line(e) and "corrupt" in str(e.value)


def test_non_h5_and_foreign_h5_are_reported(tmp_path):
    txt = tmp_path / "x0_y0_z1_MIP0.h5"
    txt.write_text("hello, not hdf5\n")
    with pytest.raises(MetroemError) as e:
        D.read_image_dataset(str(txt))
    assert str(txt) in one_line(e)
    foreign = str(tmp_path / "foreign.h5")
    with h5py.File(foreign, "w") as f:
        f.create_dataset("volume", data=np.zeros((2, 2, 4, 4)))
    with pytest.raises(MetroemError) as e:
        D.read_image_dataset(foreign)
    msg = one_line(e)
    assert "not a metroem image dataset" in msg and "volume" in msg and "re-cut" in msg
    with pytest.raises(MetroemError) as e:
        D.read_field_dataset(foreign)
    assert "not a metroem field dataset" in one_line(e)
    with pytest.raises(MetroemError):
        D.read_image_dataset(str(tmp_path / "missing.h5"))


def test_nan_and_wrong_shape_are_reported(tmp_path):
    nan = np.zeros((2, 2, 4, 4), np.float32)
    nan[1, 1, 0, 0] = np.inf
    write_upstream(str(tmp_path / "x0_y0_z1_MIP0.h5"), nan)
    with pytest.raises(MetroemError) as e:
        D.read_image_dataset(str(tmp_path / "x0_y0_z1_MIP0.h5"))
    assert "NaN or inf" in one_line(e)
    with pytest.raises(MetroemError) as e:  # the lazy reader checks the item it reads
        D.PairDataset(str(tmp_path), mip=0)[1]
    assert "NaN or inf" in one_line(e)
    for shape in [(2, 4, 4), (2, 3, 4, 4), (2, 2, 4, 5)]:
        write_upstream(str(tmp_path / "x0_y0_z1_MIP1.h5"), np.zeros(shape, np.float32))
        with pytest.raises(MetroemError) as e:
            D.read_image_dataset(str(tmp_path / "x0_y0_z1_MIP1.h5"))
        assert "expected (N, 2, S, S)" in one_line(e)


# ----------------------------------------------------------------------------- PairDataset


def build_folder(tmp_path, rng, with_field=True, translation=None):
    """Two image files at MIP 2 (3 + 2 pairs), one at MIP 4, fields of stage 0 for MIP 2."""
    data = {}
    for x, n in [(1024, 3), (4096, 2)]:
        pairs = rng.random((n, 2, 8, 8)).astype(np.float32)
        t = np.zeros((n, 2), np.int64) if translation is None else translation[:n]
        D.write_image_dataset(
            str(tmp_path / D.image_filename(x, 0, 10, 2)), pairs, image_attrs(n, x=x, y=0),
            translation=t,
        )
        fld = rng.normal(0, 1, (n, 2, 8, 8)).astype(np.float32)
        if with_field:
            D.write_field_dataset(
                str(tmp_path / D.field_filename(0, x, 0, 10, 2, "p")), fld, t,
                field_attrs(n, x=x, y=0),
            )
        data[x] = (pairs, fld)
    D.write_image_dataset(
        str(tmp_path / D.image_filename(0, 0, 10, 4)), np.zeros((1, 2, 8, 8)), image_attrs(1, 4)
    )
    return data


def test_pair_dataset_items_and_fields(tmp_path, rng):
    data = build_folder(tmp_path, rng)
    ds = D.PairDataset(str(tmp_path), mip=2, field_stage=0)
    assert len(ds) == 5 and ds._handles == {}  # nothing opened in __init__
    item = ds[4]  # second pair of the second file (sorted: x1024 then x4096)
    pairs, fld = data[4096]
    assert item["src"].shape == (1, 8, 8) and item["src"].dtype == torch.float32
    np.testing.assert_array_equal(item["src"][0].numpy(), pairs[1, 0])
    np.testing.assert_array_equal(item["tgt"][0].numpy(), pairs[1, 1])
    np.testing.assert_array_equal(item["field"].numpy(), fld[1])
    assert item["index"] == 4 and item["z"] == 11 and item["file"].endswith("x4096_y0_z10_MIP2.h5")
    sub = D.PairDataset(str(tmp_path), mip=2, indices=[4, 0])
    assert len(sub) == 2 and sub[0]["index"] == 4 and "field" not in sub[0]
    np.testing.assert_array_equal(sub[1]["src"][0].numpy(), data[1024][0][0, 0])
    clone = pickle.loads(pickle.dumps(ds))  # what spawn-started workers get
    assert clone._handles == {} and clone[0]["z"] == 10
    with pytest.raises(MetroemError):
        D.PairDataset(str(tmp_path), mip=2, indices=[5])
    summary = D.list_datasets(str(tmp_path))
    assert sorted((s.kind, s.mip, s.x, s.n, s.size) for s in summary) == [
        ("field", 2, 1024, 3, 8), ("field", 2, 4096, 2, 8),
        ("image", 2, 1024, 3, 8), ("image", 2, 4096, 2, 8), ("image", 4, 0, 1, 8),
    ]


def test_pair_dataset_in_dataloader_workers(tmp_path, rng):
    build_folder(tmp_path, rng)
    ds = D.PairDataset(str(tmp_path), mip=2, field_stage=0, field_tag="p")
    ds[0]  # the parent opens handles; forked workers must not reuse them
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    idx = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(idx) == list(range(5))
    assert batches[0]["field"].shape == (2, 2, 8, 8)
    ds.close()


def test_pair_dataset_missing_mip_lists_existing(tmp_path, rng):
    build_folder(tmp_path, rng, with_field=False)
    with pytest.raises(MetroemError) as e:
        D.PairDataset(str(tmp_path), mip=3)
    assert "it has MIPs [2, 4]" in one_line(e)
    with pytest.raises(MetroemError) as e:
        D.PairDataset(str(tmp_path), mip=2, field_stage=0)
    assert "no field dataset for x1024_y0_z10_MIP2.h5" in one_line(e)
    with pytest.raises(MetroemError):
        D.PairDataset(str(tmp_path / "nowhere"), mip=2)


def test_pair_dataset_rejects_disagreeing_field(tmp_path, rng):
    build_folder(tmp_path, rng)
    fpath = tmp_path / D.field_filename(0, 1024, 0, 10, 2, "p")
    moved = np.array([[256, 0], [0, 0], [0, 0]])
    D.write_field_dataset(
        str(fpath), np.zeros((3, 2, 8, 8)), moved, field_attrs(3, x=1024, y=0), overwrite=True
    )
    with pytest.raises(MetroemError) as e:
        D.PairDataset(str(tmp_path), mip=2, field_stage=0)
    msg = one_line(e)
    assert "x1024_y0_z10_MIP2.h5" in msg and fpath.name in msg and "--field_dset" in msg
    D.write_field_dataset(
        str(fpath), np.zeros((2, 2, 8, 8)), np.zeros((2, 2)), field_attrs(2, x=1024, y=0),
        overwrite=True,
    )
    with pytest.raises(MetroemError) as e:
        D.PairDataset(str(tmp_path), mip=2, field_stage=0)
    assert "2 fields of 8px" in one_line(e) and "3 pairs of 8px" in str(e.value)
    D.write_field_dataset(  # a second tag for the same image: ambiguous without field_tag
        str(tmp_path / D.field_filename(0, 4096, 0, 10, 2, "q")), np.zeros((2, 2, 8, 8)),
        np.zeros((2, 2)), field_attrs(2, x=4096, y=0),
    )
    fpath.unlink()
    with pytest.raises(MetroemError) as e:
        D.PairDataset(str(tmp_path), mip=2, field_stage=0, field_tag="q")
    assert "no field dataset for x1024" in one_line(e)


# ----------------------------------------------------------------------------- StageDataset


def build_stage_folder(tmp_path, rng, n_files=3, n=5, s=64, mip=2):
    """Image files (sources moved by known translations) + unmoved ground truth, at ``mip``."""
    truth = {}
    for k in range(n_files):
        x = 1024 * (k + 1)
        t = rng.integers(-3, 4, (n, 2)) * 2**mip  # whole pixels at mip
        D.write_image_dataset(
            str(tmp_path / D.image_filename(x, 0, 10, mip)),
            rng.integers(1, 255, (n, 2, s, s)).astype(np.uint8), image_attrs(n, mip, x=x, y=0),
            translation=t,
        )
        gt = rng.normal(0, 2, (n, 2, s, s)).astype(np.float32)
        D.write_field_dataset(
            str(tmp_path / D.field_filename(0, x, 0, 10, mip, "groundtruth")), gt,
            np.zeros((n, 2), np.int64), {**field_attrs(n, mip, x=x, y=0), "tag": "groundtruth"},
        )
        truth[x] = (gt, t)
    return truth


def test_stage_dataset_ground_truth_follows_the_moved_source(tmp_path, rng):
    from metroem.training.stage_inputs import StageDataset

    truth = build_stage_folder(tmp_path, rng)
    ds = StageDataset(str(tmp_path), 2, None, "c", cache_mb=0)
    assert ds.has_ground_truth and len(ds) == 15
    for i in range(len(ds)):
        item = ds[i]
        gt, t = truth[1024 * (i // 5 + 1)]
        want = gt[i % 5] - (t[i % 5] / 4).astype(np.float32)[:, None, None]
        np.testing.assert_array_equal(item["field"].numpy(), want)
        assert "src_agg_field" not in item
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers: no handles travel
    assert clone._gt_handles == {}
    np.testing.assert_array_equal(clone[7]["field"].numpy(), ds[7]["field"].numpy())
    ds.close()
    # a ground-truth file that does not match its image file is refused at construction
    D.write_field_dataset(
        str(tmp_path / D.field_filename(0, 2048, 0, 10, 2, "groundtruth")),
        np.zeros((4, 2, 64, 64)), np.zeros((4, 2)),
        {**field_attrs(4, 2, x=2048, y=0), "tag": "groundtruth"}, overwrite=True,
    )
    with pytest.raises(MetroemError) as e:
        StageDataset(str(tmp_path), 2, None, "c")
    assert "4 fields of 64px" in one_line(e) and "5 pairs of 64px" in str(e.value)


def test_stage_dataset_memory_stays_within_the_cache_budget(tmp_path, rng):
    import gc
    import tracemalloc

    from metroem.training.stage_inputs import StageDataset

    build_stage_folder(tmp_path, rng)  # 3 files x 5 pairs; ground truth 160 KiB per file
    item_bytes = 4 * 64 * 64 * 4  # src + tgt + 2-channel truth, float32
    ds = StageDataset(str(tmp_path), 2, None, "c", cache_mb=2.5 * item_bytes / 2**20)
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert len(ds._cache) == 2 and ds._cache_bytes == 2 * item_bytes <= ds._cache_limit
    # Nothing else keeps decoded data: with no cache, reading every pair (twice) retains far
    # less than one ground-truth file.
    ds = StageDataset(str(tmp_path), 2, None, "c", cache_mb=0)
    ds[0]  # open the files
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2):
            for i in range(len(ds)):
                ds[i]
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert ds._cache == {} and retained < 32 * 1024, retained
    ds.close()
