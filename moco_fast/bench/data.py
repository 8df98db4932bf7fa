"""Data pipelines side by side: the PIL workers of the official recipe and the GPU data path.

Figures are source images per second, each turned into two augmented views (query and key), after
warm-up batches (worker start-up, cuDNN/nvjpeg initialisation) are excluded. The floor on the GPU is
the decode: nvjpeg's throughput for the folder's JPEG sizes; for small images the augmentation reads
3*H*W bytes and writes 2 * 3*S*S * itemsize bytes per image, far below the memory bandwidth.
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from moco_fast import data as D
from moco_fast.config import PRESETS, Config
from moco_fast.data import BatchAugment, EpochSampler, device_loader
from moco_fast.data.device import InMemoryLoader
from moco_fast.step import TrainStep, fast_cuda_settings
from moco_fast.train import build_model, make_optimizer  # the end-to-end case's model, as the trainer builds it


class Sizes(NamedTuple):
    files: int          # JPEGs in the synthetic folder
    photo: tuple        # (width, height) of each JPEG
    batch: int
    image_size: int     # views of the folder
    batches: int        # timed batches per folder pipeline
    small_n: int        # images in the in-memory set
    small_batch: int
    small_batches: int
    arch: str = "resnet50"  # the encoder of the end-to-end training cases
    steps: int = 10         # timed training steps per end-to-end case


FULL = Sizes(files=1024, photo=(500, 375), batch=256, image_size=224, batches=16,
             small_n=50_000, small_batch=1024, small_batches=40)
QUICK = Sizes(files=24, photo=(120, 90), batch=8, image_size=64, batches=3,
              small_n=256, small_batch=32, small_batches=3, arch="small_resnet", steps=2)


def write_photos(root: pathlib.Path, n: int, size: tuple) -> pathlib.Path:
    """n photo-like JPEGs (smooth colour fields plus grain, so the files compress like photos)."""
    rng = np.random.default_rng(0)
    folder = root / "c0"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def _sampler(n: int, batch_size: int) -> EpochSampler:
    """The trainer's sampler over n images, for one process."""
    return EpochSampler(range(n), batch_size, seed=0)


def _time_batches(loader, batches: int, warmup: int, device: torch.device, each=lambda batch: batch) -> float:
    """Seconds for `batches` batches of `loader` (each passed through `each`) after `warmup` ones, starting
    new epochs (loader.sampler.set_epoch) as needed."""
    def stream():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from map(each, loader)
            epoch += 1
    it = stream()
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del batch
    return time.perf_counter() - t


def bench_pil(root, sz: Sizes, workers: int) -> dict:
    transform = D.TwoCropsTransform(D.moco_augmentation(True, sz.image_size))
    dataset = D.build_dataset(root, "train", transform, "imagefolder")
    loader = D.make_loader(dataset, sz.batch, workers, shuffle=True, drop_last=True, pin_memory=False)
    seconds = _time_batches(loader, sz.batches, 1, torch.device("cpu"))
    return {"pipeline": "PIL workers (v2)", "img_per_s": sz.batch * sz.batches / seconds, "workers": workers}


def bench_gpu_folder(root, sz: Sizes, workers: int, device: torch.device, dtype: torch.dtype) -> dict:
    dataset = D.build_dataset(root, "train", None, "imagefolder")
    augment = BatchAugment("v2", sz.image_size, D.IMAGENET_MEAN, D.IMAGENET_STD, dtype, channels_last=True)
    loader = device_loader(dataset, _sampler(len(dataset), sz.batch), workers, device, augment)
    seconds = _time_batches(loader, sz.batches, 2, device)
    return {"pipeline": "gpu path folder (v2)", "img_per_s": sz.batch * sz.batches / seconds, "workers": workers,
            "cpu_decodes": loader.cpu_decodes}


