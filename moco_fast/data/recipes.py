"""The MoCo pretraining augmentations as data: one table that the PIL pipeline (pil.py) builds its
torchvision transforms from and the batched device pipeline (batch_augment.py) draws its parameters from.

    v1     RandomResizedCrop(S, scale=(0.2, 1)), RandomGrayscale(0.2), ColorJitter(0.4, 0.4, 0.4, 0.4), flip
    v2     RandomResizedCrop(S, scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale(0.2),
           GaussianBlur(sigma ~ U[0.1, 2]) p=0.5, flip
    small  RandomResizedCrop(S) (scale (0.08, 1)), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale(0.2)

v1 and v2 follow facebookresearch/moco (main_moco.py, moco/loader.py); `small` is the official CIFAR-10
demo's single recipe for 28-96 px images, so `aug_plus` does not change it.
"""
from __future__ import annotations

from typing import NamedTuple

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect ratios (torchvision's default)
SIGMA = (0.1, 2.0)               # the v2 blur's sigma range (official moco/loader.py GaussianBlur)


class Recipe(NamedTuple):
    scale: tuple[float, float]                # RandomResizedCrop's area fraction
    jitter: tuple[float, float, float, float]  # ColorJitter's brightness, contrast, saturation, hue
    p_jitter: float                           # 1.0: ColorJitter always, not inside a RandomApply
    p_gray: float
    p_blur: float
    order: tuple[str, ...]                    # the official order of the steps

    @property
    def gray_first(self) -> bool:
        """Whether RandomGrayscale comes before ColorJitter (v1): the one order that changes the pixels,
        since the crop is first and the flip and the blur commute with the colour steps."""
        return self.order.index("gray") < self.order.index("jitter")

    def crop_scale(self, crop_scale: float | None = None) -> tuple[float, float]:
        """The crop's area fraction; crop_scale (--crop-scale) replaces the smallest one."""
        return self.scale if crop_scale is None else (crop_scale, 1.0)


RECIPES = {
    "v1": Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, p_gray=0.2, p_blur=0.0,
                 order=("crop", "gray", "jitter", "flip")),
    "v2": Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5,
                 order=("crop", "jitter", "gray", "blur", "flip")),  # jitter not strengthened, as the official
    # the demo's order: the flip comes before the colour steps (they commute)
    "small": Recipe(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.0,
                    order=("crop", "flip", "jitter", "gray")),
}


def recipe_name(aug_plus: bool, small: bool) -> str:
    """The recipe of a run: `small` for small images whatever --aug-plus says, else v2 with --aug-plus."""
    return "small" if small else ("v2" if aug_plus else "v1")
