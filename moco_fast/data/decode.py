"""The device pipeline's decoding: a batch of encoded image files into one packed uint8 buffer on the
run's device (CUDA, or the CPU).

    packed, skipped, source = decode_batch(byte_tensors, device, paths)   # one batch of encoded files

Files whose bytes start as a 3-component JPEG and end with its end-of-image marker go to one batched
decode_jpeg on the device (nvjpeg on CUDA); everything else (PNG, grayscale or CMYK JPEG, a truncated
JPEG) and any JPEG the batched decode rejects is decoded by PIL on the host (.convert("RGB")) and
counted in DecodeStats.cpu_decodes. So a truncated JPEG is unreadable on every device (PIL rejects
it), never half-decoded. A file PIL cannot read either is replaced by the next readable image of the
batch (its target too) and named in the batch's skipped paths, as datasets.MocoDataset does; a batch
with no readable image raises DataError.
"""
from __future__ import annotations

import collections
import io
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from moco_fast.data.datasets import LOAD_ERRORS, DataError


class Packed(NamedTuple):
    """Images of different sizes in one buffer: image i is the contiguous uint8 CHW (C=3) block of
    data starting at element offsets[i]. offsets/heights/widths: int64 (N,) on the host."""
    data: torch.Tensor
    offsets: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor

    def __len__(self) -> int:
        return len(self.offsets)


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
    except LOAD_ERRORS:
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
