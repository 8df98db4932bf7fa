"""The device pipeline's loaders: decode and augment on the run's device, so real data keeps up with
the training step. On a CPU the same code runs on CPU tensors (the demo's "tensor data path").

Image folders: DataLoader workers only read file bytes; the main process decodes each batch on the
device (decode.decode_batch: nvjpeg through torchvision.io.decode_jpeg) and augments it there
(batch_augment.BatchAugment). Small images (CIFAR, STL-10, (Fashion-)MNIST): the whole set lives on the
device as uint8 (N, 3, H, W) and batches are index tensors, no workers.

    loader = device_loader(dataset, sampler, workers, device, BatchAugment(recipe, size, mean, std))
    for (im_q, im_k), targets, skipped_paths in loader: ...   # what the training loop consumes
    loader.cpu_decodes                                           # images nvjpeg could not take

Each batch's augmentation is drawn from sampling.batch_generator(the sampler's seed, epoch, rank, batch
index in the epoch), so a run resumed mid-epoch sees the same augmentations as an uninterrupted one.
"""
from __future__ import annotations

import torch

from moco_fast.data.batch_augment import BatchAugment
from moco_fast.data.datasets import MocoDataset, in_memory_images
from moco_fast.data.decode import DecodeStats, KeptUntilDone, Packed, decode_batch
from moco_fast.data.sampling import EpochSampler, batch_generator


class _FileBytes(torch.utils.data.Dataset):
    """(file bytes, target, path) for (epoch, index) keys; an unreadable file gives empty bytes."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        path, target = self.samples[key[1]]
        try:
            with open(path, "rb") as f:
                return f.read(), target, path
        except OSError:
            return b"", target, path


def _collate_bytes(items):
    """One uint8 buffer of all files (pinned in one piece by the DataLoader), lengths, targets, paths."""
    lengths = torch.tensor([len(item[0]) for item in items], dtype=torch.int64)
    joined = bytearray(b"".join(item[0] for item in items))
    buffer = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    return buffer, lengths, torch.tensor([item[1] for item in items]), [item[2] for item in items]


class _Loader:
    """What both loaders share: the sampler's order, the augmentation, the decode counts, and one
    generator per batch seeded by its position and the sampler's seed (sampling.batch_generator)."""

    def __init__(self, sampler: EpochSampler, augment: BatchAugment, device: torch.device):
        self.sampler, self.augment, self.device = sampler, augment, device
        self.stats = DecodeStats()

    @property
    def cpu_decodes(self) -> int:
        return self.stats.cpu_decodes

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def _generators(self):
        first, s = self.sampler.skip_batches, self.sampler  # batches a resumed epoch skips
        for b in range(first, first + len(self)):
            yield batch_generator(s.seed, s.epoch, s.rank, b)


def _ahead_on_side_stream(batches, device: torch.device):
    """Yield `batches` one ahead: on CUDA each batch's decode and augmentation are launched on a side
    stream before the previous batch is handed out, so they overlap the training step on the main
    stream. The main stream waits for a batch's work before using it; record_stream keeps the caching
    allocator from reusing its memory while the main stream still reads it."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)

    def launch():
        with torch.cuda.stream(side):
            return next(batches, None)
    ahead = launch()
    while ahead is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)
        (im_q, im_k), targets, skipped = ahead
        for t in (im_q, im_k):
            t.record_stream(main)
        ahead = launch()
        yield (im_q, im_k), targets, skipped


class FolderLoader(_Loader):
    """Image folders: workers read bytes, the device decodes and augments (see the module docstring)."""

    def __init__(self, files: list[tuple[str, int]], sampler: EpochSampler, workers: int, augment: BatchAugment,
                 device: torch.device):
        super().__init__(sampler, augment, device)
        self.loader = torch.utils.data.DataLoader(
            _FileBytes(files), batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
            collate_fn=_collate_bytes, pin_memory=device.type == "cuda", drop_last=True,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(sampler.seed))

    def __iter__(self):
        return _ahead_on_side_stream(self._batches(), self.device)

    def _batches(self):
        kept = KeptUntilDone()
        for (buffer, lengths, targets, paths), gen in zip(self.loader, self._generators()):
            bufs = list(torch.split(buffer, lengths.tolist()))
            packed, skipped, source = decode_batch(bufs, self.device, paths, self.stats, kept)
            views = self.augment.two_views(packed, gen)
            kept.keep([packed.data])  # its last readers, the augmentation kernels, are queued now
            yield views, targets[source], skipped


class InMemoryLoader(_Loader):
    """Small images held whole on the device; a batch is a list of indices into them."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, sampler: EpochSampler, augment: BatchAugment,
                 device: torch.device):
        super().__init__(sampler, augment, device)
        self.images, self.targets = images.to(device).contiguous(), targets
        n, _, h, w = images.shape
        self.heights, self.widths = torch.full((n,), h), torch.full((n,), w)

    def __iter__(self):
        return _ahead_on_side_stream(self._batches(), self.device)

    def _batches(self):
        keys, size = [], self.sampler.batch_size
        gens = self._generators()
        image_numel = self.images[0].numel()
        for key in self.sampler:
            keys.append(key[1])
            if len(keys) < size:
                continue
            idx = torch.tensor(keys, dtype=torch.int64)
            keys = []
            packed = Packed(self.images.view(-1), idx * image_numel, self.heights[idx], self.widths[idx])
            yield self.augment.two_views(packed, next(gens)), self.targets[idx], []


def device_loader(dataset: MocoDataset, sampler: EpochSampler, workers: int, device, augment: BatchAugment):
    """An iterable of ((im_q, im_k), targets, skipped_paths) batches with __len__ and .cpu_decodes.

    dataset: datasets.build_dataset(..., "train", transform=None); an image folder is read by `workers`
    processes and decoded on `device`, an in-memory set is copied to `device` whole. sampler: its
    batch_size is the per-process batch, its seed seeds the augmentation too. im_q, im_k: (B, 3, S, S) on `device` as `augment` makes them.
    """
    device = torch.device(device)
    if dataset.files is not None:
        return FolderLoader(dataset.files, sampler, workers, augment, device)
    images, targets = in_memory_images(dataset)
    return InMemoryLoader(images, targets, sampler, augment, device)
