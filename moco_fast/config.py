"""The one configuration of both runs, pretraining (scripts/pretrain.py) and linear evaluation
(scripts/lincls.py): typed defaults (the official recipes), presets, the command line, the schedules.

The flags keep the official main_moco.py / main_lincls.py names (-a, -j, -b, --lr, --schedule, -p,
--resume, -e, --moco-k, ...); what is beyond the official has its own flags. Both scripts take the
same common flags (RunConfig); a config is resolved the same way for both: the dataclass defaults, then
the preset (the demo's when no data path is given), then the flags given. The resolved config is
printed at start and saved with every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional

from moco_fast.encoders import ARCHS


class ConfigError(ValueError):
    """A flag or a combination of flags that cannot work, found before any work starts."""


@dataclasses.dataclass
class RunConfig:
    """What both runs share; each subclass sets its own defaults."""
    data: Optional[str] = None          # None: the demo data set (Fashion-MNIST from Debian's package)
    preset: Optional[str] = None
    arch: Optional[str] = None
    dataset: str = "auto"               # auto | imagefolder | cifar10 | cifar100 | stl10 | mnist | fashion-mnist
    image_size: Optional[int] = None    # crop size; default per data set (224 ImageNet, 32 CIFAR, ...)
    epochs: int = 100
    batch_size: int = 256               # global, split over the processes
    lr: float = 0.03
    schedule: tuple = ()                # epochs at which lr drops 10x (without cos)
    cos: bool = False                   # half-cosine lr instead of the steps
    weight_decay: float = 0.0
    workers: int = 32
    print_freq: int = 10
    resume: str = ""                    # a checkpoint path, or "auto": the latest in output_dir
    seed: Optional[int] = None
    output_dir: str = "runs"
    max_steps: Optional[int] = None     # stop after this many optimizer steps (smoke runs, tests)
    device: str = "auto"                # auto | cuda | cpu

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "schedule": list(self.schedule)}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@dataclasses.dataclass
class Config(RunConfig):
    """Pretraining (main_moco.py's flags and defaults: the ImageNet recipe of MoCo v1)."""
    arch: str = "resnet50"
    epochs: int = 200
    schedule: tuple = (120, 160)
    weight_decay: float = 1e-4
    output_dir: str = "runs/moco"
    momentum: float = 0.9
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    mlp: bool = False
    aug_plus: bool = False
    # beyond the official
    crop_scale: Optional[float] = None  # RandomResizedCrop's smallest area fraction (None: the recipe's)
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
    knn_every: int = 0                  # kNN monitor every this many epochs (0: off)
    knn_k: int = 200
    knn_t: float = 0.1
    max_bad_images: int = 100           # stop past this many unreadable images
    gpu_aug: Optional[bool] = None      # decode and augment on the device (None: on when CUDA is available)
    cuda_graph: bool = False            # capture the whole step (forward, backward, SGD) in one CUDA graph


@dataclasses.dataclass
class LinclsConfig(RunConfig):
    """Linear evaluation (main_lincls.py's recipe: lr 30, steps at 60 and 80 of 100 epochs, no weight decay)."""
    lr: float = 30.0
    schedule: tuple = (60, 80)
    seed: Optional[int] = 0
    output_dir: str = "runs/lincls"
    pretrained: Optional[str] = None    # a pretrain.py checkpoint or an official MoCo release
    evaluate: bool = False              # -e: only evaluate the head of --resume on the validation split
    cached_features: bool = False
    baseline: Optional[str] = None      # "pixels" or "untrained": what the learned features must beat


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
    # (small_resnet_s2_p2 and augmentation as tensors in the training process: 3.8x the steps per second of
    # small_resnet with PIL workers; chosen on a held-out 10,000 of the training images, never the test set:
    # crops of at least 30% (79.1% kNN after 4 epochs against 77.8% with the CIFAR recipe's 8%), the 2x2
    # grid of the last map as the feature (81.0% against 79.1% after 4 epochs), 8 epochs (81.9% against
    # 81.6% after 6; raw pixels 81.5%); kNN every 2 epochs for the plot's curve)
    "demo": dict(arch="small_resnet_s2_p2", lr=0.06, batch_size=256, epochs=8, weight_decay=5e-4, moco_dim=128,
                 moco_k=4096, moco_m=0.99, moco_t=0.1, mlp=False, cos=True, bn_splits=4, workers=1,
                 compile=False, print_freq=20, knn_every=2, gpu_aug=True, crop_scale=0.3),
    # the same data on a GPU, long enough for the features to beat raw pixels
    "demo_gpu": dict(arch="cifar_resnet18", lr=0.06, batch_size=512, epochs=100, weight_decay=5e-4,
                     moco_k=4096, moco_m=0.99, moco_t=0.1, cos=True, bn_splits=8, workers=8, knn_every=20),
}