def bench_gpu_small(sz: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    images = torch.randint(0, 256, (sz.small_n, 3, 32, 32), dtype=torch.uint8)
    augment = BatchAugment("small", 32, D.CIFAR10_MEAN, D.CIFAR10_STD, dtype, channels_last=True)
    loader = InMemoryLoader(images, torch.zeros(sz.small_n, dtype=torch.int64), _sampler(sz.small_n, sz.small_batch),
                            augment, device)
    seconds = _time_batches(loader, sz.small_batches, 2, device)
    return {"pipeline": "gpu path in-memory (small)", "img_per_s": sz.small_batch * sz.small_batches / seconds,
            "workers": 0}


def bench_end_to_end(root, sz: Sizes, workers: int, device: torch.device, cuda_graph: bool) -> list[dict]:
    """MoCo v2 training steps fed from the JPEG folder, the trainer's hot loop (loader, copy, TrainStep)
    without its logging and checkpoints: the GPU data path, then the PIL workers, through one compiled step."""
    cfg = Config(**{**PRESETS["moco_v2"], "arch": sz.arch, "batch_size": sz.batch, "compile": device.type == "cuda"})
    bf16 = device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    if bf16:
        fast_cuda_settings()  # as the trainer does
    model = build_model(cfg, device)
    opt = make_optimizer(cfg, model, device)
    step = TrainStep(torch.compile(model) if cfg.compile else model, opt, device, bf16, cuda_graph=cuda_graph)
    gpu = device_loader(D.build_dataset(root, "train", None, "imagefolder"), _sampler(sz.files, sz.batch), workers,
                        device, BatchAugment("v2", sz.image_size, D.IMAGENET_MEAN, D.IMAGENET_STD, dtype))
    pil = D.make_loader(D.build_dataset(root, "train", D.TwoCropsTransform(D.moco_augmentation(True, sz.image_size)),
                                        "imagefolder"), sz.batch, workers, shuffle=True, drop_last=True)

    def train(batch):
        (im_q, im_k), _, _ = batch
        im_q = im_q.to(device, dtype, non_blocking=True, memory_format=torch.channels_last)
        im_k = im_k.to(device, dtype, non_blocking=True, memory_format=torch.channels_last)
        return step(im_q, im_k)
    rows = []
    for name, loader, warmup, steps in [("gpu path", gpu, 5, sz.steps), ("PIL workers", pil, 1, max(2, sz.steps // 2))]:
        seconds = _time_batches(loader, steps, warmup, device, each=train)
        rows.append({"pipeline": f"train {sz.arch} v2 from JPEGs, {name}" + (" + CUDA graph" if cuda_graph else ""),
                     "img_per_s": sz.batch * steps / seconds, "workers": workers})
    return rows


def run(root: pathlib.Path, quick: bool, device: torch.device, workers: int | None = None,
        on_row=lambda row: None, end_to_end: bool = False, cuda_graph: bool = False) -> list[dict]:
    """All three pipelines (and with end_to_end, training fed by the GPU path and by PIL workers); rows with
    img/s and the speed-up over the PIL pipeline; on_row(row) after each."""
    sz = QUICK if quick else FULL
    workers = workers if workers is not None else (os.cpu_count() or 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    write_photos(root, sz.files, sz.photo)
    folder = {"batch": sz.batch, "image_size": sz.image_size, "source": f"{sz.files} JPEGs {sz.photo[0]}x{sz.photo[1]}"}
    small = {"batch": sz.small_batch, "image_size": 32, "source": f"{sz.small_n} uint8 32x32 in memory"}
    cases = [(lambda: bench_pil(root, sz, workers), folder, "cpu", "float32"),
             (lambda: bench_gpu_folder(root, sz, workers, device, dtype), folder, device.type, dtype),
             (lambda: bench_gpu_small(sz, device, dtype), small, device.type, dtype)]
    if end_to_end:
        cases.append((lambda: bench_end_to_end(root, sz, workers, device, cuda_graph), folder, device.type, dtype))
    rows = []
    for bench, info, dev, dt in cases:
        result = bench()
        for one in result if isinstance(result, list) else [result]:
            row = {**one, **info, "device": dev, "dtype": str(dt).removeprefix("torch.")}
            row["vs_PIL"] = row["img_per_s"] / (rows[0] if rows else row)["img_per_s"]
            rows.append(row)
            on_row(row)
    return rows
