"""The entry points: every loader the trainer, linear classification and scripts/knn.py read.

    source = locate(cfg.data, cfg.dataset)                             # the one search of the disk
    loader, sampler = train_loader(cfg, source, info, seed, out_dtype)  # pretraining: two views a batch
    bank, test, classes = eval_loaders(source, batch_size, workers)    # kNN, cached linear features
    train, val, classes = linear_loaders(source, batch_size, workers, seed, augmented, distributed)

Every batch is (samples, targets, skipped paths); every order comes from sampling.EpochSampler
(set_epoch(epoch, skip_batches) at the start of each epoch), every random draw from sampling.seed_hash.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from moco_fast.config import check_data_fits
from moco_fast.data.batch_augment import BatchAugment
from moco_fast.data.datasets import DataError, Source, build_dataset
from moco_fast.data.device import device_loader

log = logging.getLogger("moco_fast")
from moco_fast.data.pil import TwoCropsTransform, eval_transform, linear_transform, recipe_transform
from moco_fast.data.recipes import recipe_name
from moco_fast.data.sampling import EpochSampler, SeededSamples


def collate_with_skipped(batch: list) -> tuple[Any, Any, list[str]]:
    """default_collate for samples and targets; the items' skipped files joined into one list."""
    samples = default_collate([item[0] for item in batch])
    targets = default_collate([item[1] for item in batch])
    return samples, targets, [path for item in batch for path in item[2]]


class SkipCounter:
    """Counts unreadable files reported by batches; raises DataError once more than max_bad."""

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.paths: list[str] = []

    @property
    def count(self) -> int:
        return len(self.paths)

    def add(self, paths: Sequence[str]) -> None:
        self.paths.extend(paths)
        if self.count > self.max_bad:
            shown = "\n  ".join(self.paths[:20])
            more = f"\n  ... and {self.count - 20} more" if self.count > 20 else ""
            raise DataError(f"{self.count} unreadable images, more than max_bad={self.max_bad}:\n  {shown}{more}")


def _seed_worker(worker_id: int) -> None:
    # For transforms that draw from Python's random or numpy outside SeededSamples (a dataset passed to
    # make_loader unshuffled): forked workers would otherwise share one state. (Recent PyTorch does this
    # itself; kept explicit so the augmentation never depends on it.)
    seed = torch.initial_seed() % 2**32  # base seed + worker id, set by the DataLoader
    random.seed(seed)
    np.random.seed(seed)


