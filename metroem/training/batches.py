"""Training batches: random crops of dataset pairs in a deterministic, resumable order.

Every random choice is a pure function of ``(seed, epoch, index)``, so a run resumed from a
checkpoint (which stores ``epoch`` and the number of batches taken in it) sees exactly the batches
an uninterrupted run would, whatever the number of loader workers. Under torchrun each rank takes
every ``world_size``-th sample of the shared permutation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

Tensor = torch.Tensor

# Keys of a sample that are spatial and must be cropped together.
SPATIAL_KEYS = ("src", "tgt", "src_agg_field", "field")


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**62)
    return torch.Generator().manual_seed(seed)


class CropDataset(Dataset):
    """Crops of ``crop x crop`` pixels from items of ``base`` (dicts of ``(C, S, S)`` tensors).

    The crop position is drawn (up to ``tries`` times) to contain at least ``min_tissue`` of
    nonzero target pixels. ``crop=None`` or a crop larger than the patch returns the whole patch.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        crop: int | None,
        seed: int,
        min_tissue: float = 0.5,
        tries: int = 10,
    ):
        self.base = base
        self.indices = list(indices)
        self.crop = crop
        self.seed = seed
        self.min_tissue = min_tissue
        self.tries = tries
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = self.base[self.indices[i]]
        src = item["src"]
        h, w = src.shape[-2:]
        c = self.crop
        if c is None or (c >= h and c >= w):
            return {k: v for k, v in item.items() if isinstance(v, Tensor)}
        ch, cw = min(c, h), min(c, w)
        g = _generator(self.seed, self.epoch, self.indices[i])
        best, best_frac = (0, 0), -1.0
        for _ in range(self.tries):
            y = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            x = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            frac = float((item["tgt"][..., y : y + ch, x : x + cw] != 0).float().mean())
            if frac > best_frac:
                best, best_frac = (y, x), frac
            if frac >= self.min_tissue:
                break
        y, x = best
        return {
            k: v[..., y : y + ch, x : x + cw] if k in SPATIAL_KEYS else v
            for k, v in item.items()
            if isinstance(v, Tensor)
        }


class _EpochView(Dataset):
    def __init__(self, ds: CropDataset, order: list[int], epoch: int):
        self.ds, self.order, self.epoch = ds, order, epoch

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        self.ds.epoch = self.epoch  # workers hold their own copy; set per item
        return self.ds[self.order[i]]


class BatchStream:
    """An endless, resumable stream of batches from a :class:`CropDataset`.

    An epoch is one pass over a seeded permutation (repeated when the data has fewer items than
    one global batch). ``state()`` / ``load_state()`` save and restore the position.
    """

    def __init__(
        self,
        ds: CropDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        if len(ds) == 0:
            raise ValueError("no training pairs")
        self.ds = ds
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.batch = 0  # batches already taken in this epoch
        self._it: Iterator | None = None

    def _order(self, epoch: int) -> list[int]:
        n = len(self.ds)
        repeats = max(1, math.ceil(self.batch_size * self.world_size / n))
        g = _generator(self.seed, epoch, 7919)
        order: list[int] = []
        for _ in range(repeats):
            order += torch.randperm(n, generator=g).tolist()
        per_rank = len(order) // self.world_size
        mine = order[self.rank :: self.world_size][:per_rank]
        usable = (len(mine) // self.batch_size) * self.batch_size
        return mine[:usable]

    def _start_epoch(self) -> None:
        order = self._order(self.epoch)[self.batch * self.batch_size :]
        loader = DataLoader(
            _EpochView(self.ds, order, self.epoch),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
                self.batch += 1
                return batch
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batch = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.batch = int(state.get("batch", 0))
        self._it = None


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/validation split; at least one training pair is always kept."""
    if n <= 1 or val_fraction <= 0:
        return list(range(n)), []
    g = _generator(seed, 104729)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])