LINCLS_PRESETS = {
    "official": {},
    # small images (CIFAR, STL-10, Fashion-MNIST): the same schedule, small-image transforms (by data set)
    "small": dict(workers=8),
    # after the pretraining demo, on the CPU: cached features make 100 epochs take seconds
    "demo": dict(pretrained="runs/moco/checkpoint.pth", cached_features=True, workers=1, batch_size=256),
}


# the choices of the flags that name something, checked for configs built in Python too
DATASET_CHOICES = ["auto", "imagefolder", "cifar10", "cifar100", "stl10", "mnist", "fashion-mnist"]
AMP_CHOICES = ["auto", "bf16", "off"]
QUEUE_DTYPES = ["float32", "bfloat16"]
BACKENDS = ["auto", "reference", "cpu", "cuda", "triton"]
DEVICES = ["auto", "cuda", "cpu"]
BASELINES = ["pixels", "untrained"]


# ------------------------------------------------------------------------------------ schedules
def learning_rate(cfg: RunConfig, epoch: int) -> float:
    """The official schedule of both runs, set at the start of each epoch: half-cosine (--cos) or 10x
    steps at --schedule."""
    if cfg.cos:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * 0.1 ** sum(epoch >= milestone for milestone in cfg.schedule)


def ema_momentum(cfg: Config, step: int, total_steps: int) -> float:
    if not cfg.moco_m_cos:
        return cfg.moco_m
    return 1.0 - (1.0 - cfg.moco_m) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


# ---------------------------------------------------------------------------------- command line
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _str2bool(v: str) -> bool:
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


