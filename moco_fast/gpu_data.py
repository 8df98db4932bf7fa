"""The GPU data path: decode and augment on the device, so real data keeps up with the training step.

Image folders: DataLoader workers only read file bytes; the main process decodes each batch on the
device (nvjpeg through torchvision.io.decode_jpeg) and augments it there (gpu_augment.GpuAugment).
Small images (CIFAR, STL-10, (Fashion-)MNIST): the whole set lives on the device as uint8 (N, 3, H, W)
and batches are index tensors, no workers. On a CPU the same code runs on CPU tensors.

    loader = make_gpu_train_loader(dataset, sampler, workers, device, recipe, image_size, mean, std,
                                   out_dtype=torch.bfloat16, channels_last=True, seed=seed, rank=rank)
    for (im_q, im_k), targets, skipped_paths in loader: ...   # what the training loop consumes
    loader.cpu_decodes                                           # images nvjpeg could not take

    packed, skipped, source = decode_batch(byte_tensors, device, paths)   # one batch of encoded files

`dataset` is data.build_dataset(..., "train", transform=None); `sampler` yields (epoch, index) keys
and has .epoch, .batch_size, .skip and set_epoch(epoch, skip_batches) (train.EpochSampler). Each
batch's augmentation is drawn from a generator seeded by (seed, epoch, rank, batch index in the epoch),
so a run resumed mid-epoch sees the same augmentations as an uninterrupted one.

Decoding: files whose bytes start as a 3-component JPEG and end with its end-of-image marker go to one
batched decode_jpeg on the device; everything else (PNG, grayscale or CMYK JPEG, a truncated JPEG) and
any JPEG the batched decode rejects is decoded by PIL on the host (.convert("RGB")) and counted in
cpu_decodes. So a truncated JPEG is unreadable on every device (PIL rejects it), never half-decoded. A file PIL cannot read either is replaced by
the next readable image of the batch (its target too) and named in the batch's skipped paths, as
data.MocoDataset does; a batch with no readable image raises data.DataError.
"""
from __future__ import annotations

import collections
import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_jpeg

from moco_fast.data import _LOAD_ERRORS, DataError, MocoDataset
from moco_fast.gpu_augment import GpuAugment, Packed

__all__ = ["decode_batch", "DecodeStats", "KeptUntilDone", "make_gpu_train_loader", "batch_generator"]


# ------------------------------------------------------------------------------------------ decoding
class DecodeStats:
    """Running counts of a decoder: images decoded on the device, by PIL on the host, and unreadable."""

    def __init__(self):
        self.device_decodes = self.cpu_decodes = self.unreadable = 0


class KeptUntilDone:
    """Device tensors kept alive until the work queued after their last use has run.

    decode_jpeg(device="cuda") takes its outputs from the caching allocator's pool of the current stream
    and writes them on nvjpeg's own stream. Once a decoded image (or the packed buffer copied from it)
    dies on the host, the allocator may hand its memory to the next batch's decode while the copy or the
    augmentation that reads it is still queued: nvjpeg would overwrite pixels not yet read. So each batch's
    buffers are held here with an event recorded after their last use, and let go once it has completed.
    """

    def __init__(self):
        self._held: collections.deque = collections.deque()

    def keep(self, tensors) -> None:
        tensors = [t for t in tensors if t is not None and t.is_cuda]
        if tensors:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensors[0].device))
            self._held.append((event, tensors))

    def release_done(self) -> None:
        while self._held and self._held[0][0].query():  # one stream: events complete in order
            self._held.popleft()

    def __len__(self) -> int:
        return len(self._held)


_KEPT = KeptUntilDone()  # for decode_batch called on its own


