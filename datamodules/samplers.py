"""Samplers that shard across processes themselves, and reshuffle from (seed, epoch) alone.

All are `DistributedSampler` subclasses, so Lightning leaves them in place under DDP instead of
injecting its own, and all forward `set_epoch` to the dataset for its seeded augmentations:
  EpochSampler   every item once per epoch (the plain shuffled loader)
  SubsetSampler  a subset of the items (e.g. the unlabeled pool), optionally repeated to a fixed length
                 (the small labeled set of a semi-supervised run, cycled as MixMatch does)
  PKSampler      P classes x K images per batch over true or pseudo labels, re-keyable between epochs
SubsetSampler and PKSampler can repeat an image within an epoch, so they yield (index, draw) pairs:
`draw` counts the earlier draws of that index in the epoch, and MultiViewDataset seeds on it, so a
repeated image gets a fresh augmentation rather than a copy of its first one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence, Sized

import numpy as np
from torch.utils.data import DistributedSampler


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """A generator that depends only on its arguments: the same shuffle on every rank and on resume."""
    return np.random.default_rng([seed, epoch, *more])


def with_draws(order: np.ndarray) -> list[tuple[int, int]]:
    """(index, draw) for every position of `order`, draw = how often the index occurred before it."""
    order = np.asarray(order, dtype=np.int64)
    sort = np.argsort(order, kind="stable")
    sorted_order = order[sort]
    starts = np.flatnonzero(np.r_[True, sorted_order[1:] != sorted_order[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    draws = np.empty(len(order), dtype=np.int64)
    draws[sort] = np.arange(len(order)) - np.repeat(starts, counts)
    return list(zip(order.tolist(), draws.tolist()))


class EpochSampler(DistributedSampler):
    """DistributedSampler that also tells the dataset the epoch (for its seeded augmentations).
    Used with any world size, 1 included, so a run shuffles the same way on 1 or N processes."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class SubsetSampler(EpochSampler):
    """Shuffled indices of a subset, sharded over ranks (rank r takes every world-th index).

    indices: the subset, or a function returning it, read at every `__iter__` (so a labeled set that
      grows between epochs is seen without rebuilding the loader).
    num_samples: items per rank and epoch. None: one pass over the subset, the tail that does not divide
      evenly over the ranks dropped. Given: the subset is cycled (fresh permutation per cycle) up to it.
    """

    def __init__(self, dataset: Sized, indices: np.ndarray | Callable[[], np.ndarray],
                 num_samples: int | None = None, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.indices = indices
        self.num_samples = num_samples if num_samples is not None else len(self._subset()) // num_replicas
        self.total_size = self.num_samples * num_replicas

    def _subset(self) -> np.ndarray:
        return np.asarray(self.indices() if callable(self.indices) else self.indices, dtype=np.int64)

    def __iter__(self):
        subset = self._subset()
        if len(subset) == 0:
            raise ValueError("SubsetSampler: the subset is empty; nothing to sample")
        rng = epoch_rng(self.seed, self.epoch)
        cycles = -(-self.total_size // len(subset))
        order = np.concatenate([rng.permutation(subset) for _ in range(cycles)])[: self.total_size]
        return iter(with_draws(order)[self.rank:: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class PKSampler(EpochSampler):
    """A stream of (index, draw) whose consecutive chunks of P*K are batches of P classes x K images.

    Use with `DataLoader(batch_size=P*K, drop_last=True)`. Labels < 0 (unassigned) are never drawn.
    Each epoch the items of every class are dealt round-robin to the ranks (seeded by seed+epoch, the
    same deal on every rank), so the ranks' batches never share an image; each rank then fills its
    batches from its own share: P distinct classes drawn with probability proportional to the images
    they have left in this pass, K images each (a class with fewer than K images is drawn with
    replacement, the MS-loss convention). When fewer than P classes have images left, a new pass starts.
    The epoch length, len(dataset) // (P*K*world) batches, does not depend on the labels, so the
    loader's length stays fixed while `set_labels` re-keys it (taking effect at the next `__iter__`).
    """

    def __init__(self, labels: Sequence[int] | None, classes_per_batch: int, samples_per_class: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, dataset: Sized | None = None):
        if labels is None and dataset is None:
            raise ValueError("PKSampler needs labels or a dataset (for the epoch length)")
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(f"PKSampler: P={classes_per_batch} and K={samples_per_class} must be >= 1")
        size_source = dataset if dataset is not None else range(len(labels))
        super().__init__(size_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.classes_per_batch, self.samples_per_class = classes_per_batch, samples_per_class
        self.batch_size = classes_per_batch * samples_per_class
        self.num_batches = len(size_source) // (self.batch_size * num_replicas)
        if self.num_batches == 0:
            raise ValueError(f"PKSampler: {len(size_source)} images make no batch of {self.batch_size} on "
                             f"each of {num_replicas} processes; lower the batch size")
        self.num_samples = self.num_batches * self.batch_size
        self.total_size = self.num_samples * num_replicas
        self.labels: np.ndarray | None = None
        if labels is not None:
            self.set_labels(labels)

    def set_labels(self, labels: Sequence[int]) -> None:
        """New (pseudo) labels, one per dataset item; used from the next epoch's iterator on."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or len(labels) != len(self.dataset):
            raise ValueError(f"PKSampler: got {labels.shape} labels for {len(self.dataset)} items")
        self.labels = labels

    def _my_share(self) -> dict[int, np.ndarray]:
        """{class: this rank's items of it}, dealt round-robin from a per-class shuffle."""
        rng = epoch_rng(self.seed, self.epoch)
        valid = rng.permutation(np.flatnonzero(self.labels >= 0))
        valid = valid[np.argsort(self.labels[valid], kind="stable")]
        classes, starts, counts = np.unique(self.labels[valid], return_index=True, return_counts=True)
        position = np.arange(len(valid)) - np.repeat(starts, counts)
        offset = np.repeat(rng.integers(self.num_replicas, size=len(classes)), counts)
        owner = (position + offset) % self.num_replicas
        mine = valid[owner == self.rank]
        return {int(c): mine[self.labels[mine] == c] for c in np.unique(self.labels[mine])}

    def _batches(self) -> np.ndarray:
        if self.labels is None:
            raise RuntimeError("PKSampler has no labels yet: call datamodule.set_pseudo_labels(labels) "
                               "before the first epoch (a pseudo-label callback does it in on_fit_start)")
        share = self._my_share()
        P, K = self.classes_per_batch, self.samples_per_class
        if len(share) < P:
            raise ValueError(f"PKSampler: this process has images of {len(share)} classes, fewer than P={P} "
                             "per batch; lower batch_size or raise samples_per_class")
        rng = epoch_rng(self.seed, self.epoch, self.rank + 1)
        classes = np.array(sorted(share))
        queues: dict[int, list[int]] = {}
        batches = []
        for _ in range(self.num_batches):
            left = np.array([len(queues.get(c, ())) for c in classes])
            if (left > 0).sum() < P:  # a new pass over this rank's share
                queues = {c: rng.permutation(share[c]).tolist() for c in classes}
                left = np.array([len(queues[c]) for c in classes])
            for c in rng.choice(classes, size=P, replace=False, p=left / left.sum()):
                take, queues[c] = queues[c][:K], queues[c][K:]
                if len(take) < K:
                    pool = np.setdiff1d(share[c], take) if len(share[c]) >= K else share[c]
                    take += rng.choice(pool, size=K - len(take), replace=len(share[c]) < K).tolist()
                batches.append(take)
        return np.concatenate(batches)

    def __iter__(self):
        return iter(with_draws(self._batches()))

    def __len__(self) -> int:
        return self.num_samples
