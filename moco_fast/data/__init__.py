"""Data: datasets found from their on-disk layout, one sampler and seed scheme, one recipe table, the
PIL and the device pipelines, and the loaders every entry point reads.

    from moco_fast import data
    source = data.locate(path, dataset)                                   # the one search of the disk
    loader, sampler = data.train_loader(cfg, source, info, seed, dtype)   # pretraining (PIL or device)
    bank, test, classes = data.eval_loaders(source, batch_size, workers)  # kNN (trainer, scripts/knn.py)
    train, val, classes = data.linear_loaders(source, ...)                # linear classification

| module | what it holds |
|---|---|
| datasets.py | layouts and their detection (`locate`, `Source`), the idx cache, `MocoDataset`, `build_dataset` |
| sampling.py | `EpochSampler`, `seed_hash`, `SeededSamples` (PIL), `batch_generator` (device), `TensorBatches` |
| recipes.py | the v1 / v2 / small augmentation recipes, read by both pipelines |
| pil.py | torchvision transforms: the recipes, evaluation, linear classification |
| decode.py | the device pipeline's decode of encoded files into one `Packed` buffer |
| batch_augment.py | the device pipeline's batched augmentation (`BatchAugment`) |
| device.py | the device pipeline's loaders (image folders, in-memory sets) |
| loaders.py | the entry points above, `make_loader`, skipped-file accounting |
"""
from moco_fast.data.batch_augment import BatchAugment
from moco_fast.data.datasets import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DATASETS, DEMO_DIR,
                                     FASHION_MNIST_MEAN, FASHION_MNIST_STD, IDX_FILES, IMAGENET_MEAN, IMAGENET_STD,
                                     LOAD_ERRORS, MNIST_MEAN, MNIST_STD, DataError, DatasetInfo, MocoDataset, Source,
                                     build_dataset, detect_dataset, find_fashion_mnist, has_split, image_spec,
                                     in_memory_images, locate)
from moco_fast.data.decode import Packed, decode_batch
from moco_fast.data.device import device_loader
from moco_fast.data.loaders import (SkipCounter, collate_with_skipped, decode_counts, eval_loaders, linear_loaders,
                                    make_loader, train_loader, uses_gpu_aug)
from moco_fast.data.pil import (GaussianBlur, TwoCropsTransform, eval_transform, linear_transform,
                                moco_augmentation, recipe_transform)
from moco_fast.data.recipes import RECIPES, Recipe, recipe_name
from moco_fast.data.sampling import EpochSampler, SeededSamples, TensorBatches, batch_generator, seed_hash

__all__ = [
    "BatchAugment", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DATASETS", "DEMO_DIR",
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "IDX_FILES", "IMAGENET_MEAN", "IMAGENET_STD", "LOAD_ERRORS",
    "MNIST_MEAN", "MNIST_STD", "DataError", "DatasetInfo", "MocoDataset", "Source", "build_dataset",
    "detect_dataset", "find_fashion_mnist", "has_split", "image_spec", "in_memory_images", "locate", "Packed",
    "decode_batch", "device_loader", "SkipCounter", "collate_with_skipped", "decode_counts", "eval_loaders",
    "linear_loaders", "make_loader", "train_loader", "uses_gpu_aug", "GaussianBlur", "TwoCropsTransform",
    "eval_transform", "linear_transform", "moco_augmentation", "recipe_transform", "RECIPES", "Recipe",
    "recipe_name", "EpochSampler", "SeededSamples", "TensorBatches", "batch_generator", "seed_hash",
]
