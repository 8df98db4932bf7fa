"""The run configuration: typed defaults (the official ImageNet recipe), presets, and the command line.

The flags keep the official main_moco.py names (-a, -j, -b, --lr, --schedule, --moco-k, ...); what is
beyond the official has its own flags. The resolved config is printed at start and saved with every
checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

from moco_fast.encoders import ARCHS


class ConfigError(ValueError):
    """A flag or a combination of flags that cannot work, found before any work starts."""


@dataclasses.dataclass
class Config:
    # official main_moco.py flags and defaults
    data: Optional[str] = None          # None: the demo data set (Fashion-MNIST from Debian's package)
    arch: str = "resnet50"
    workers: int = 32
    epochs: int = 200
    start_epoch: int = 0
    batch_size: int = 256               # global, split over the processes
    lr: float = 0.03
    schedule: tuple = (120, 160)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    print_freq: int = 10
    resume: str = ""                    # a checkpoint path, or "auto": the latest in output_dir
    seed: Optional[int] = None
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug_plus: bool = False
    cos: bool = False
    # beyond the official
    preset: Optional[str] = None
    image_size: Optional[int] = None    # crop size; default per data set (224 ImageNet, 32 CIFAR, ...)
    crop_scale: Optional[float] = None  # RandomResizedCrop's smallest area fraction (None: the recipe's)
    dataset: str = "auto"               # auto | imagefolder | cifar10 | cifar100 | stl10 | mnist | fashion-mnist
    output_dir: str = "runs/moco"
    max_steps: Optional[int] = None     # stop after this many optimizer steps (smoke runs, tests)
    compile: bool = True
    amp: str = "auto"                   # auto (bf16 on CUDA, off on CPU) | bf16 | off
    channels_last: bool = True
    bn_splits: int = 1                  # split BatchNorm in one process (the official CIFAR demo uses 8)
    symmetric: bool = False
    queue_dtype: str = "float32"        # or bfloat16
    moco_m_cos: bool = False            # momentum rises from moco_m to 1 along a half cosine
    backend: str = "auto"               # op backends: auto | reference | cpu | cuda | triton
    checkpoint_minutes: float = 10.0    # also checkpoint mid-epoch this often
    save_every: int = 0                 # keep checkpoint_epoch<E>.pth every this many epochs (0: never)
    knn_every: int = 0                  # kNN monitor every this many epochs (0: only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    max_bad_images: int = 100           # stop past this many unreadable images
    device: str = "auto"                # auto | cuda | cpu
    gpu_aug: Optional[bool] = None      # decode and augment on the device (None: on when CUDA is available)
    cuda_graph: bool = False            # capture the whole step (forward, backward, SGD) in one CUDA graph

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule"] = list(self.schedule)
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


PRESETS = {
    # MoCo v1 (He et al. 2019), ImageNet, 8 GPUs
    "moco_v1": dict(arch="resnet50", lr=0.03, batch_size=256, epochs=200, moco_t=0.07, mlp=False,
                    aug_plus=False, cos=False),
    # MoCo v2 (Chen et al. 2020): MLP head, stronger augmentation, cosine schedule, T=0.2
    "moco_v2": dict(arch="resnet50", lr=0.03, batch_size=256, epochs=200, moco_t=0.2, mlp=True,
                    aug_plus=True, cos=True),
    # the official CIFAR-10 demo (one GPU, split BatchNorm for shuffle BN)
    "cifar": dict(arch="cifar_resnet18", lr=0.06, batch_size=512, epochs=200, weight_decay=5e-4,
                  moco_k=4096, moco_m=0.99, moco_t=0.1, mlp=False, aug_plus=False, cos=True, bn_splits=8,
                  workers=8, knn_every=10),
    # Fashion-MNIST on a laptop-class CPU in under 10 minutes
    # (small_resnet_s2 and augmentation as tensors in the training process: 3.8x the steps per second of
    # small_resnet with PIL workers; crops of at least 30% of the image: chosen on a held-out 10,000 of
    # the training images, 79.1% kNN after 4 epochs against 77.8% with the CIFAR recipe's 8%; 80.8% after 6)
    "demo": dict(arch="small_resnet_s2", lr=0.06, batch_size=256, epochs=6, weight_decay=5e-4, moco_dim=128,
                 moco_k=4096, moco_m=0.99, moco_t=0.1, mlp=False, cos=True, bn_splits=4, workers=1,
                 compile=False, print_freq=20, knn_every=6, gpu_aug=True, crop_scale=0.3),
    # the same data on a GPU, long enough for the features to beat raw pixels
    "demo_gpu": dict(arch="cifar_resnet18", lr=0.06, batch_size=512, epochs=100, weight_decay=5e-4,
                     moco_k=4096, moco_m=0.99, moco_t=0.1, cos=True, bn_splits=8, workers=8, knn_every=20),
}


# the choices of the flags that name something, checked for configs built in Python too
DATASET_CHOICES = ["auto", "imagefolder", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist"]
AMP_CHOICES = ["auto", "bf16", "off"]
QUEUE_DTYPES = ["float32", "bfloat16"]
BACKENDS = ["auto", "reference", "cpu", "cuda", "triton"]
DEVICES = ["auto", "cuda", "cpu"]


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoCo pretraining (torchrun scripts/pretrain.py ...)")
    p.add_argument("data", nargs="?", default=None, help="data path; omitted: the Fashion-MNIST demo")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a recipe; explicit flags override it")
    p.add_argument("-a", "--arch", choices=sorted(ARCHS), metavar="ARCH", help=f"one of {', '.join(sorted(ARCHS))}")
    p.add_argument("-j", "--workers", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--start-epoch", type=int)
    p.add_argument("-b", "--batch-size", type=int, help="global batch size, split over the processes")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float)
    p.add_argument("--schedule", type=int, nargs="*", help="epochs at which lr drops 10x (without --cos)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float)
    p.add_argument("-p", "--print-freq", type=int)
    p.add_argument("--resume", help="checkpoint path, or 'auto' for the latest in --output-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--moco-dim", type=int)
    p.add_argument("--moco-k", type=int)
    p.add_argument("--moco-m", type=float)
    p.add_argument("--moco-t", type=float)
    p.add_argument("--mlp", action="store_const", const=True)
    p.add_argument("--aug-plus", action="store_const", const=True)
    p.add_argument("--cos", action="store_const", const=True)
    p.add_argument("--dataset", choices=DATASET_CHOICES)
    p.add_argument("--image-size", type=int, help="crop size (default: the data set's own, 224 for folders)")
    p.add_argument("--crop-scale", type=float, help="RandomResizedCrop's smallest area fraction (default: the "
                   "recipe's, 0.2 for v1/v2, 0.08 for small images)")
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--compile", type=_str2bool, metavar="BOOL")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    p.add_argument("--amp", choices=AMP_CHOICES)
    p.add_argument("--channels-last", type=_str2bool, metavar="BOOL")
    p.add_argument("--bn-splits", type=int)
    p.add_argument("--symmetric", action="store_const", const=True)
    p.add_argument("--queue-dtype", choices=QUEUE_DTYPES)
    p.add_argument("--moco-m-cos", action="store_const", const=True)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--checkpoint-minutes", type=float)
    p.add_argument("--save-every", type=int)
    p.add_argument("--knn-every", type=int)
    p.add_argument("--knn-k", type=int)
    p.add_argument("--knn-t", type=float)
    p.add_argument("--max-bad-images", type=int)
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--gpu-aug", type=_str2bool, metavar="BOOL",
                   help="decode JPEGs and augment on the device (default: on when CUDA is available)")
    p.add_argument("--cuda-graph", action="store_const", const=True,
                   help="replay the whole training step as one CUDA graph (CUDA only)")
    return p


def parse_config(argv=None) -> Config:
    """Defaults, then the preset (the demo's when no data is given), then the flags given. A bad value or
    combination is argparse's error (usage, the valid choices, exit 2) before anything is read or built."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    preset = args.get("preset") or (None if args.get("data") else "demo")
    values = dict(PRESETS.get(preset, {}))
    values.update({k: v for k, v in args.items() if v is not None})
    values["preset"] = preset
    if "schedule" in values:
        values["schedule"] = tuple(values["schedule"])
    cfg = Config(**values)
    try:
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        parser.error(str(err))
    return cfg


_NAMED = {"arch": sorted(ARCHS), "dataset": DATASET_CHOICES, "amp": AMP_CHOICES, "queue_dtype": QUEUE_DTYPES,
          "backend": BACKENDS, "device": DEVICES}


def validate(cfg: Config, world_size: int = 1) -> None:
    """Every problem of the config alone (names, ranges, sizes that cannot divide), in one ConfigError."""
    problems = [f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of {choices}"
                for name, choices in _NAMED.items() if getattr(cfg, name) not in choices]
    for name in ("epochs", "batch_size", "moco_dim", "moco_k", "print_freq", "bn_splits", "knn_k"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("workers", "save_every", "knn_every", "max_bad_images", "checkpoint_minutes"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.crop_scale is not None and not 0.0 < cfg.crop_scale <= 1.0:
        problems.append(f"--crop-scale must be in (0, 1], got {cfg.crop_scale}")
    if cfg.image_size is not None and cfg.image_size < 8:
        problems.append(f"--image-size must be >= 8 (pixels), got {cfg.image_size}")
    if not 0.0 <= cfg.moco_m <= 1.0:
        problems.append(f"--moco-m must be in [0, 1], got {cfg.moco_m}")
    if cfg.moco_t <= 0 or cfg.lr <= 0:
        problems.append(f"--moco-t and --lr must be positive, got {cfg.moco_t} and {cfg.lr}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        problems.append(f"--max-steps must be >= 0, got {cfg.max_steps}")
    if cfg.cuda_graph and cfg.device == "cpu":
        problems.append("--cuda-graph needs a CUDA device, and --device cpu was given")
    problems += _batch_problems(cfg, world_size)
    if problems:
        raise ConfigError("bad configuration: " + "; ".join(problems))


def _batch_problems(cfg: Config, world_size: int) -> list[str]:
    if cfg.batch_size < 1 or cfg.bn_splits < 1:
        return []
    if cfg.batch_size % world_size:
        return [f"--batch-size {cfg.batch_size} (global) is not divisible by the {world_size} processes; "
                f"choose a multiple of {world_size}"]
    per_rank = cfg.batch_size // world_size
    if per_rank % cfg.bn_splits:
        return [f"--bn-splits {cfg.bn_splits} does not divide the batch of {per_rank} per process "
                f"(--batch-size {cfg.batch_size} over {world_size} process(es))"]
    return []


def check_data_fits(cfg: Config, images: int, world_size: int) -> None:
    """The data set against the config, once its size is known (its files listed, none read)."""
    if images < cfg.batch_size:
        source = f"preset {cfg.preset}" if cfg.preset else "the defaults"
        raise ConfigError(f"the data set {cfg.data or '(the demo data)'} has {images} training images, fewer than "
                          f"one batch of --batch-size {cfg.batch_size} (from the flags or {source}); "
                          f"choose --batch-size between {world_size} and {images - images % world_size}")