class _Parser(argparse.ArgumentParser):
    """argparse with boolean flags as users expect them: `--gpu-aug` alone turns it on, `--no-gpu-aug`
    off, and `--gpu-aug true|false` (or `--gpu-aug=false`) still works. argparse alone cannot have a flag
    with an optional value next to an optional positional data path (`--gpu-aug /data` would be read as
    the flag's value), so a value that is a boolean word is folded into the flag before parsing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.booleans: set[str] = set()
        self._negations: dict[str, str] = {}

    def add_bool(self, *names: str, help: str | None = None) -> None:
        """`names` (e.g. "-e", "--evaluate") set it, "--no-<long name>" clears it."""
        long = names[-1].removeprefix("--")
        self.booleans.update(names)
        self._negations.update({name: "--no-" + long for name in names})
        self.add_argument(*names, dest=long.replace("-", "_"), action="store_const", const=True, help=help)
        self.add_argument("--no-" + long, dest=long.replace("-", "_"), action="store_const", const=False,
                          help=argparse.SUPPRESS)

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(self._fold_booleans(argv), namespace)

    def _fold_booleans(self, argv: list[str]) -> list[str]:
        out, i = [], 0
        while i < len(argv):
            name, eq, value = argv[i].partition("=")
            if name in self.booleans and (eq or (i + 1 < len(argv) and argv[i + 1].lower() in _TRUE + _FALSE)):
                value = value if eq else argv[i + 1]
                try:
                    on = _str2bool(value)
                except argparse.ArgumentTypeError as err:
                    self.error(f"argument {name}: {err}")
                out.append(name if on else self._negations[name])
                i += 1 if eq else 2
                continue
            out.append(argv[i])
            i += 1
        return out


def _common_flags(p: _Parser, presets: dict) -> None:
    """The flags both scripts take, under the official names where there are some."""
    p.add_argument("data", nargs="?", default=None, help="data path; omitted: the Fashion-MNIST demo")
    p.add_argument("--preset", choices=sorted(presets), help="a recipe; explicit flags override it")
    p.add_argument("-a", "--arch", choices=sorted(ARCHS), metavar="ARCH", help=f"one of {', '.join(sorted(ARCHS))}")
    p.add_argument("--dataset", choices=DATASET_CHOICES)
    p.add_argument("--image-size", type=int, help="crop size (default: the data set's own, 224 for folders)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--start-epoch", type=int, help=argparse.SUPPRESS)  # refused with a pointer to --resume
    p.add_argument("-b", "--batch-size", type=int, help="global batch size, split over the processes")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float)
    p.add_argument("--schedule", type=int, nargs="*", help="epochs at which lr drops 10x (without --cos)")
    p.add_bool("--cos", help="half-cosine learning rate")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float)
    p.add_argument("-j", "--workers", type=int)
    p.add_argument("-p", "--print-freq", type=int, help="log the training metrics every this many steps")
    p.add_argument("--resume", help="checkpoint path, or 'auto' for the latest in --output-dir")
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--device", choices=DEVICES)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="MoCo pretraining (torchrun scripts/pretrain.py ...)")
    _common_flags(p, PRESETS)
    p.add_argument("--momentum", type=float)
    p.add_argument("--moco-dim", type=int)
    p.add_argument("--moco-k", type=int)
    p.add_argument("--moco-m", type=float)
    p.add_argument("--moco-t", type=float)
    p.add_bool("--mlp")
    p.add_bool("--aug-plus")
    p.add_argument("--crop-scale", type=float, help="RandomResizedCrop's smallest area fraction (default: the "
                   "recipe's, 0.2 for v1/v2, 0.08 for small images)")
    p.add_bool("--compile", help="torch.compile the model (--no-compile: eager)")
    p.add_argument("--amp", choices=AMP_CHOICES)
    p.add_bool("--channels-last")
    p.add_argument("--bn-splits", type=int)
    p.add_bool("--symmetric")
    p.add_argument("--queue-dtype", choices=QUEUE_DTYPES)
    p.add_bool("--moco-m-cos")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--checkpoint-minutes", type=float)
    p.add_argument("--save-every", type=int)
    p.add_argument("--knn-every", type=int)
    p.add_argument("--knn-k", type=int)
    p.add_argument("--knn-t", type=float)
    p.add_argument("--max-bad-images", type=int)
    p.add_bool("--gpu-aug", help="decode JPEGs and augment on the device (default: on when CUDA is available; "
               "--no-gpu-aug or --gpu-aug false: PIL workers)")
    p.add_bool("--cuda-graph", help="replay the whole training step as one CUDA graph (CUDA only)")
    return p


def build_lincls_parser() -> argparse.ArgumentParser:
    p = _Parser(description="linear classification on frozen MoCo features")
    _common_flags(p, LINCLS_PRESETS)
    p.add_argument("--pretrained", help="checkpoint of scripts/pretrain.py or an official MoCo release")
    p.add_bool("-e", "--evaluate", help="only evaluate the linear head of --resume on the validation split")
    p.add_bool("--cached-features", help="extract the frozen features once and train the head on them")
    p.add_argument("--baseline", choices=BASELINES,
                   help="instead of --pretrained: raw pixels, or the --arch encoder at its random init")
    return p


def _resolve(cls, presets: dict, parser: argparse.ArgumentParser, argv) -> RunConfig:
    """Defaults, then the preset (the demo's when no data is given), then the flags given. A bad value or
    combination is argparse's error (usage, the valid choices, exit 2) before anything is read or built."""
    args = vars(parser.parse_args(argv))
    if args.pop("start_epoch", None) is not None:
        parser.error("--start-epoch is not supported: a stopped run continues where it stopped with "
                     "--resume PATH or --resume auto (the epoch and step come from the checkpoint)")
    preset = args.get("preset") or (None if args.get("data") else "demo")
    values = {**presets.get(preset, {}), **{k: v for k, v in args.items() if v is not None}, "preset": preset}
    if "schedule" in values:
        values["schedule"] = tuple(values["schedule"])
    cfg = cls(**values)
    try:
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        parser.error(str(err))
    return cfg


def parse_config(argv=None) -> Config:
    """The pretraining config of a command line (scripts/pretrain.py)."""
    return _resolve(Config, PRESETS, build_parser(), argv)


def parse_lincls_config(argv=None) -> LinclsConfig:
    """The linear-evaluation config of a command line (scripts/lincls.py)."""
    cfg = _resolve(LinclsConfig, LINCLS_PRESETS, build_lincls_parser(), argv)
    if cfg.baseline:
        cfg.pretrained = None
    return cfg


# ---------------------------------------------------------------------------------- validation
_NAMED = {"arch": sorted(ARCHS), "dataset": DATASET_CHOICES, "device": DEVICES}
_NAMED_PRETRAIN = {"amp": AMP_CHOICES, "queue_dtype": QUEUE_DTYPES, "backend": BACKENDS}


def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Every problem of the config alone (names, ranges, sizes that cannot divide), in one ConfigError."""
    named = {**_NAMED, **(_NAMED_PRETRAIN if isinstance(cfg, Config) else {})}
    problems = [f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of {choices}"
                for name, choices in named.items()
                if getattr(cfg, name) not in choices and not (name == "arch" and cfg.arch is None)]
    problems += _range_problems(cfg, ("epochs", "batch_size", "print_freq"), ("workers",))
    if cfg.image_size is not None and cfg.image_size < 8:
        problems.append(f"--image-size must be >= 8 (pixels), got {cfg.image_size}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        problems.append(f"--max-steps must be >= 0, got {cfg.max_steps}")
    problems += _pretrain_problems(cfg) if isinstance(cfg, Config) else _lincls_problems(cfg)
    problems += _batch_problems(cfg, world_size)
    if problems:
        raise ConfigError("bad configuration: " + "; ".join(problems))


def _range_problems(cfg: RunConfig, positive: tuple, non_negative: tuple) -> list[str]:
    problems = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}"
                for name in positive if getattr(cfg, name) < 1]
    return problems + [f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}"
                       for name in non_negative if getattr(cfg, name) < 0]


def _pretrain_problems(cfg: Config) -> list[str]:
    problems = _range_problems(cfg, ("moco_dim", "moco_k", "bn_splits", "knn_k"),
                               ("save_every", "knn_every", "max_bad_images", "checkpoint_minutes"))
    if cfg.crop_scale is not None and not 0.0 < cfg.crop_scale <= 1.0:
        problems.append(f"--crop-scale must be in (0, 1], got {cfg.crop_scale}")
    if not 0.0 <= cfg.moco_m <= 1.0:
        problems.append(f"--moco-m must be in [0, 1], got {cfg.moco_m}")
    if cfg.moco_t <= 0 or cfg.lr <= 0:
        problems.append(f"--moco-t and --lr must be positive, got {cfg.moco_t} and {cfg.lr}")
    if cfg.cuda_graph and cfg.device == "cpu":
        problems.append("--cuda-graph needs a CUDA device, and --device cpu was given")
    return problems


def _lincls_problems(cfg: LinclsConfig) -> list[str]:
    problems = [] if cfg.lr > 0 else [f"--lr must be positive, got {cfg.lr}"]
    if cfg.baseline is not None and cfg.baseline not in BASELINES:
        problems.append(f"--baseline {cfg.baseline!r} is not one of {BASELINES}")
    if not cfg.baseline and not cfg.pretrained:
        problems.append("--pretrained is required: a checkpoint of scripts/pretrain.py or an official MoCo one")
    if cfg.baseline == "untrained" and not cfg.arch:
        problems.append(f"--baseline untrained needs --arch, one of {sorted(ARCHS)}")
    if cfg.evaluate and not cfg.resume:
        problems.append("-e/--evaluate needs --resume: a checkpoint of scripts/lincls.py (PATH or auto) "
                        "whose linear head it evaluates")
    return problems


def _batch_problems(cfg: RunConfig, world_size: int) -> list[str]:
    splits = getattr(cfg, "bn_splits", 1)
    if cfg.batch_size < 1 or splits < 1:
        return []
    if cfg.batch_size % world_size:
        return [f"--batch-size {cfg.batch_size} (global) is not divisible by the {world_size} processes; "
                f"choose a multiple of {world_size}"]
    per_rank = cfg.batch_size // world_size
    if per_rank % splits:
        return [f"--bn-splits {splits} does not divide the batch of {per_rank} per process "
                f"(--batch-size {cfg.batch_size} over {world_size} process(es))"]
    return []


def check_data_fits(cfg: Config, images: int, world_size: int) -> None:
    """The data set against the config, once its size is known (its files listed, none read)."""
    if images < cfg.batch_size:
        source = f"preset {cfg.preset}" if cfg.preset else "the defaults"
        raise ConfigError(f"the data set {cfg.data or '(the demo data)'} has {images} training images, fewer than "
                          f"one batch of --batch-size {cfg.batch_size} (from the flags or {source}); "
                          f"choose --batch-size between {world_size} and {images - images % world_size}")
