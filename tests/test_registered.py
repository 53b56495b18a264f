"""metroem.registered: neighbour pairs of a registered block as training datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metroem import datasets, registered
from metroem.errors import MetroemError
from metroem.training.stage_inputs import GROUND_TRUTH_TAG, StageDataset


def _block(n: int = 12, size: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, size, size, generator=g) * 200 + 20).round()


def test_pairs_are_slice_z_plus_gap_onto_z_at_each_stage_size(tmp_path):
    block = _block()
    paths = registered.write_registered_datasets(
        {"a": block}, str(tmp_path), block_nm=10, resolution_nm=5, mips=[0, 1], gaps=(1, 3),
        z_slices=range(0, 10), z_step=4,
    )
    assert len(paths) == 2 * 2 * 2  # mips x gaps x (image, truth)
    img = datasets.read_image_dataset(
        str(tmp_path / datasets.image_filename(-1, 3, 0, 1)))
    # MIP 1 of a 5 nm pyramid is 10 nm: the block's own pixels; targets 0, 4 (8 + 3 > 9)
    assert img.data.shape == (2, 2, 40, 40) and list(img.attrs["z"]) == [0, 4]
    assert np.array_equal(img.data[1, 0], block[7].numpy().astype(np.uint8))  # source z + 3
    assert np.array_equal(img.data[1, 1], block[4].numpy().astype(np.uint8))  # target z
    big = datasets.read_image_dataset(str(tmp_path / datasets.image_filename(-1, 1, 0, 0)))
    assert big.data.shape[-1] == 80 and big.data.min() >= 1  # 2x upsampled, no new no-data
    truth = datasets.read_field_dataset(
        str(tmp_path / datasets.field_filename(0, -1, 1, 0, 0, GROUND_TRUTH_TAG)))
    assert truth.data.shape == (3, 2, 80, 80) and not truth.data.any()


def test_a_stage_dataset_sees_them_with_their_zero_truth(tmp_path):
    registered.write_registered_datasets({"a": _block(), "b": _block(seed=1)}, str(tmp_path),
                                         10, 10, [0], gaps=(2,), z_step=3)
    ds = StageDataset(str(tmp_path), 0, None, "t")
    assert ds.has_ground_truth and len(ds) == 2 * 4
    item = ds[0]
    assert item["field"].shape == (2, 40, 40) and item["field"].abs().max() == 0


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"block_nm": 0}, "nm per pixel"),
        ({"gaps": (0,)}, "gaps"),
        ({"gaps": (20,)}, "smaller gap"),
        ({"z_slices": range(0, 50)}, "slices"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path, kwargs, words):
    args = {"block_nm": 10, "resolution_nm": 10, "mips": [0], **kwargs}
    with pytest.raises(MetroemError, match=words):
        registered.write_registered_datasets({"a": _block()}, str(tmp_path), **args)


def test_non_square_blocks_and_existing_files_are_refused(tmp_path):
    with pytest.raises(MetroemError, match="square"):
        registered.write_registered_datasets({"a": torch.ones(4, 8, 10)}, str(tmp_path), 1, 1,
                                             [0], gaps=(1,))
    registered.write_registered_datasets({"a": _block()}, str(tmp_path), 10, 10, [0], gaps=(1,))
    with pytest.raises(MetroemError, match="overwrite"):
        registered.write_registered_datasets({"a": _block()}, str(tmp_path), 10, 10, [0],
                                             gaps=(1,))


def test_pairs_with_and_without_truth_train_side_by_side(tmp_path):
    """A folder with registered pairs (truth 0) and volume pairs (no truth): every item has a
    field and a ``field_known`` flag; crops keep it; the supervised term counts known items
    only; a same-section pair made from an unknown item becomes known."""
    from metroem import augment, losses
    from metroem.training.batches import CropDataset

    registered.write_registered_datasets({"a": _block()}, str(tmp_path), 10, 10, [0],
                                         gaps=(1,), z_step=6)
    pairs = np.stack([np.stack([_block(2, seed=3)[0], _block(2, seed=3)[1]])] * 3)
    datasets.write_image_dataset(str(tmp_path / datasets.image_filename(100, 100, 5, 0)),
                                 pairs.astype(np.uint8), {"mip": 0, "x_offset": 100,
                                                          "y_offset": 100, "z": [5, 6, 7]})
    ds = StageDataset(str(tmp_path), 0, None, "t")
    assert ds.partial_ground_truth and len(ds) == 2 + 3
    known = sorted(float(ds[i]["field_known"]) for i in range(len(ds)))
    assert known == [0, 0, 0, 1, 1]
    crop = CropDataset(ds, list(range(len(ds))), 16, seed=0)
    assert set(crop[0]) == {"src", "tgt", "field", "field_known"}
    assert crop[0]["field"].shape == (2, 16, 16)

    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}
    batch["src"], batch["tgt"] = batch["src"].float(), batch["tgt"].float()
    pred = torch.zeros_like(batch["field"])
    pred[batch["field_known"] == 0] += 7.0  # wrong only where the truth is unknown
    loss = losses.build_loss({"supervised_weight": 1.0, "similarity": "none",
                              "smoothness": "none", "fold_weight": 0.0})
    total, terms = loss(batch["src"], batch["tgt"], pred, gt_field=batch["field"],
                        gt_known=batch["field_known"])
    assert float(terms["supervised"]) < 1e-5  # the unknown items do not count
    _, blind = loss(batch["src"], batch["tgt"], pred, gt_field=batch["field"])
    assert float(blind["supervised"]) > 1.0  # (they would without the flag)
    made = augment.same_section_pair(batch, augment.DeformationSpec(translation=2.0),
                                     torch.Generator().manual_seed(0))
    assert bool((made["field_known"] == 1).all())


def _block_dir(root, name: str, n: int, seed: int = 0):
    from PIL import Image

    folder = root / name
    folder.mkdir(parents=True)
    for z, img in enumerate(_block(n, seed=seed)):
        Image.fromarray(img.numpy().astype(np.uint8)).save(folder / f"{z:03d}.png")


def test_the_command_writes_the_training_slices_and_holds_out_the_rest(tmp_path, capsys):
    _block_dir(tmp_path / "blocks", "s1", 20)
    _block_dir(tmp_path / "blocks", "s2", 20, seed=1)
    out = tmp_path / "data"
    rc = registered.main(["--dst_folder", str(out), "--blocks", str(tmp_path / "blocks"),
                          "--block_nm", "10",
                          "--resolution_nm", "10", "--mips", "0", "--gaps", "1", "4",
                          "--z_step", "3", "--held_out", "8", "-q"])
    assert rc == 0 and "wrote 4 image datasets of 2 blocks" in capsys.readouterr().out
    for gap in (1, 4):
        img = datasets.read_image_dataset(str(out / datasets.image_filename(-2, gap, 0, 0)))
        zs = [int(z) for z in img.attrs["z"]]
        assert zs[0] == 0 and max(zs) + gap <= 11  # no held-out slice (12-19) in any pair


def test_the_command_refuses_before_writing_anything(tmp_path, capsys):
    _block_dir(tmp_path / "blocks", "s1", 12)
    out = tmp_path / "data"
    out.mkdir()
    # one later file of the set already exists: nothing of the set may be written
    taken = out / datasets.field_filename(0, -1, 2, 0, 0, GROUND_TRUTH_TAG)
    taken.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as e:
        registered.main(["--dst_folder", str(out), "--blocks", str(tmp_path / "blocks"),
                         "--block_nm", "10",
                         "--resolution_nm", "10", "--mips", "0", "--gaps", "1", "2",
                         "--held_out", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [taken.name]
    assert taken.read_bytes() == b"keep me"


def test_the_command_names_a_missing_blocks_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        registered.main(["--dst_folder", str(tmp_path / "d"), "--blocks", str(tmp_path / "none"),
                         "--block_nm", "10", "--resolution_nm", "4", "--mips", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "registered blocks not found" in err[0] and "--blocks" in err[0]
    assert not (tmp_path / "d").exists()
