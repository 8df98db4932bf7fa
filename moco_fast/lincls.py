"""Linear classification on frozen features (the official main_lincls.py recipe), and its fast
approximation on cached features.

Official: the backbone stays frozen in eval mode, a fresh fc (N(0, 0.01) weights, zero bias) is trained
with SGD (lr 30, momentum 0.9, no weight decay) for 100 epochs, lr x0.1 at epochs 60 and 80, batch
256, RandomResizedCrop + flip for training and resize 256 / center crop 224 for validation; at the
end the backbone is checked to be bitwise unchanged (BatchNorm statistics included).
--cached-features extracts the frozen features once (center crops) and trains the same fc on them.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_fast import checkpoint, data
from moco_fast.encoders import ARCHS
from moco_fast.evaluate import extract_features
from moco_fast.monitor import RunLog, plot_run
from moco_fast.preemption import Stopped, StopRequest


class BackboneChanged(RuntimeError):
    pass


@dataclasses.dataclass
class LinclsConfig:
    pretrained: Optional[str] = None    # a pretrain.py checkpoint or an official MoCo release
    data: Optional[str] = None          # None: the demo data (Fashion-MNIST)
    arch: Optional[str] = None          # taken from the checkpoint when it says
    dataset: str = "auto"
    image_size: Optional[int] = None
    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    schedule: tuple = (60, 80)
    weight_decay: float = 0.0
    workers: int = 32
    cached_features: bool = False
    baseline: Optional[str] = None      # "pixels" or "untrained": what the learned features must beat
    output_dir: str = "runs/lincls"
    resume: str = ""
    seed: int = 0
    preset: Optional[str] = None
    device: str = "auto"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "schedule": list(self.schedule)}


PRESETS = {
    "official": {},
    # small images (CIFAR, STL-10, Fashion-MNIST): the same schedule, small-image transforms (by data set)
    "small": dict(workers=8),
    # after the pretraining demo, on the CPU: cached features make 100 epochs take seconds
    "demo": dict(pretrained="runs/moco/checkpoint.pth", cached_features=True, workers=1, batch_size=256),
}


def parse_args(argv=None) -> LinclsConfig:
    p = argparse.ArgumentParser(description="linear classification on frozen MoCo features")
    p.add_argument("data", nargs="?", default=None, help="data path; omitted: the Fashion-MNIST demo data")
    p.add_argument("--pretrained", help="checkpoint of scripts/pretrain.py or an official MoCo release")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("-a", "--arch", choices=sorted(ARCHS), metavar="ARCH", help=f"one of {', '.join(sorted(ARCHS))}")
    p.add_argument("--dataset", choices=["auto", *data.DATASETS])
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", type=int, nargs="*")
    p.add_argument("--wd", dest="weight_decay", type=float)
    p.add_argument("-j", "--workers", type=int)
    p.add_argument("--cached-features", action="store_const", const=True)
    p.add_argument("--baseline", choices=["pixels", "untrained"],
                   help="instead of --pretrained: raw pixels, or the --arch encoder at its random init")
    p.add_argument("--output-dir")
    p.add_argument("--resume", help="a checkpoint path or 'auto'")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"])
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("preset") or (None if args.get("data") else "demo")
    values = {**PRESETS.get(preset, {}), **args, "preset": preset}
    if "schedule" in values:
        values["schedule"] = tuple(values["schedule"])
    cfg = LinclsConfig(**values)
    if cfg.baseline:
        cfg.pretrained = None
    elif not cfg.pretrained:
        p.error("--pretrained is required: a checkpoint of scripts/pretrain.py or an official MoCo one")
    if cfg.baseline == "untrained" and not cfg.arch:
        p.error(f"--baseline untrained needs --arch, one of {sorted(ARCHS)}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.workers < 0:
        p.error(f"--lr must be positive and -j/--workers >= 0, got {cfg.lr} and {cfg.workers}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world_size:
        p.error(f"-b/--batch-size {cfg.batch_size} (global) is not divisible by the {world_size} processes")
    return cfg


def baseline_backbone(cfg: LinclsConfig) -> tuple[nn.Module, int]:
    """Raw pixels (flattened) or a randomly initialised encoder, with its feature size."""
    size = data.image_spec(cfg.data, cfg.dataset, cfg.image_size)["image_size"]
    if cfg.baseline == "pixels":
        return nn.Flatten(), 3 * size * size
    torch.manual_seed(0)
    encoder = ARCHS[cfg.arch]()
    encoder.fc = nn.Identity()
    with torch.no_grad():
        dim = encoder.eval()(torch.zeros(2, 3, size, size)).shape[1]
    return encoder, dim


def sanity_check(backbone: nn.Module, reference: dict) -> None:
    """The official check: training the linear head must not have touched any backbone tensor."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k].cpu())]
    if changed:
        raise BackboneChanged(f"the frozen backbone changed during linear training: {changed[:10]}")


