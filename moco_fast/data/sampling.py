"""Which samples, in which order, with which random draws: one epoch sampler, one seed hash.

Every loader of the package (pretraining on either pipeline, kNN banks, linear classification on
images or on cached features) takes its order from EpochSampler: this rank's share of a permutation
that is a pure function of (seed, epoch), DistributedSampler's own, so one process and N processes
see the shards torch's sampler would give, and a resumed epoch replays the same order without its
first `skip_batches` batches. Random augmentations are a function of their position alone, through
seed_hash: per sample on the PIL pipeline (SeededSamples: seed, epoch, index), where each worker
transforms one image at a time, and per batch on the device pipeline (batch_generator: seed, epoch,
rank, batch), whose parameters are drawn for the whole batch from one generator. So a run sees the
same augmentations with any number of workers and after a resume.
"""
from __future__ import annotations

import itertools
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

_MIX, _LAST = 1_000_003, 1_000_000_007  # primes: distinct positions give distinct seeds in practice


def seed_hash(seed: int, *position: int) -> int:
    """The seed of one random draw from its position, e.g. (epoch, index) or (epoch, rank, batch); a
    non-negative int below 2**63 (every generator accepts it)."""
    *outer, last = position
    key = seed
    for part in outer:
        key = key * _MIX + part
    return (key * _LAST + last) % (2**63 - 1)


def batch_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The CPU generator of one batch's augmentation parameters (the device pipeline)."""
    return torch.Generator().manual_seed(seed_hash(seed, epoch, rank, batch))


class EpochSampler(DistributedSampler):
    """(epoch, index) keys of this rank's share of the (seed, epoch) permutation, DistributedSampler's.

    shuffle=False keeps the data set's order; drop_last drops the tail that would not split evenly
    over the processes, else the share is padded from the start (as DistributedSampler). The keys
    carry the epoch into worker processes, where SeededSamples seeds each sample by them.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size, self.skip_batches = batch_size, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The order of `epoch`, without its first `skip_batches` batches (a resumed epoch)."""
        super().set_epoch(epoch)
        self.skip_batches = skip_batches

    @property
    def full_batches(self) -> int:
        """Whole batches in one epoch of this rank's share, skipped ones included."""
        return self.num_samples // self.batch_size

    def indices(self) -> torch.Tensor:
        """int64: this rank's whole share of the current epoch, in order (no skipping)."""
        return torch.as_tensor(list(super().__iter__()), dtype=torch.int64)

    def __iter__(self):
        rest = itertools.islice(super().__iter__(), self.skip_batches * self.batch_size, None)
        return ((self.epoch, index) for index in rest)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip_batches * self.batch_size)


class SeededSamples(Dataset):
    """A dataset read by EpochSampler's (epoch, index) keys. With a seed, each sample's random transform
    draws from torch, random and numpy seeded by seed_hash(seed, epoch, index): the same in any
    worker, with any number of workers, and after a resume. seed=None: deterministic transforms,
    nothing seeded."""

    def __init__(self, dataset: Dataset, seed: int | None):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if self.seed is None:
            return self.dataset[index]
        sample_seed = seed_hash(self.seed, epoch, index)
        in_main = torch.utils.data.get_worker_info() is None
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if in_main else None
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % 2**32)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:  # the main process's generators belong to the model (key shuffle)
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


class TensorBatches:
    """Mini-batches sliced straight out of tensors (cached features: no per-sample indexing or
    collation) in the order of its EpochSampler (`sampler`), the last batch possibly short."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.sampler = EpochSampler(range(len(labels)), batch_size, seed, rank, world_size, shuffle, drop_last=True)

    def __len__(self):
        return -(-self.sampler.num_samples // self.batch_size)

    def __iter__(self):
        order = self.sampler.indices().to(self.features.device)
        for start in range(self.sampler.skip_batches * self.batch_size, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.features[idx], self.labels[idx]