def _jpeg_components(buf: torch.Tensor) -> int:
    """Colour components in the first SOF marker of a JPEG (3 = YCbCr/RGB, 1 = gray, 4 = CMYK/YCCK);
    0 when the bytes are not a JPEG or the header cannot be parsed."""
    b = buf[:65536].numpy().tobytes()  # SOF sits after the APPn/DQT/DHT segments, early in the file
    if b[:3] != b"\xff\xd8\xff":
        return 0
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return 0
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = (b[i + 2] << 8) | b[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            return b[i + 9]
        i += 2 + length
    return 0


def _pil_decode(buf: torch.Tensor) -> torch.Tensor | None:
    """uint8 (3, H, W) on the host, or None when PIL cannot read the bytes."""
    try:
        with Image.open(io.BytesIO(buf.numpy().tobytes())) as img:
            rgb = np.array(img.convert("RGB"))
    except _LOAD_ERRORS:
        return None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _device_decode(bufs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Batched decode_jpeg; when the batch fails, one by one so that only the culprits are lost."""
    if not bufs:
        return []
    try:
        return list(decode_jpeg(bufs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for buf in bufs:
            try:
                out.append(decode_jpeg(buf, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_batch(byte_tensors: Sequence[torch.Tensor], device: torch.device | str, paths: Sequence[str],
                 stats: DecodeStats | None = None, kept: KeptUntilDone | None = None
                 ) -> tuple[Packed, list[str], torch.Tensor]:
    """Decode one batch of encoded images (1-D uint8 host tensors) onto `device`.

    Returns (packed, skipped, source): the images as one Packed buffer on the device (sizes on the
    host); the paths of unreadable files; source, int64 (N,), the input index whose image fills each
    slot (i itself unless i was unreadable) so that the caller can replace targets alike. On CUDA the
    decoded images are held in `kept` (a module-wide one by default) until the packing copy has run;
    the caller holds packed.data there too until its last reader is queued.
    """
    device = torch.device(device)
    stats = stats if stats is not None else DecodeStats()
    kept = kept if kept is not None else _KEPT
    kept.release_done()
    images: list[torch.Tensor | None] = [None] * len(byte_tensors)
    # A file without the end-of-image marker is truncated: nvjpeg may decode it anyway (the missing rows
    # filled in), libjpeg and PIL reject it. Sending it to PIL gives one contract on every device:
    # a truncated JPEG is unreadable, skipped and replaced like any unreadable file.
    on_device = [i for i, b in enumerate(byte_tensors) if _jpeg_components(b) == 3 and _has_end_marker(b)]
    for i, img in zip(on_device, _device_decode([byte_tensors[i] for i in on_device], device)):
        images[i] = img
    stats.device_decodes += sum(images[i] is not None for i in on_device)
    for i, buf in enumerate(byte_tensors):
        if images[i] is None:
            img = _pil_decode(buf)
            if img is not None:
                images[i] = img.to(device, non_blocking=True)
                stats.cpu_decodes += 1
    readable = [i for i, img in enumerate(images) if img is not None]
    if not readable:
        raise DataError(f"no readable image in a batch of {len(images)}, e.g. {list(paths[:5])}")
    source = torch.arange(len(images))
    skipped = []
    for i, img in enumerate(images):
        if img is None:  # the next readable image of the batch, wrapping around
            source[i] = next((j for j in readable if j > i), readable[0])
            skipped.append(paths[i])
    stats.unreadable += len(skipped)
    packed = _pack(images, readable, source)
    kept.keep(images)  # until the copy into packed.data, queued just now, has run
    return packed, skipped, source


def _has_end_marker(buf: torch.Tensor) -> bool:
    """Whether a JPEG's last bytes hold its EOI marker (FF D9), allowing for a little trailing padding."""
    tail = bytes(buf[-32:].tolist())
    return b"\xff\xd9" in tail


def _pack(images: list, readable: list[int], source: torch.Tensor) -> Packed:
    """One buffer of the readable images; an unreadable slot points at its source's image."""
    sizes = torch.tensor([0 if img is None else img.numel() for img in images])
    starts = torch.cumsum(sizes, 0) - sizes
    data = torch.cat([images[i].reshape(-1) for i in readable])
    heights = torch.tensor([images[int(s)].shape[1] for s in source])
    widths = torch.tensor([images[int(s)].shape[2] for s in source])
    return Packed(data, starts[source], heights, widths)


# ------------------------------------------------------------------------------------------ loaders
def batch_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The CPU generator of one batch's augmentation parameters: a function of its position alone."""
    key = ((((seed * 1_000_003 + epoch) * 1_000_003) + rank) * 1_000_000_007 + batch) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


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
    def __init__(self, sampler, augment: GpuAugment, device: torch.device, seed: int, rank: int):
        self.sampler, self.augment, self.device, self.seed, self.rank = sampler, augment, device, seed, rank
        self.stats = DecodeStats()

    @property
    def cpu_decodes(self) -> int:
        return self.stats.cpu_decodes

    def __len__(self) -> int:
        return len(self.sampler) // self.sampler.batch_size

    def _generators(self):
        first = self.sampler.skip // self.sampler.batch_size  # batches a resumed epoch skips
        epoch = self.sampler.epoch
        for b in range(first, first + len(self)):
            yield batch_generator(self.seed, epoch, self.rank, b)


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

    def __init__(self, samples, sampler, workers: int, augment: GpuAugment, device, seed: int, rank: int):
        super().__init__(sampler, augment, device, seed, rank)
        self.loader = torch.utils.data.DataLoader(
            _FileBytes(samples), batch_size=sampler.batch_size, sampler=sampler, num_workers=workers,
            collate_fn=_collate_bytes, pin_memory=device.type == "cuda", drop_last=True,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))

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

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, sampler, augment: GpuAugment,
                 device, seed: int, rank: int):
        super().__init__(sampler, augment, device, seed, rank)
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


