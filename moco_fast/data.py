"""Data: the official MoCo augmentations, datasets found from their on-disk layout, and loaders.

Augmentations follow facebookresearch/moco (main_moco.py, moco/loader.py) and, for small images,
the official CIFAR-10 demo. Datasets are torchvision's own classes on torchvision's own on-disk
formats (never downloaded). Every dataset here returns `(sample, target, skipped)`: `skipped` names
the image files that could not be read and were replaced for that item, so the count reaches the
main process even when loading runs in worker processes.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import random
import shutil
import tempfile
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler
from torch.utils.data import default_collate
from torchvision import datasets, transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The official CIFAR demo's values (its std is the often-copied 0.2023/0.1994/0.2010, not the
# per-pixel 0.2470/0.2435/0.2616); kept so demo results stay comparable.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# Grayscale sets are fed as 3 equal channels, so their statistics repeat over the channels.
MNIST_MEAN, MNIST_STD = (0.1307,) * 3, (0.3081,) * 3
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,) * 3, (0.3530,) * 3


class DatasetInfo(NamedTuple):
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    small: bool  # the CIFAR demo's augmentation and no resize at evaluation


# STL-10 images are cut from ImageNet, hence ImageNet's statistics.
DATASETS = {
    "imagefolder": DatasetInfo(IMAGENET_MEAN, IMAGENET_STD, 224, False),
    "cifar10": DatasetInfo(CIFAR10_MEAN, CIFAR10_STD, 32, True),
    "cifar100": DatasetInfo(CIFAR100_MEAN, CIFAR100_STD, 32, True),
    "stl10": DatasetInfo(IMAGENET_MEAN, IMAGENET_STD, 96, True),
    "mnist": DatasetInfo(MNIST_MEAN, MNIST_STD, 28, True),
    "fashion-mnist": DatasetInfo(FASHION_MNIST_MEAN, FASHION_MNIST_STD, 28, True),
}

DEMO_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# torchvision's folder name for each dataset under the root it is given.
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "stl10": "stl10_binary",
            "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_LAYOUTS = """accepted layouts:
  DATA/train/<class>/<image> [+ DATA/val/<class>/<image>]   ImageNet-style folders
  DATA/<class>/<image>                                      class folders, train split only
  DATA/cifar-10-batches-py, DATA/cifar-100-python           torchvision's CIFAR pickles
  DATA/stl10_binary                                         torchvision's STL-10 binaries
  DATA/MNIST/raw, DATA/FashionMNIST/raw                     torchvision's (Fashion-)MNIST idx files
  DATA/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz      the 4 Fashion-MNIST .gz files"""
# What PIL raises on a corrupt or truncated file (UnidentifiedImageError and truncation are OSErrors).
_LOAD_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The data cannot be used as given; the message names the path and what was expected."""


class GaussianBlur:
    """Gaussian blur augmentation in SimCLR https://arxiv.org/abs/2002.05709 (official moco/loader.py)."""

    def __init__(self, sigma: Sequence[float] = (.1, 2.)):
        self.sigma = list(sigma)

    def __call__(self, x: Image.Image) -> Image.Image:
        # Python's random, as the official: make_loader seeds it per worker.
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


