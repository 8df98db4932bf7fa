"""Datasets found from their on-disk layout, the idx cache, and the dataset every pipeline reads.

    source = locate(path, dataset)                    # the one search of the disk: kind, root, splits
    train = build_dataset(source, "train", transform)  # (sample, target, skipped) items

Datasets are torchvision's own classes on torchvision's own on-disk formats (never downloaded).
Every dataset here returns `(sample, target, skipped)`: `skipped` names the image files that could
not be read and were replaced for that item, so the count reaches the main process even when
loading runs in worker processes. The device pipeline reads the same dataset's file list
(`MocoDataset.files`) or its in-memory arrays (`in_memory_images`).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from moco_fast.checkpoint import atomic_file

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
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
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
LOAD_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """The data cannot be used as given; the message names the path and what was expected."""


class Source(NamedTuple):
    """A data set located on disk (by `locate`): what every builder below takes instead of searching again."""
    kind: str  # a key of DATASETS
    root: pathlib.Path  # what torchvision's class is given (the .gz folder when gz)
    gz: bool = False  # compressed (Fashion-)MNIST that must be unpacked first

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.kind]

    def spec(self, image_size: int | None = None) -> dict:
        """Keyword arguments for the augmentations and eval_transform: the DatasetInfo as a dict, with
        image_size replaced when one is given."""
        spec = self.info._asdict()
        return {**spec, "image_size": image_size} if image_size else spec

    def has_split(self, split: str) -> bool:
        """Whether this data holds `split` ("train" or "val")."""
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if split == "val" and self.kind == "imagefolder":
            return (self.root / "train").is_dir() and (self.root / "val").is_dir()
        return True  # torchvision's formats always hold their test split


def _has_gz(folder: pathlib.Path) -> bool:
    return all((folder / f"{name}.gz").is_file() for name in IDX_FILES)


def find_fashion_mnist() -> pathlib.Path | None:
    """Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist), or None when absent."""
    return DEMO_DIR if _has_gz(DEMO_DIR) else None


def _find_root(kind: str, path: pathlib.Path, auto: bool) -> Source | None:
    if kind == "imagefolder":
        has_dirs = any(p.is_dir() for p in path.iterdir())
        return Source(kind, path) if has_dirs else None
    folder = _FOLDERS[kind]
    inner = f"{folder}/raw" if kind in ("mnist", "fashion-mnist") else folder
    if (path / inner).is_dir():
        return Source(kind, path)
    if path.name == folder and (path.parent / inner).is_dir():  # DATA is that folder itself
        return Source(kind, path.parent)
    # MNIST and Fashion-MNIST .gz files share their names: auto-detection reads them as the demo's.
    if _has_gz(path) and (kind == "fashion-mnist" or (kind == "mnist" and not auto)):
        return Source(kind, path, gz=True)
    return None


def locate(data: str | os.PathLike | Source | None, dataset: str = "auto") -> Source:
    """Where the data set at `data` (None: the Fashion-MNIST demo) lies and what kind it is; `dataset`
    forces a kind instead of detecting it. Raises DataError when the data is missing or unrecognised.
    A Source passes through, so that every function here takes either."""
    if isinstance(data, Source):
        return data
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
        return Source("fashion-mnist", found, gz=True)
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


def detect_dataset(data: str | os.PathLike | Source | None, dataset: str = "auto") -> str:
    """The dataset kind (a key of DATASETS) that `build_dataset` will load from `data`."""
    return locate(data, dataset).kind


def image_spec(data: str | os.PathLike | Source | None, dataset: str = "auto", image_size: int | None = None) -> dict:
    """Source.spec of the data set at `data`."""
    return locate(data, dataset).spec(image_size)


def has_split(data: str | os.PathLike | Source | None, split: str, dataset: str = "auto") -> bool:
    """Whether `data` holds `split` ("train" or "val"); raises DataError when `data` is unusable."""
    return locate(data, dataset).has_split(split)


def _unpack_idx(src: pathlib.Path, folder: str) -> pathlib.Path:
    """Decompress the 4 idx .gz files into <cache>/idx-<key>/<folder>/raw once; returns that root.

    torchvision reads only uncompressed idx files. The key hashes the source path and its files'
    sizes and times, so changed sources get a fresh folder. Each file is written to a temporary
    name and renamed, so concurrent ranks or an interrupted run never leave a half-written file.
    """
    cache = pathlib.Path(os.environ.get("MOCO_FAST_CACHE") or "~/.cache/moco_fast").expanduser()
    key = hashlib.sha1(str(src.resolve()).encode())
    try:
        for name in IDX_FILES:
            st = (src / f"{name}.gz").stat()
            key.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        root = cache / f"idx-{key.hexdigest()[:12]}"
        raw = root / folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            gz, out = src / f"{name}.gz", raw / name
            if out.is_file():
                continue
            with atomic_file(str(out), shared=True) as f, gzip.open(gz, "rb") as g:  # shared: one cache per machine
                shutil.copyfileobj(g, f, 1 << 20)
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


def _torchvision_dataset(src: Source, split: str, labelled: bool) -> Dataset:
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

    @property
    def files(self) -> list[tuple[str, int]] | None:
        """(path, target) of every item of an image folder; None for an in-memory set."""
        return self.base.samples if isinstance(self.base, datasets.DatasetFolder) else None

    def __len__(self) -> int:
        return len(self.base)

    def _load_file(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        skipped = []
        for step in range(self.max_tries):
            path, target = self.files[(index + step) % len(self)]
            try:
                return self.base.loader(path), target, tuple(skipped)
            except LOAD_ERRORS:
                skipped.append(path)
        raise DataError(f"{len(skipped)} unreadable images in a row from index {index}, e.g. {skipped[:5]}")

    def __getitem__(self, index: int) -> tuple[Any, Any, tuple[str, ...]]:
        if self.files is not None:
            img, target, skipped = self._load_file(index)
        else:  # in-memory arrays: nothing can fail to load
            (img, target), skipped = self.base[index], ()
        if img.mode != "RGB":  # (Fashion-)MNIST: 3 equal channels for 3-channel encoders
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, target, skipped


def build_dataset(data: str | os.PathLike | Source | None, split: str, transform, dataset: str = "auto",
                  max_bad: int = 100, labelled: bool = False) -> MocoDataset:
    """The `split` ("train" or "val") of the dataset at `data` (a path, None for the Fashion-MNIST demo,
    or a Source from `locate`, which is not searched again).

    `dataset` forces a kind instead of detecting it from the layout. `labelled` asks STL-10 for its
    labelled train images only (a kNN bank) instead of train+unlabeled (pretraining). An item tries
    at most max_bad + 1 files, since a SkipCounter(max_bad) would stop the run past that anyway.
    Raises DataError before loading anything when the data is missing, unrecognised or lacks `split`.
    """
    src = locate(data, dataset)
    if not src.has_split(split):
        raise DataError(f"{src.root} has no {split} split: expected {src.root / split}/<class>/<image> "
                        f"next to {src.root / 'train'}/<class>/<image>")
    if src.kind == "imagefolder":
        base = _image_folder(src.root, split)
    else:
        base = _torchvision_dataset(src, split, labelled)
    return MocoDataset(base, transform, max_tries=max_bad + 1)


def in_memory_images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """An in-memory data set (a MocoDataset or torchvision's own) as uint8 (N, 3, H, W) images (gray
    repeated) and int64 targets (N,); raises DataError for an image folder or another layout."""
    base = dataset.base if isinstance(dataset, MocoDataset) else dataset
    if getattr(base, "data", None) is None:
        raise DataError(f"{type(base).__name__} holds no in-memory images (expected CIFAR, STL-10 or (Fashion-)MNIST)")
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
