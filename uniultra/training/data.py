"""Training-side data plumbing on top of :mod:`uniultra.data.datasets`.

* :class:`CachedSource` -- a dataset split with every image and label map decoded once into RAM
  (the datasets here are small; DataLoader workers share it copy-on-write after ``fork``).
* :class:`SaltedConcat` -- the per-dataset :class:`~uniultra.data.datasets.PromptSegDataset` s as
  one dataset indexed by ``(index, salt)``: the salt replaces the dataset's epoch in its
  ``(seed, epoch, index)`` seeding, so every draw of an item (an item may be drawn twice in an
  epoch with weighted sampling) gets its own prompt and augmentation, and a sample depends only
  on ``(seed, epoch, position in the epoch)`` -- never on workers or on where a run was resumed.
* :class:`EpochSampler` -- the data order of an epoch from ``(seed, epoch)`` only: a permutation
  (no weights) or weighted draws with replacement; sharded over ranks (rank r takes every
  world-th item, as ``DistributedSampler`` does) and able to skip the items already consumed when
  resuming mid-epoch.
* :class:`~uniultra.data.augment.AugmentedSource` -- the one augmentation (PIL affine + intensity
  look-up table, ~1 ms per image) applied in ``load``, seeded like the samples: by
  ``(seed, salt, index)``.
* :func:`val_set` -- validation images with the prompts :func:`uniultra.evaluation.evaluate_dataset`
  draws (one generator, ``evaluate.prompted_cases``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from uniultra.data.augment import AugmentedSource  # noqa: F401  (re-exported)
from uniultra.data.datasets import PromptSegDataset, UniformDataset

SALT_STRIDE = 1 << 16


class CachedSource:
    """``load(i) -> (image, label_map)`` from RAM (decoded once)."""

    def __init__(self, ds: UniformDataset):
        self.name = ds.name
        self.root = ds.root
        self.records = ds.records
        self.items = [ds.load(i) for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        return self.items[i]


class SaltedConcat(torch.utils.data.Dataset):
    def __init__(self, datasets: list[PromptSegDataset]):
        self.datasets = list(datasets)
        self.cum = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.cum[-1] if self.cum else 0

    def locate(self, i: int) -> tuple[int, int]:
        d = bisect.bisect_right(self.cum, i)
        return d, i - (self.cum[d - 1] if d else 0)

    def __getitem__(self, key) -> dict:
        i, salt = (key, 0) if isinstance(key, int) else key
        d, local = self.locate(int(i))
        ds = self.datasets[d]
        ds.set_epoch(int(salt))
        if isinstance(ds.source, AugmentedSource):
            ds.source.salt = int(salt)
        item = ds[local]
        item["dataset"] = d
        return item


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, salt)`` for one epoch; see the module doc."""

    def __init__(self, n_items: int, per_epoch: int, seed: int = 0, weights=None, rank: int = 0, world: int = 1):
        self.n, self.per_epoch, self.seed = int(n_items), int(per_epoch), int(seed)
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
        self.rank, self.world = int(rank), int(world)
        self.epoch, self.skip = 0, 0
        if self.per_epoch % self.world:
            raise ValueError("per_epoch must be divisible by the number of processes")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Epoch to draw, and how many of this rank's items to skip (already trained on)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.per_epoch, replacement=True, generator=g).tolist()
        out: list[int] = []
        while len(out) < self.per_epoch:
            out.extend(torch.randperm(self.n, generator=g).tolist())
        return out[: self.per_epoch]

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        seen: dict[int, int] = {}
        salted = []
        for i in order:
            k = seen.get(i, 0)
            seen[i] = k + 1
            salted.append((i, self.epoch * SALT_STRIDE + k))
        mine = salted[self.rank:: self.world]
        return iter(mine[self.skip:])

    def __len__(self) -> int:
        return self.per_epoch // self.world - self.skip


@dataclass
class ValImage:
    dataset: str
    id: str
    image: np.ndarray
    gt: np.ndarray  # bool (H, W)
    boxes: list  # inclusive pixel boxes, one per instance


def val_set(roots, split: str = "val", jitter: float = 0.1, seed: int = 0, limit: int | None = None,
            min_area_frac: float = 0.0) -> list[ValImage]:
    """Images of ``split`` with the box prompts ``uniultra evaluate`` draws for them (the same
    generator, :func:`uniultra.evaluation.evaluate.prompted_cases`); with ``limit``, at most that
    many per dataset, evenly spread over the split (as ``evaluate --limit``)."""
    from uniultra.evaluation.evaluate import prompted_cases

    out = []
    for root in roots:
        ds = UniformDataset(root, split, min_area_frac=min_area_frac, max_images=limit)
        for _, rec, image, lab, _, prs in prompted_cases(ds, "box", jitter, seed, 1, 0, min_area_frac):
            out.append(ValImage(ds.name, rec.id, image, lab != 0, [p.box for p in prs]))
    return out