def _data_loader(dataset: Dataset, sampler: EpochSampler, workers: int, drop_last: bool, pin_memory: bool,
                 generator: torch.Generator | None) -> DataLoader:
    return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_with_skipped, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker, generator=generator)


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, drop_last: bool, seed: int = 0,
                distributed: bool = False, pin_memory: bool | None = None,
                generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader of (samples, targets, skipped paths) batches whose sampler is an EpochSampler.

    shuffle: a new (seed, epoch) order each epoch and each sample's random transform seeded by its key
    (SeededSamples); else the data set's order, nothing seeded. distributed: this rank's share within
    torch.distributed's group. generator: the DataLoader draws its workers' base seed from it at each
    epoch (None: torch's global generator, as a plain DataLoader).
    """
    group = torch.distributed
    rank, world_size = (group.get_rank(), group.get_world_size()) if distributed else (0, 1)
    sampler = EpochSampler(dataset, batch_size, seed, rank, world_size, shuffle=shuffle, drop_last=drop_last)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return _data_loader(SeededSamples(dataset, seed if shuffle else None), sampler, workers, drop_last,
                        pin_memory, generator)


def uses_gpu_aug(cfg, device: torch.device) -> bool:
    """--gpu-aug (the device pipeline), by default on when the run is on CUDA."""
    return cfg.gpu_aug if cfg.gpu_aug is not None else device.type == "cuda"


def train_loader(cfg, source: Source, info, seed: int, out_dtype: torch.dtype = torch.float32):
    """(loader, sampler) of pretraining: ((im_q, im_k), targets, skipped paths) batches of this rank's
    share, cfg.batch_size // world size each. Augmented by CPU workers (the PIL pipeline), or with
    --gpu-aug decoded and augmented on info.device in out_dtype (the device pipeline); both from
    cfg.aug_plus's recipe. Raises DataError or ConfigError before any image is read."""
    spec = source.spec(cfg.image_size)
    recipe = recipe_name(cfg.aug_plus, spec["small"])
    on_device = uses_gpu_aug(cfg, info.device)
    transform = None if on_device else TwoCropsTransform(recipe_transform(
        recipe, spec["image_size"], spec["mean"], spec["std"], cfg.crop_scale))
    dataset = build_dataset(source, "train", transform, max_bad=cfg.max_bad_images)
    check_data_fits(cfg, len(dataset), info.world_size)
    sampler = EpochSampler(dataset, cfg.batch_size // info.world_size, seed, info.rank, info.world_size)
    if on_device:
        backend = cfg.backend
        if backend == "cuda":  # no CUDA C++ augment kernel: say what serves instead
            backend = "auto"
            log.info("moco_fast: --backend cuda: crop_resize and color_augment have no CUDA C++ kernel; "
                     "the data path uses backend 'auto' (Triton on CUDA tensors)")
        augment = BatchAugment(recipe, spec["image_size"], spec["mean"], spec["std"], out_dtype, cfg.channels_last,
                               backend, cfg.crop_scale)
        return device_loader(dataset, sampler, cfg.workers, info.device, augment), sampler
    # its own generator: the base-seed draw must not shift the model's RNG
    loader = _data_loader(SeededSamples(dataset, seed), sampler, cfg.workers, drop_last=True,
                          pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def _labelled_splits(source: Source, train_transform, val_transform, max_bad: int, required: bool):
    """(labelled train split, held-out split), or None (required=False) when there is none."""
    if not source.has_split("val"):
        if not required:
            return None
        raise DataError(f"{source.root} has no labelled held-out split to classify: evaluation needs "
                        "DATA/train/<class>/* and DATA/val/<class>/* (or a torchvision data set, whose test "
                        "split is used)")
    train = build_dataset(source, "train", train_transform, max_bad=max_bad, labelled=True)
    val = build_dataset(source, "val", val_transform, max_bad=max_bad)
    if not train.classes:
        if not required:
            return None
        raise DataError(f"the train split of {source.root} has no class labels")
    return train, val


def eval_loaders(source: Source, batch_size: int, workers: int, max_bad: int = 100, image_size: int | None = None,
                 required: bool = True) -> tuple[DataLoader, DataLoader, int] | None:
    """(bank, test, number of classes): the labelled train split and the held-out one, in order, through
    the evaluation transform. Raises DataError without a labelled held-out split (required=False: None)."""
    evaluation = eval_transform(**source.spec(image_size))
    splits = _labelled_splits(source, evaluation, evaluation, max_bad, required)
    if splits is None:
        return None
    bank, test = (make_loader(ds, batch_size, workers, shuffle=False, drop_last=False) for ds in splits)
    return bank, test, len(splits[0].classes)


def linear_loaders(source: Source, batch_size: int, workers: int, seed: int, augmented: bool, distributed: bool,
                   image_size: int | None = None, max_bad: int = 100) -> tuple[DataLoader, DataLoader, int]:
    """(train, val, number of classes) of linear classification, batch_size per process. augmented: train
    through linear_transform in a (seed, epoch) order, this rank's share when distributed; else as
    eval_loaders (the features to cache). val: the whole held-out split, in order, on every process."""
    spec = source.spec(image_size)
    evaluation = eval_transform(**spec)
    train, val = _labelled_splits(source, linear_transform(**spec) if augmented else evaluation, evaluation,
                                  max_bad, required=True)
    train_loader = make_loader(train, batch_size, workers, shuffle=augmented, drop_last=False, seed=seed,
                               distributed=augmented and distributed)
    return train_loader, make_loader(val, batch_size, workers, shuffle=False, drop_last=False), len(train.classes)


def decode_counts(loader) -> dict:
    """The device pipeline's count of images decoded on the CPU (PNG, CMYK, ...), for the log."""
    return {"cpu_decodes": loader.cpu_decodes} if hasattr(loader, "cpu_decodes") else {}