class TwoCropsTransform:
    """Take two random crops of one image as the query and key."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x) -> list:
        return [self.base_transform(x), self.base_transform(x)]


def moco_augmentation(aug_plus: bool, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, small: bool = False,
                      crop_scale: float | None = None) -> transforms.Compose:
    """The official pretraining augmentation: v1 (InstDisc's), v2 (`aug_plus`, SimCLR-like), or `small`.

    `small` is the official CIFAR-10 demo's recipe (default crop scale, no blur) for 32-96 px images;
    the demo has a single recipe, so `aug_plus` does not change it.
    """
    normalize = transforms.Normalize(mean=mean, std=std)
    scale = (0.08 if small else 0.2, 1.0) if crop_scale is None else (crop_scale, 1.0)  # --crop-scale
    if small:
        # The demo's order: the flip comes before the colour ops (they commute).
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=scale),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.ToTensor(),
            normalize])
    if aug_plus:  # MoCo v2
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=scale),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # not strengthened
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur([.1, 2.])], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize])
    return transforms.Compose([  # MoCo v1
        transforms.RandomResizedCrop(image_size, scale=scale),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize])


def eval_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, small: bool = False) -> transforms.Compose:
    """Deterministic transform for kNN banks and linear evaluation (official main_lincls.py val)."""
    normalize = transforms.Normalize(mean=mean, std=std)
    if small:  # the demo feeds small images whole
        return transforms.Compose([transforms.ToTensor(), normalize])
    return transforms.Compose([
        transforms.Resize(round(image_size * 256 / 224)),  # 256 for 224, the official ratio
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize])


class _Source(NamedTuple):
    kind: str  # a key of DATASETS
    root: pathlib.Path  # what torchvision's class is given (the .gz folder when gz)
    gz: bool = False  # compressed (Fashion-)MNIST that must be unpacked first


def _has_gz(folder: pathlib.Path) -> bool:
    return all((folder / f"{name}.gz").is_file() for name in _IDX_FILES)


def find_fashion_mnist() -> pathlib.Path | None:
    """Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist), or None when absent."""
    return DEMO_DIR if _has_gz(DEMO_DIR) else None


def _find_root(kind: str, path: pathlib.Path, auto: bool) -> _Source | None:
    if kind == "imagefolder":
        has_dirs = any(p.is_dir() for p in path.iterdir())
        return _Source(kind, path) if has_dirs else None
    folder = _FOLDERS[kind]
    inner = f"{folder}/raw" if kind in ("mnist", "fashion-mnist") else folder
    if (path / inner).is_dir():
        return _Source(kind, path)
    if path.name == folder and (path.parent / inner).is_dir():  # DATA is that folder itself
        return _Source(kind, path.parent)
    # MNIST and Fashion-MNIST .gz files share their names: auto-detection reads them as the demo's.
    if _has_gz(path) and (kind == "fashion-mnist" or (kind == "mnist" and not auto)):
        return _Source(kind, path, gz=True)
    return None


def _locate(data: str | os.PathLike | None, dataset: str) -> _Source:
    if dataset != "auto" and dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: expected 'auto' or one of {sorted(DATASETS)}")
    if data is None:
        if dataset not in ("auto", "fashion-mnist"):
            raise DataError(f"dataset {dataset!r} needs a data path (only the Fashion-MNIST demo has a default)")
        found = find_fashion_mnist()
        if found is None:
            raise DataError(
                f"the demo dataset (Fashion-MNIST) is not in {DEMO_DIR}: install it with "
                "`sudo apt-get install dataset-fashion-mnist`, or pass a data path instead")
        return _Source("fashion-mnist", found, gz=True)
    path = pathlib.Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_dir():
        raise DataError(f"data path {path} is not a folder\n{_LAYOUTS}")
    for kind in [dataset] if dataset != "auto" else list(DATASETS)[1:] + ["imagefolder"]:
        found = _find_root(kind, path, auto=dataset == "auto")
        if found is not None:
            return found
    if not any(path.iterdir()):
        raise DataError(f"data folder {path} is empty\n{_LAYOUTS}")
    what = f"{dataset} data" if dataset != "auto" else "recognised dataset layout"
    raise DataError(f"no {what} in {path}\n{_LAYOUTS}")


def detect_dataset(data: str | os.PathLike | None, dataset: str = "auto") -> str:
    """The dataset kind (a key of DATASETS) that `build_dataset` will load from `data`."""
    return _locate(data, dataset).kind


def image_spec(data: str | os.PathLike | None, dataset: str = "auto", image_size: int | None = None) -> dict:
    """Keyword arguments for moco_augmentation / eval_transform: the data set's DatasetInfo as a dict,
    with image_size replaced when one is given."""
    spec = DATASETS[detect_dataset(data, dataset)]._asdict()
    return {**spec, "image_size": image_size} if image_size else spec


def _has_split(src: _Source, split: str) -> bool:
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if split == "val" and src.kind == "imagefolder":
        return (src.root / "train").is_dir() and (src.root / "val").is_dir()
    return True  # torchvision's formats always hold their test split


def has_split(data: str | os.PathLike | None, split: str, dataset: str = "auto") -> bool:
    """Whether `data` holds `split` ("train" or "val"); raises DataError when `data` is unusable."""
    return _has_split(_locate(data, dataset), split)


def _unpack_idx(src: pathlib.Path, folder: str) -> pathlib.Path:
    """Decompress the 4 idx .gz files into <cache>/idx-<key>/<folder>/raw once; returns that root.

    torchvision reads only uncompressed idx files. The key hashes the source path and its files'
    sizes and times, so changed sources get a fresh folder. Each file is written to a temporary
    name and renamed, so concurrent ranks or an interrupted run never leave a half-written file.
    """
    cache = pathlib.Path(os.environ.get("MOCO_FAST_CACHE") or "~/.cache/moco_fast").expanduser()
    key = hashlib.sha1(str(src.resolve()).encode())
    try:
        for name in _IDX_FILES:
            st = (src / f"{name}.gz").stat()
            key.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        root = cache / f"idx-{key.hexdigest()[:12]}"
        raw = root / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in _IDX_FILES:
            gz, out = src / f"{name}.gz", raw / name
            if out.is_file():
                continue
            fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f, gzip.open(gz, "rb") as g:
                    shutil.copyfileobj(g, f, 1 << 20)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as e:  # gzip.BadGzipFile is an OSError too
        raise DataError(f"cannot unpack the idx files of {src} into {cache} (set MOCO_FAST_CACHE "
                        f"to move the cache): {e}") from e
    return root


class _ImageFolder(datasets.ImageFolder):
    """ImageFolder whose class indices are given (the train split's), so val targets match train's."""

    def __init__(self, root: pathlib.Path, class_to_idx: dict[str, int]):
        self._given = class_to_idx
        super().__init__(str(root), allow_empty=True)  # emptiness is checked as a whole below

    def find_classes(self, directory):
        return list(self._given), self._given


def _image_folder(root: pathlib.Path, split: str) -> datasets.ImageFolder:
    split_layout = (root / "train").is_dir()
    folder = root / split if split_layout else root
    try:
        _, class_to_idx = datasets.folder.find_classes(root / "train" if split_layout else root)
        own, _ = datasets.folder.find_classes(folder)
    except FileNotFoundError:
        raise DataError(f"no class folders in {folder}: expected {folder}/<class>/<image>") from None
    unknown = sorted(set(own) - set(class_to_idx))
    if unknown:
        raise DataError(f"class folders {unknown[:10]} of {folder} are not in {root / 'train'}")
    base = _ImageFolder(folder, class_to_idx)
    if not base.samples:
        raise DataError(f"no images in {folder}/<class>/: expected files ending in "
                        f"{', '.join(datasets.folder.IMG_EXTENSIONS)}")
    return base


def _torchvision_dataset(src: _Source, split: str, labelled: bool) -> Dataset:
    train = split == "train"
    root = _unpack_idx(src.root, _FOLDERS[src.kind]) if src.gz else src.root
    try:
        if src.kind in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if src.kind == "cifar10" else datasets.CIFAR100
            return cls(str(root), train=train, download=False)
        if src.kind == "stl10":
            # Pretraining uses the 100k unlabelled images as well; a kNN bank needs labels.
            stl_split = ("train" if labelled else "train+unlabeled") if train else "test"
            return datasets.STL10(str(root), split=stl_split, download=False)
        cls = datasets.MNIST if src.kind == "mnist" else datasets.FashionMNIST
        return cls(str(root), train=train, download=False)
    except (RuntimeError, OSError, ValueError) as e:  # torchvision: missing, corrupt or md5 mismatch
        raise DataError(f"torchvision could not load {src.kind} from {root / _FOLDERS[src.kind]}: {e}") from e


class MocoDataset(Dataset):
    """A torchvision dataset as `(transform(rgb image), target, skipped)` items.

    Unreadable image files are replaced by the next readable index (wrapping around) and named in
    `skipped`; more than `max_tries` unreadable files in a row raise DataError.
    """

    def __init__(self, base: Dataset, transform=None, max_tries: int = 101):
        self.base, self.transform = base, transform
        self.max_tries = max(1, min(max_tries, len(base)))
        self.classes = list(base.classes) if getattr(base, "classes", None) is not None else None
        self._files = isinstance(base, datasets.DatasetFolder)

    def __len__(self) -> int:
        return len(self.base)

    def _load_file(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        skipped = []
        for step in range(self.max_tries):
            path, target = self.base.samples[(index + step) % len(self)]
            try:
                return self.base.loader(path), target, tuple(skipped)
            except _LOAD_ERRORS:
                skipped.append(path)
        raise DataError(f"{len(skipped)} unreadable images in a row from index {index}, e.g. {skipped[:5]}")

    def __getitem__(self, index: int) -> tuple[Any, Any, tuple[str, ...]]:
        if self._files:
            img, target, skipped = self._load_file(index)
        else:  # in-memory arrays: nothing can fail to load
            (img, target), skipped = self.base[index], ()
        if img.mode != "RGB":  # (Fashion-)MNIST: 3 equal channels for 3-channel encoders
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, target, skipped


def build_dataset(data: str | os.PathLike | None, split: str, transform, dataset: str = "auto",
                  max_bad: int = 100, labelled: bool = False) -> MocoDataset:
    """The `split` ("train" or "val") of the dataset at `data` (None: the Fashion-MNIST demo).

    `dataset` forces a kind instead of detecting it from the layout. `labelled` asks STL-10 for its
    labelled train images only (a kNN bank) instead of train+unlabeled (pretraining). An item tries
    at most max_bad + 1 files, since a SkipCounter(max_bad) would stop the run past that anyway.
    Raises DataError before loading anything when the data is missing, unrecognised or lacks `split`.
    """
    src = _locate(data, dataset)
    if not _has_split(src, split):
        raise DataError(f"{src.root} has no {split} split: expected {src.root / split}/<class>/<image> "
                        f"next to {src.root / 'train'}/<class>/<image>")
    if src.kind == "imagefolder":
        base = _image_folder(src.root, split)
    else:
        base = _torchvision_dataset(src, split, labelled)
    return MocoDataset(base, transform, max_tries=max_bad + 1)


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


class EpochRandomSampler(Sampler[int]):
    """A random permutation that is a pure function of (seed, epoch), as DistributedSampler's.

    Regenerated from seed + epoch on every iteration, so a resumed run replays the same order.
    """

    def __init__(self, data_source: Dataset, seed: int = 0):
        self.n, self.seed, self.epoch = len(data_source), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def _seed_worker(worker_id: int) -> None:
    # GaussianBlur draws from Python's random; forked workers would otherwise share one state.
    # (Recent PyTorch does this itself; kept explicit so the augmentation never depends on it.)
    seed = torch.initial_seed() % 2**32  # base seed + worker id, set by the DataLoader
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, drop_last: bool,
                seed: int = 0, distributed: bool = False, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader of (samples, targets, skipped paths) batches whose sampler has set_epoch(epoch).

    distributed: each rank of torch.distributed's group reads its shard through a DistributedSampler.
    """
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = EpochRandomSampler(dataset, seed)
    else:
        sampler = SequentialSampler(dataset)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_with_skipped, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker)