def new_head(feature_dim: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(feature_dim, num_classes)
    fc.weight.data.normal_(mean=0.0, std=0.01)
    fc.bias.data.zero_()
    return fc


def lr_at(cfg, epoch: int) -> float:
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.schedule)


@torch.no_grad()
def evaluate(backbone, fc, loader, device) -> dict:
    """Acc@1 and Acc@5 (in %) on a loader of images, or of cached features when backbone is None."""
    fc.eval()
    hits1 = hits5 = total = 0
    for batch in loader:
        x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
        feats = x if backbone is None else backbone(x)
        top = fc(feats.float()).topk(min(5, fc.out_features), dim=1).indices
        hits1 += (top[:, 0] == y).sum().item()
        hits5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    fc.train()
    return {"acc1": 100.0 * hits1 / total, "acc5": 100.0 * hits5 / total}


LINCLS_KEYS = ("fc", "optimizer", "epoch", "rng", "config")
LINCLS_WHAT = "a checkpoint of scripts/lincls.py"


def find_resume(cfg, say=print) -> tuple[str | None, dict | None]:
    """(path, checkpoint) to continue from: --resume PATH must load; --resume auto takes the newest of
    checkpoint.pth and checkpoint_prev.pth that loads (None: a fresh run) and says what it skipped."""
    if not cfg.resume:
        return None, None
    if cfg.resume != "auto":
        return cfg.resume, checkpoint.load_checkpoint(cfg.resume, LINCLS_KEYS, LINCLS_WHAT)
    paths = [os.path.join(cfg.output_dir, name) for name in ("checkpoint.pth", "checkpoint_prev.pth")]
    path, ck, skipped = checkpoint.newest_loadable(paths, LINCLS_KEYS, LINCLS_WHAT, position=_position)
    for _, why in skipped:
        say(f"--resume auto: skipped {why}")
    if path is None and skipped:
        raise checkpoint.CheckpointError(f"--resume auto: no checkpoint in {cfg.output_dir} loads (above)")
    return path, ck


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
    """The official schedule over `cfg.epochs`, from resume = (path, checkpoint) when given. Under a
    process group the head is DDP-wrapped (each process reads its shard); rank 0 logs and saves. A stop
    request ends the run after the current step with a checkpoint of it (Stopped)."""
    torch.manual_seed(cfg.seed)  # the head's initialisation, the same on every process
    fc = new_head(feature_dim, num_classes).to(device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    model = nn.parallel.DistributedDataParallel(fc) if distributed else fc
    opt = torch.optim.SGD(fc.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    bf16 = torch.device(device).type == "cuda"
    path, steps_per_epoch = os.path.join(cfg.output_dir, "checkpoint.pth"), len(train_loader)
    start, skip, best = _restore(fc, opt, *resume, log)
    save = lambda epoch, done, best: is_main and checkpoint.save_atomic(  # noqa: E731
        {"fc": fc.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step_in_epoch": done,
         "best": best, "rng": checkpoint.rng_state(), "config": cfg.to_dict()},
        path, keep_previous=os.path.join(cfg.output_dir, "checkpoint_prev.pth"))
    result = best
    for epoch in range(start, cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        _start_epoch(train_loader, epoch, skip)
        step, done = epoch * steps_per_epoch + skip, skip
        log.start_epoch(epoch, steps_per_epoch, skip)
        for batch in train_loader:
            x, y = batch[0].to(device, non_blocking=True), torch.as_tensor(batch[1]).to(device)
            with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
                feats = x if cached else backbone(x)
            loss = F.cross_entropy(model(feats.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, done = step + 1, done + 1
            log.advance()
            if stop is not None and stop.should_stop() and done < steps_per_epoch:
                _stop_mid_epoch(save, log, stop, epoch, done, step, best)
        log.end_epoch()
        skip = 0
        result = evaluate(None if cached else backbone, fc, val_loader, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the linear head's loss is {loss.item()} in epoch {epoch}")
        best = max(best, result, key=lambda r: r.get("acc1", -1)) if best else result
        log.record("lincls", step, {"epoch": epoch + 1, "loss": loss.item(), "lr": lr_at(cfg, epoch), **result})
        save(epoch + 1, 0, best)
        if stop is not None and stop.agreed:
            _stop_mid_epoch(save, log, stop, epoch + 1, 0, step, best, saved=True)
    return {"last": result, "best": best}


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


def run_lincls(cfg, backbone, feature_dim: int, device, rank: int = 0, world_size: int = 1) -> dict:
    """Linear evaluation as cfg says; returns {"last": {...}, "best": {...}} accuracies. Each of
    world_size processes trains on its shard of the data (batch_size is global)."""
    per_rank = cfg.batch_size // world_size
    train_loader, val_loader, num_classes = data.linear_loaders(
        data.locate(cfg.data, cfg.dataset), per_rank, cfg.workers, cfg.seed, augmented=not cfg.cached_features,
        distributed=world_size > 1, image_size=cfg.image_size)
    backbone, reference = frozen(backbone.to(device))
    resume = find_resume(cfg, print if rank == 0 else lambda *_: None)
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
