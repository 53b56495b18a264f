"""The dataset one pyramid stage trains on: image pairs + incoming field + optional ground truth.

Files used by stage ``k`` at MIP ``m`` with checkpoint name ``C`` (see docs/datasets.md):

* images: ``x*_y*_z*_MIP{m}_{C}.h5`` if present (cut by field generation with the source window
  moved by the removed translation), else ``x*_y*_z*_MIP{m}.h5``;
* incoming field (stages after the first): ``field_{k_prev}_x*_y*_z*_MIP{m}_{C}.h5``, the
  saturated field of the earlier stages with each pair's translation removed;
* ground truth (optional, e.g. the demo volume): ``field_0_x*_y*_z*_MIP{m}_groundtruth.h5`` cut
  on the **unmoved** windows; for a source window moved by ``t`` the truth is ``gt - t``.

Items are ``{"src", "tgt", "src_agg_field"?, "field"?}`` with ``field`` the ground truth.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from metroem import datasets
from metroem.errors import MetroemError

GROUND_TRUTH_TAG = "groundtruth"
GROUND_TRUTH_STAGE = 0


def image_suffix_for(dataset_path: str, mip: int, checkpoint_name: str) -> str | None:
    """``checkpoint_name`` if images cut for it exist at ``mip``, else None (plain files)."""
    for s in datasets.list_datasets(dataset_path):
        if s.kind == "image" and s.mip == mip and s.suffix == checkpoint_name:
            return checkpoint_name
    return None


def check_images(dataset_path: str, mip: int) -> list[int]:
    """Patch sizes of the plain image datasets at ``mip``; a one-line error when there are none."""
    summaries = datasets.list_datasets(dataset_path)
    sizes = [s.size for s in summaries if s.kind == "image" and s.mip == mip and s.suffix is None]
    if not sizes:
        have = sorted({s.mip for s in summaries if s.kind == "image"})
        raise MetroemError(
            f"no image datasets x*_y*_z*_MIP{mip}.h5 in {dataset_path} (image MIPs there: "
            f"{have or 'none'}); cut MIP {mip} with metroem-download-image --mips {mip}"
        )
    return sizes


def tissue_extent(dataset_path: str, mip: int) -> tuple[int, str]:
    """``(side, file)``: the largest side of the nonzero (tissue) box over the first pair of
    every plain image dataset at ``mip``, and the file it was found in (0 when none has any)."""
    ds = datasets.PairDataset(dataset_path, mip, suffix=None)
    best, where = 0, ""
    for i in ds.first_pairs():
        item = ds[i]
        tissue = ((item["src"][0] != 0) | (item["tgt"][0] != 0)).numpy()
        rows, cols = np.flatnonzero(tissue.any(axis=1)), np.flatnonzero(tissue.any(axis=0))
        if rows.size:
            side = int(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
            if side > best:
                best, where = side, os.path.basename(item["file"])
    return best, where


def _check_incoming_fields(dataset_path: str, mip: int, prev_stage: int, tag: str) -> None:
    """A training-oriented error when the previous stage's field datasets are missing."""
    have = [
        s for s in datasets.list_datasets(dataset_path)
        if s.kind == "field" and s.mip == mip and s.stage == prev_stage and s.tag == tag
    ]
    if not have:
        raise MetroemError(
            f"no field datasets field_{prev_stage}_x*_y*_z*_MIP{mip}_{tag}.h5 in {dataset_path} "
            f"for the stage after stage {prev_stage}; train stage {prev_stage} with "
            f"--generate_field_stages {prev_stage} (same --checkpoint_name) or cut them with "
            "metroem-download-field"
        )


def _ground_truth_files(dataset_path: str, mip: int) -> dict[tuple[int, int, int], str]:
    out = {}
    for s in datasets.list_datasets(dataset_path):
        if s.kind == "field" and s.mip == mip and s.tag == GROUND_TRUTH_TAG:
            out[(s.x, s.y, s.z_start)] = s.path
    return out


