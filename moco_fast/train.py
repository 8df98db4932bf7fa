"""MoCo pretraining: the loop behind `torchrun scripts/pretrain.py`.

One process or DDP through torchrun's environment; the model compiled with torch.compile, bf16
autocast on the GPU, channels_last, foreach/fused SGD, the fastest op backends picked automatically.
Nothing in a step waits for the host except the metrics read every --print-freq steps. A run stopped
anywhere continues from its last checkpoint (written every epoch and every --checkpoint-minutes,
atomically); on the CPU a resumed run repeats the uninterrupted one's losses bitwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn

from moco_fast import checkpoint, data
from moco_fast.config import Config, ema_momentum, learning_rate, validate
from moco_fast.data import EpochSampler, decode_counts
from moco_fast.distributed import DistInfo, agree_on_int, cleanup_distributed, setup_distributed
from moco_fast.encoders import get_encoder
from moco_fast.evaluate import knn_monitor
from moco_fast.model import MoCo
from moco_fast.monitor import Meter, RunLog, plot_run
from moco_fast.preemption import Stopped, StopRequest
from moco_fast.step import (DDP_WARMUP, TrainStep, check_capturable, fast_cuda_settings, optimizer_state,
                            set_learning_rate)


# ----------------------------------------------------------------------------------------- model
def build_model(cfg: Config, device: torch.device) -> MoCo:
    model = MoCo(get_encoder(cfg.arch), dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, mlp=cfg.mlp,
                 bn_splits=cfg.bn_splits, symmetric=cfg.symmetric, queue_dtype=getattr(torch, cfg.queue_dtype),
                 backend=cfg.backend)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(cfg: Config, model: MoCo, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    return torch.optim.SGD(model.encoder_q.parameters(), cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, foreach=not fused, fused=fused or None)




def run(cfg: Config) -> dict:
    """Train as the config says; returns the last metrics. Called once per process (torchrun or plain).
    Raises Stopped after a SIGTERM or SIGINT, once the checkpoint of the step it ended on is written."""
    info = setup_distributed(None if cfg.device == "auto" else cfg.device, cuda_graph=cfg.cuda_graph)
    try:
        with StopRequest() as stop:  # before the loader's workers fork: they inherit the handlers
            return _run(cfg, info, stop)
    finally:
        cleanup_distributed()


@dataclasses.dataclass
class _Parts:
    """What the loop works with, built once."""
    model: MoCo
    opt: torch.optim.Optimizer
    loader: object
    sampler: EpochSampler
    train_step: TrainStep
    log: RunLog
    skips: data.SkipCounter
    knn: tuple | None


def _run(cfg: Config, info: DistInfo, stop: StopRequest) -> dict:
    validate(cfg, info.world_size)  # parse_config did for the command line; configs built in Python too
    device = info.device
    seed = cfg.seed if cfg.seed is not None else 0
    resume_path, ck = checkpoint.find_resume(
        cfg.resume, checkpoint.candidates(cfg.output_dir, per_epoch=True), checkpoint.PRETRAIN_KEYS,
        checkpoint.PRETRAIN_WHAT, position=lambda c: c["global_step"], say=print if info.is_main else lambda *_: None)
    resume_step = agree_on_int(ck["global_step"] if ck else -1, "the step to resume from")
    if info.is_main and os.path.isdir(cfg.output_dir):
        checkpoint.remove_stale_temps(cfg.output_dir)  # left by a writer killed mid-write
    log = RunLog(cfg.output_dir, info.is_main, resume_step=resume_step if ck else None)
    if info.is_main:
        log.info(f"config ({info.world_size} process(es) on {device}):\n{cfg.dumps()}")
        checkpoint.write_text_atomic(os.path.join(cfg.output_dir, "config.json"), cfg.dumps())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    # bad data paths fail here, before any work
    source = data.locate(cfg.data, cfg.dataset)  # the one search of the disk for this run
    loader, sampler = data.train_loader(cfg, source, info, seed, torch.bfloat16 if use_bf16 else torch.float32)
    knn = (data.eval_loaders(source, 512, cfg.workers, cfg.max_bad_images, cfg.image_size, required=False)
           if cfg.knn_every and info.is_main else None)
    if device.type == "cuda":
        fast_cuda_settings()
    model = build_model(cfg, device)
    if cfg.cuda_graph:
        check_capturable(model, device)
    wrapped = model
    if info.world_size > 1:  # a captured DDP is built on a side stream, as PyTorch documents
        with torch.cuda.stream(torch.cuda.Stream()) if cfg.cuda_graph else contextlib.nullcontext():
            wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    step_fn = torch.compile(wrapped) if cfg.compile else wrapped
    opt = make_optimizer(cfg, model, device)
    pos = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if ck:
        pos = checkpoint.restore_pretrain(model, opt, resume_path, ck)
        del ck  # the loaded copy of the weights is no longer needed
        log.info(f"resumed from {resume_path} at epoch {pos['epoch']}, step {pos['global_step']}")
    train_step = TrainStep(step_fn, opt, device, use_bf16, cuda_graph=cfg.cuda_graph,
                           warmup=DDP_WARMUP if info.world_size > 1 else 3)
    parts = _Parts(model, opt, loader, sampler, train_step, log, data.SkipCounter(cfg.max_bad_images), knn)
    baseline = {}
    if knn is not None and pos["global_step"] == 0:
        baseline = knn_monitor(cfg, model, knn, device, log, 0, baselines=source.info.small)
    pos, last = _train(cfg, info, parts, pos, stop)
    if stop.agreed:
        _stopped(cfg, info, log, stop, pos)
    if info.is_main and "pixels_top1" in baseline and "knn_top1" in last:
        log.info(f"kNN top-1 (k={cfg.knn_k}, t={cfg.knn_t}) on the held-out split: learned features "
                 f"{last['knn_top1']:.2f}%, untrained encoder {baseline['untrained_top1']:.2f}%, "
                 f"raw pixels {baseline['pixels_top1']:.2f}%")
    if info.is_main:
        log.info(f"done: {pos['global_step']} steps, {parts.skips.count} unreadable images skipped; "
                 f"plot: {plot_run(cfg.output_dir)}")
    log.close()
    return last


def _train(cfg: Config, info: DistInfo, p: _Parts, pos: dict, stop: StopRequest) -> tuple[dict, dict]:
    """Epochs until --epochs, --max-steps or a stop request; returns (position, last metrics)."""
    steps_per_epoch = p.sampler.full_batches
    total = cfg.epochs * steps_per_epoch
    max_steps = total if cfg.max_steps is None else min(total, cfg.max_steps)
    last, meter, last_save = {}, Meter(), time.monotonic()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    while pos["global_step"] < max_steps:
        epoch = pos["epoch"]
        lr = learning_rate(cfg, epoch)
        set_learning_rate(p.opt, lr)
        p.sampler.set_epoch(epoch, skip_batches=pos["step_in_epoch"])
        p.log.start_epoch(epoch, steps_per_epoch, pos["step_in_epoch"])
        t = time.perf_counter()
        for (im_q, im_k), _, skipped in p.loader:
            p.skips.add(skipped)
            wait = time.perf_counter() - t
            im_q = im_q.to(info.device, non_blocking=True, memory_format=memory_format)
            im_k = im_k.to(info.device, non_blocking=True, memory_format=memory_format)
            momentum = ema_momentum(cfg, pos["global_step"], total)
            if momentum != p.model.m:
                p.model.set_momentum(momentum)
            meter.add(pos["global_step"] + 1, p.train_step(im_q, im_k), wait)
            pos["global_step"] += 1
            pos["step_in_epoch"] += 1
            p.log.advance()
            done = pos["global_step"] >= max_steps
            stopping = stop.should_stop()  # the same answer on every rank for this step
            if pos["global_step"] % cfg.print_freq == 0 or done or stopping:
                last = meter.flush(cfg.batch_size) or last
                p.log.record("train", pos["global_step"], {**last, "epoch": epoch, "lr": lr, "moco_m": momentum,
                                                            "skipped_images": p.skips.count,
                                                            **decode_counts(p.loader)})
            if info.is_main and (done or stopping or time.monotonic() - last_save > 60 * cfg.checkpoint_minutes):
                last = meter.flush(cfg.batch_size) or last  # never save past a non-finite loss
                checkpoint.save_pretrain(cfg, p.model, optimizer_state(p.opt), pos, p.skips.count)
                last_save = time.monotonic()
            if done or stopping:
                break
            t = time.perf_counter()
        p.log.end_epoch()
        if pos["step_in_epoch"] < steps_per_epoch:
            break  # --max-steps or a stop request ended the run mid-epoch
        pos = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": pos["global_step"]}
        if info.is_main:
            last = _end_of_epoch(cfg, info, p, pos, meter, last, knn=not stop.agreed)
            last_save = time.monotonic()
        if info.world_size > 1:
            torch.distributed.barrier()
        if stop.agreed:
            break
    return pos, last


def _end_of_epoch(cfg: Config, info: DistInfo, p: _Parts, pos: dict, meter: Meter, last: dict, knn: bool) -> dict:
    """Rank 0 at an epoch boundary: the checkpoint, the per-epoch one when asked, the kNN monitor."""
    last = meter.flush(cfg.batch_size) or last
    checkpoint.save_pretrain(cfg, p.model, optimizer_state(p.opt), pos, p.skips.count)
    epoch = pos["epoch"]  # the number of epochs done
    if cfg.save_every and epoch % cfg.save_every == 0:
        checkpoint.save_pretrain(cfg, p.model, optimizer_state(p.opt), pos, p.skips.count, f"checkpoint_epoch{epoch}.pth")
    if knn and p.knn is not None and (epoch % cfg.knn_every == 0 or epoch == cfg.epochs):
        last = {**last, **knn_monitor(cfg, p.model, p.knn, info.device, p.log, pos["global_step"], baselines=False)}
    return last


def _stopped(cfg: Config, info: DistInfo, log: RunLog, stop: StopRequest, pos: dict) -> None:
    """After the checkpoint of the stop step: every rank waits for rank 0's write, then Stopped."""
    if info.world_size > 1:
        torch.distributed.barrier()  # a rank that left early would have torchrun kill rank 0 mid-write
    path = os.path.join(cfg.output_dir, "checkpoint.pth")
    message = (f"stopped by {stop.name} after step {pos['global_step']} (epoch {pos['epoch']}), all "
               f"{info.world_size} process(es) at the same step; checkpoint written: {path}. Continue with the "
               "same command and --resume auto")
    log.info(message)
    log.close()
    raise Stopped(stop.agreed, message)
