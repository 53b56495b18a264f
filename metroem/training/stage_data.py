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
        self._gt: dict[str, np.ndarray] = {}
        self._gt_path: dict[str, str] = {}
        for path in self.pairs.image_files():
            name = datasets.parse_image_filename(os.path.basename(path))
            key = (name.x, name.y, name.z)
            if key in gt_files:
                self._gt_path[path] = gt_files[key]
        self.has_ground_truth = bool(self._gt_path) and len(self._gt_path) == len(
            self.pairs.image_files()
        )
        # Decoded pairs, kept up to a memory budget: a training crop needs a small window but
        # h5 decompresses whole pairs, so re-reading them every step would dominate the step time.
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

    def _truth(self, image_path: str, j: int) -> torch.Tensor:
        if image_path not in self._gt:
            self._gt[image_path] = datasets.read_field_dataset(self._gt_path[image_path]).data
        return torch.from_numpy(np.ascontiguousarray(self._gt[image_path][j], dtype=np.float32))

    def __getitem__(self, i: int) -> dict:
        cached = self._cache.get(i)
        if cached is not None:
            return dict(cached)
        item = self.pairs[i]
        out = {"src": item["src"], "tgt": item["tgt"]}
        if "field" in item:
            out["src_agg_field"] = item["field"]
        if self.has_ground_truth:
            t = torch.as_tensor(item["translation"], dtype=torch.float32) / 2**self.mip
            out["field"] = self._truth(item["file"], item["pair"]) - t.view(2, 1, 1)
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
