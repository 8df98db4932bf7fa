"""The PIL pipeline: torchvision transforms of one image at a time, in DataLoader workers.

The pretraining augmentation is built from the recipe table (recipes.RECIPES), step by step in the
recipe's official order, so it is exactly the official torchvision pipeline; the evaluation and the
linear-classification transforms are the official main_lincls.py ones.
"""
from __future__ import annotations

import random
from typing import Sequence

from PIL import Image, ImageFilter
from torchvision import transforms

from moco_fast.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from moco_fast.data.recipes import RECIPES, SIGMA, Recipe, recipe_name


class GaussianBlur:
    """Gaussian blur augmentation in SimCLR https://arxiv.org/abs/2002.05709 (official moco/loader.py)."""

    def __init__(self, sigma: Sequence[float] = SIGMA):
        self.sigma = list(sigma)

    def __call__(self, x: Image.Image) -> Image.Image:
        # Python's random, as the official: sampling.SeededSamples seeds it per sample.
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


class TwoCropsTransform:
    """Take two random crops of one image as the query and key."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x) -> list:
        return [self.base_transform(x), self.base_transform(x)]


def _step(name: str, rc: Recipe, image_size: int, crop_scale: float | None):
    if name == "crop":
        return transforms.RandomResizedCrop(image_size, scale=rc.crop_scale(crop_scale))
    if name == "jitter":
        jitter = transforms.ColorJitter(*rc.jitter)
        return jitter if rc.p_jitter == 1.0 else transforms.RandomApply([jitter], p=rc.p_jitter)
    if name == "gray":
        return transforms.RandomGrayscale(p=rc.p_gray)
    if name == "blur":
        return transforms.RandomApply([GaussianBlur(SIGMA)], p=rc.p_blur)
    if name == "flip":
        return transforms.RandomHorizontalFlip(p=0.5)
    raise ValueError(f"unknown augmentation step {name!r}")


def recipe_transform(recipe: str, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, crop_scale: float | None = None) -> transforms.Compose:
    """One view of recipe `recipe` ("v1", "v2" or "small") as torchvision transforms, then ToTensor and
    Normalize; crop_scale replaces the recipe's smallest crop area fraction (--crop-scale)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    rc = RECIPES[recipe]
    steps = [_step(name, rc, image_size, crop_scale) for name in rc.order]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])


def moco_augmentation(aug_plus: bool, image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD, small: bool = False,
                      crop_scale: float | None = None) -> transforms.Compose:
    """The official pretraining augmentation: v1 (InstDisc's), v2 (`aug_plus`, SimCLR-like), or `small`.

    `small` is the official CIFAR-10 demo's recipe (default crop scale, no blur) for 28-96 px images;
    the demo has a single recipe, so `aug_plus` does not change it.
    """
    return recipe_transform(recipe_name(aug_plus, small), image_size, mean, std, crop_scale)


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


def linear_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, small: bool = False) -> transforms.Compose:
    """Training transform of the linear classifier (official main_lincls.py): RandomResizedCrop and a
    flip; small images take the CIFAR recipe's padded random crop instead."""
    crop = transforms.RandomResizedCrop(image_size) if not small else transforms.RandomCrop(image_size, padding=4)
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])