def in_memory_images(base) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision in-memory data set as uint8 (N, 3, H, W) (gray repeated) and int64 targets (N,)."""
    images = torch.as_tensor(np.asarray(base.data))
    if isinstance(base, datasets.CIFAR10):  # CIFAR-100 too: (N, H, W, 3) rows
        images = images.permute(0, 3, 1, 2)
    elif images.dim() == 3:  # (Fashion-)MNIST: (N, H, W) gray
        images = images[:, None].expand(-1, 3, -1, -1)
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise DataError(f"{type(base).__name__}.data: expected uint8 images (N, 3, H, W) after conversion, "
                        f"got {tuple(images.shape)} {images.dtype}")
    targets = getattr(base, "targets", None)
    targets = getattr(base, "labels") if targets is None else targets
    return images.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.int64)


def make_gpu_train_loader(dataset: MocoDataset, sampler, workers: int, device, recipe: str, image_size: int,
                          mean, std, out_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                          seed: int = 0, rank: int = 0, backend: str = "auto", crop_scale: float | None = None):
    """An iterable of ((im_q, im_k), targets, skipped_paths) batches with __len__ and .cpu_decodes.

    dataset: data.build_dataset(..., "train", transform=None); an image folder is read by `workers`
    processes and decoded on `device`, an in-memory set is copied to `device` whole. sampler: as
    train.EpochSampler; its batch_size is the per-process batch. recipe: "v1", "v2" or "small".
    im_q, im_k: (B, 3, image_size, image_size) on `device` in out_dtype, channels_last when asked.
    """
    device = torch.device(device)
    augment = GpuAugment(recipe, image_size, mean, std, out_dtype, channels_last, backend, crop_scale)
    base = dataset.base if isinstance(dataset, MocoDataset) else dataset
    if isinstance(base, datasets.DatasetFolder):
        return FolderLoader(base.samples, sampler, workers, augment, device, seed, rank)
    if getattr(base, "data", None) is not None:
        images, targets = in_memory_images(base)
        return InMemoryLoader(images, targets, sampler, augment, device, seed, rank)
    raise DataError(f"the GPU data path reads image folders and in-memory sets, not {type(base).__name__}")