class StageDataset(Dataset):
    """Pairs of one stage with their incoming field and (where it exists) ground truth."""

    def __init__(
        self,
        dataset_path: str,
        mip: int,
        prev_stage: int | None,
        checkpoint_name: str,
        cache_mb: float = 2048.0,
    ):
        if checkpoint_name == GROUND_TRUTH_TAG:
            raise MetroemError(f"checkpoint name {GROUND_TRUTH_TAG!r} is reserved; pick another")
        self.mip = mip
        if prev_stage is not None:
            _check_incoming_fields(dataset_path, mip, prev_stage, checkpoint_name)
        suffix = image_suffix_for(dataset_path, mip, checkpoint_name)
        self.pairs = datasets.PairDataset(
            dataset_path,
            mip,
            field_stage=prev_stage,
            field_tag=checkpoint_name if prev_stage is not None else None,
            suffix=suffix,
        )
        gt_files = _ground_truth_files(dataset_path, mip)
        self._gt_path: dict[str, str] = {}
        for path in self.pairs.image_files():
            name = datasets.parse_image_filename(os.path.basename(path))
            key = (name.x, name.y, name.z)
            if key in gt_files:
                self._gt_path[path] = gt_files[key]
        # Some pairs with a known field and some without (a registered block's pairs beside a
        # volume's, see metroem.registered): every item then carries a field and a
        # ``field_known`` flag, 0 where the field is unknown (zeros, ignored by the losses).
        self.has_ground_truth = bool(self._gt_path)
        self.partial_ground_truth = self.has_ground_truth and len(self._gt_path) < len(
            self.pairs.image_files()
        )
        if self.has_ground_truth:
            self._check_ground_truth()
        # Ground truth is read one pair at a time (files are chunked per pair) through handles
        # opened lazily, once per process; decoded truth is only kept inside the item cache
        # below, so it counts against the same budget as the pairs.
        self._gt_pid: int | None = None
        self._gt_handles: dict = {}
        # Decoded items (pairs, incoming field, ground truth), kept up to a memory budget: a
        # training crop needs a small window but h5 decompresses whole pairs, so re-reading them
        # every step would dominate the step time.
        self._cache: dict[int, dict] = {}
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 2**20)

    def __len__(self) -> int:
        return len(self.pairs)

    def patch_sizes(self) -> list[int]:
        """Patch side of every image file, in pair order."""
        return [
            datasets.read_image_dataset(p, load_data=False).shape[-1]
            for p in self.pairs.image_files()
        ]

    def _check_ground_truth(self) -> None:
        """Every ground-truth file has one field per pair of its image file, of the same size."""
        for image_path, gt_path in self._gt_path.items():
            img = datasets.read_image_dataset(image_path, load_data=False)
            gt = datasets.read_field_dataset(gt_path, load_data=False)
            if (gt.shape[0], gt.shape[-1]) != (img.shape[0], img.shape[-1]):
                raise MetroemError(
                    f"{os.path.basename(gt_path)} has {gt.shape[0]} fields of {gt.shape[-1]}px "
                    f"but {os.path.basename(image_path)} has {img.shape[0]} pairs of "
                    f"{img.shape[-1]}px; re-cut the ground truth on the same windows"
                )

    def _gt_handle(self, path: str):
        pid = os.getpid()
        if self._gt_pid != pid:  # new process (DataLoader worker): never reuse a parent's handle
            self._gt_handles = {}
            self._gt_pid = pid
        h = self._gt_handles.get(path)
        if h is None:
            h = datasets._open(path, datasets.RECUT_FIELD)
            self._gt_handles[path] = h
        return h

    def _truth(self, image_path: str, j: int) -> torch.Tensor:
        """Ground-truth field of pair ``j`` of ``image_path``, (2, S, S) float32 (unmoved)."""
        path = self._gt_path[image_path]
        ds = self._gt_handle(path)[datasets.FIELD_KEY]
        arr = datasets._read_array(ds, j, path, datasets.RECUT_FIELD)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def close(self) -> None:
        """Close the files this process opened."""
        if self._gt_pid == os.getpid():
            for h in self._gt_handles.values():
                with contextlib.suppress(Exception):
                    h.close()
        self._gt_handles = {}
        self.pairs.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_gt_handles"] = {}
        state["_gt_pid"] = None
        return state

    def __getitem__(self, i: int) -> dict:
        cached = self._cache.get(i)
        if cached is not None:
            return dict(cached)
        item = self.pairs[i]
        out = {"src": item["src"], "tgt": item["tgt"]}
        if "field" in item:
            out["src_agg_field"] = item["field"]
        if item["file"] in self._gt_path:
            t = torch.as_tensor(item["translation"], dtype=torch.float32) / 2**self.mip
            out["field"] = self._truth(item["file"], item["pair"]) - t.view(2, 1, 1)
            if self.partial_ground_truth:
                out["field_known"] = torch.ones(())
        elif self.has_ground_truth:
            out["field"] = torch.zeros((2,) + tuple(item["src"].shape[-2:]))
            out["field_known"] = torch.zeros(())
        size = sum(v.numel() * v.element_size() for v in out.values())
        if self._cache_bytes + size <= self._cache_limit:
            self._cache[i] = out
            self._cache_bytes += size
        return dict(out)


def stage_dataset(
    dataset_path: str, mip: int, prev, checkpoint_name: str, cache_mb: float = 2048.0
) -> StageDataset:
    """The dataset of the stage at ``mip`` whose previous stage is ``prev`` (None for the first)."""
    prev_stage = None if prev is None else prev.stage
    return StageDataset(dataset_path, mip, prev_stage, checkpoint_name, cache_mb)
