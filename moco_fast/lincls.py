"""Linear classification on frozen features (the official main_lincls.py recipe), and its fast
approximation on cached features.

Official: the backbone stays frozen in eval mode, a fresh fc (N(0, 0.01) weights, zero bias) is trained
with SGD (lr 30, momentum 0.9, no weight decay) for 100 epochs, lr x0.1 at epochs 60 and 80, batch
256, RandomResizedCrop + flip for training and resize 256 / center crop 224 for validation; at the
end the backbone is checked to be bitwise unchanged (BatchNorm statistics included).
--cached-features extracts the frozen features once (center crops) and trains the same fc on them.
-e/--evaluate only evaluates the head of a lincls checkpoint (--resume) on the validation split.
The config (LinclsConfig, its flags and presets) lives in moco_fast.config, with pretraining's.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_fast import checkpoint, data
from moco_fast.config import LinclsConfig, learning_rate
from moco_fast.encoders import ARCHS
from moco_fast.evaluate import extract_features, head_accuracy, new_head, sanity_check
from moco_fast.monitor import RunLog, plot_run
from moco_fast.preemption import Stopped, StopRequest


def baseline_backbone(cfg: LinclsConfig, source: data.Source | None = None) -> tuple[nn.Module, int]:
    """Raw pixels (flattened) or a randomly initialised encoder, with its feature size (source: the data
    set's data.locate, when the caller has it)."""
    size = data.image_spec(source or cfg.data, cfg.dataset, cfg.image_size)["image_size"]
    if cfg.baseline == "pixels":
        return nn.Flatten(), 3 * size * size
    torch.manual_seed(0)
    encoder = ARCHS[cfg.arch]()
    encoder.fc = nn.Identity()
    with torch.no_grad():
        dim = encoder.eval()(torch.zeros(2, 3, size, size)).shape[1]
    return encoder, dim




LINCLS_KEYS = ("fc", "optimizer", "epoch", "rng", "config")
LINCLS_WHAT = "a checkpoint of scripts/lincls.py"


def find_resume(cfg: LinclsConfig, say=print) -> tuple[str | None, dict | None]:
    """(path, checkpoint) to continue from (checkpoint.find_resume over checkpoint.pth, checkpoint_prev.pth)."""
    return checkpoint.find_resume(cfg.resume, checkpoint.candidates(cfg.output_dir), LINCLS_KEYS, LINCLS_WHAT,
                                  position=_position, say=say)


def _position(ck: dict) -> tuple[int, int]:
    return ck["epoch"], ck.get("step_in_epoch", 0)


def _start_epoch(loader, epoch: int, skip_batches: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, data.EpochSampler):  # a new order each epoch, a function of (seed, epoch): resumable
        sampler.set_epoch(epoch, skip_batches)
    elif skip_batches:
        raise ValueError("this training loader cannot start an epoch mid-way (build it with moco_fast.data)")


def train_linear(cfg, backbone, feature_dim: int, train_loader, val_loader, num_classes: int, device,
                 log: RunLog, cached: bool, is_main: bool = True, resume: tuple = (None, None),
                 stop: StopRequest | None = None) -> dict:
    """The official schedule over `cfg.epochs` (or until --max-steps), from resume = (path, checkpoint)
    when given. Under a process group the head is DDP-wrapped (each process reads its shard); rank 0
    logs and saves. A stop request ends the run after the current step with a checkpoint of it (Stopped)."""
    torch.manual_seed(cfg.seed)  # the head's initialisation, the same on every process
    fc = new_head(feature_dim, num_classes).to(device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    model = nn.parallel.DistributedDataParallel(fc) if distributed else fc
    opt = torch.optim.SGD(fc.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    path, steps_per_epoch = os.path.join(cfg.output_dir, "checkpoint.pth"), len(train_loader)
    limit = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    start, skip, best = _restore(fc, opt, *resume, log)
    save = lambda epoch, done, best: is_main and checkpoint.save_atomic(  # noqa: E731
        {"fc": fc.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step_in_epoch": done,
         "best": best, "rng": checkpoint.rng_state(), "config": cfg.to_dict()},
        path, keep_previous=os.path.join(cfg.output_dir, "checkpoint_prev.pth"))
    result, step = best, start * steps_per_epoch + skip
    for epoch in range(start, cfg.epochs):
        if step >= limit:
            break
        lr = learning_rate(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        _start_epoch(train_loader, epoch, skip)
        log.start_epoch(epoch, steps_per_epoch, skip)
        def check_stop(done: int, step: int) -> None:  # raises Stopped once the checkpoint of this step is written
            if stop is not None and stop.should_stop() and done < steps_per_epoch:
                _stop_mid_epoch(save, log, stop, epoch, done, step, best)

        step, done, loss = _train_epoch(cfg, model, opt, backbone if not cached else None, train_loader, device,
                                        log, (epoch, step, skip, limit), check_stop)
        log.end_epoch()
        skip = 0
        result = head_accuracy(None if cached else backbone, fc, val_loader, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the linear head's loss is {loss.item()} in epoch {epoch}")
        best = max(best, result, key=lambda r: r.get("acc1", -1)) if best else result
        ended = done < steps_per_epoch  # --max-steps ended the run mid-epoch
        log.record("lincls", step, {"epoch": epoch + done / steps_per_epoch if ended else epoch + 1,
                                    "loss": loss.item(), "lr": lr, **result})
        save(epoch + (0 if ended else 1), done if ended else 0, best)
        if stop is not None and stop.agreed:
            _stop_mid_epoch(save, log, stop, epoch + 1, 0, step, best, saved=True)
    return {"last": result, "best": best}


def _train_epoch(cfg, model, opt, backbone, loader, device, log, where: tuple, check_stop):
    """The steps of one epoch from where = (epoch, global step, batches done, step limit), check_stop(done,
    step) after each; a train row every --print-freq steps; returns (global step, batches done, last loss)."""
    epoch, step, done, limit = where
    bf16 = torch.device(device).type == "cuda"
    loss = torch.zeros(())
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=True), torch.as_tensor(batch[1]).to(device)
        with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
            feats = x if backbone is None else backbone(x)
        loss = F.cross_entropy(model(feats.float()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step, done = step + 1, done + 1
        log.advance()
        if step % cfg.print_freq == 0:  # one host read of the loss every --print-freq steps, as the official
            log.record("train", step, {"epoch": epoch, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
        if step >= limit:
            break
        check_stop(done, step)
    return step, done, loss


def evaluate_only(backbone, feature_dim: int, val_loader, num_classes: int, device, resume: tuple,
                  say=print) -> dict:
    """-e/--evaluate: the head of the --resume checkpoint (resume = (path, checkpoint)) on the validation
    split; nothing is trained and nothing in --output-dir is written."""
    path, ck = resume
    if ck is None:
        raise checkpoint.CheckpointError("-e/--evaluate: --resume auto found no checkpoint of scripts/lincls.py")
    fc = new_head(feature_dim, num_classes).to(device)
    try:
        fc.load_state_dict(ck["fc"])
    except (RuntimeError, KeyError) as err:
        raise checkpoint.CheckpointError(f"-e/--evaluate: the head in {path} does not fit these features "
                                         f"({feature_dim}-d, {num_classes} classes): {' '.join(str(err).split())[:300]}") from None
    result = head_accuracy(backbone, fc, val_loader, device)
    say(f"evaluated {path} (epoch {ck['epoch']}): top-1 {result['acc1']:.2f}%, top-5 {result['acc5']:.2f}%")
    return {"last": result, "best": ck.get("best") or result}


def _restore(fc, opt, path, ck, log) -> tuple[int, int, dict]:
    """(first epoch, batches of it already done, best result so far) from a lincls checkpoint."""
    if ck is None:
        return 0, 0, {}
    try:
        fc.load_state_dict(ck["fc"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise checkpoint.CheckpointError(f"cannot resume from {path}: it does not fit this head (another "
                                         f"--pretrained or data set?): {' '.join(str(err).split())[:300]}") from None
    checkpoint.set_rng_state(ck["rng"])
    start, skip = _position(ck)
    log.info(f"resumed at epoch {start}" + (f", batch {skip}" if skip else "") + f" from {path}")
    return start, skip, ck.get("best", {})


def _stop_mid_epoch(save, log, stop, epoch, done, step, best, saved=False) -> None:
    if not saved:
        save(epoch, done, best)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process waits for rank 0's checkpoint before leaving
    message = (f"stopped by {stop.name} at step {step} (epoch {epoch}, batch {done}); checkpoint written; "
               "continue with the same command and --resume auto")
    log.info(message)
    log.close()
    raise Stopped(stop.agreed, message)


def cached_loaders(backbone, train_loader_eval, val_loader, device, batch_size: int, rank: int = 0,
                   world_size: int = 1, seed: int = 0):
    """Features of the center crops, extracted once: the head then trains in seconds."""
    with torch.no_grad():
        train = extract_features(backbone, train_loader_eval, device, normalize=False)
        val = extract_features(backbone, val_loader, device, normalize=False)
    return (data.TensorBatches(*train, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size),
            data.TensorBatches(*val, batch_size, shuffle=False))


def frozen(backbone: nn.Module) -> tuple[nn.Module, dict]:
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad = False
    return backbone, copy.deepcopy(backbone.state_dict())


def run_lincls(cfg, backbone, feature_dim: int, device, rank: int = 0, world_size: int = 1,
               source: data.Source | None = None) -> dict:
    """Linear evaluation as cfg says; returns {"last": {...}, "best": {...}} accuracies. Each of
    world_size processes trains on its shard of the data (batch_size is global)."""
    per_rank = cfg.batch_size // world_size
    train_loader, val_loader, num_classes = data.linear_loaders(
        source or data.locate(cfg.data, cfg.dataset), per_rank, cfg.workers, cfg.seed, augmented=not cfg.cached_features,
        distributed=world_size > 1, image_size=cfg.image_size)
    backbone, reference = frozen(backbone.to(device))
    say = print if rank == 0 else lambda *_: None
    resume = find_resume(cfg, say)
    if cfg.evaluate:  # the official -e: the head of --resume on the validation images, nothing trained
        return evaluate_only(backbone, feature_dim, val_loader, num_classes, device, resume, say)
    if cfg.cached_features:
        train_loader, val_loader = cached_loaders(backbone, train_loader, val_loader, device, per_rank, rank,
                                                  world_size, cfg.seed)
    epoch, done = _position(resume[1]) if resume[1] is not None else (0, 0)
    resume_step = epoch * len(train_loader) + done if resume[1] is not None else None
    log = RunLog(cfg.output_dir, rank == 0, resume_step=resume_step)
    with StopRequest() as stop:
        result = train_linear(cfg, backbone, feature_dim, train_loader, val_loader, num_classes, device, log,
                              cached=cfg.cached_features, is_main=rank == 0, resume=resume, stop=stop)
    sanity_check(backbone, reference)
    log.info(f"linear classification top-1 {result['last']['acc1']:.2f}% (best {result['best']['acc1']:.2f}%), "
             f"top-5 {result['last']['acc5']:.2f}%; backbone unchanged")
    log.close()
    plot_run(cfg.output_dir)
    return result
