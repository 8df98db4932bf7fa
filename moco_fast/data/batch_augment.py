"""The device pipeline's augmentation: random parameters drawn on the host for the whole batch at
once, pixels changed by the ops on the batch's device (CUDA, or the CPU).

The parameters of every sample are drawn with torch ops on a CPU generator, vectorised over the batch,
from the distributions of the recipe table (recipes.RECIPES), the same one the PIL pipeline builds
its torchvision transforms from. The pixels go through ops.crop_resize (antialiased bilinear crop +
resize) and ops.color_augment (jitter, grayscale, flip, normalise, in one pass), then the Gaussian
blur here. The blur runs last, after the flip and the normalisation: both commute with it (a
symmetric kernel that sums to 1, reflect padding, a per-channel affine map), so the result equals
the official order.

Beyond the official: the blur is torchvision's tensor gaussian_blur with a fixed 13-tap kernel
(covers 3 sigma at the largest sigma, 2.0) instead of PIL's ImageFilter.GaussianBlur, run in the
output dtype (bf16 on the GPU) on the views color_augment wrote.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moco_fast import ops
from moco_fast.data.decode import Packed
from moco_fast.data.recipes import RATIO, RECIPES, SIGMA

BLUR_KERNEL = 2 * math.ceil(3 * SIGMA[1]) + 1  # 13 taps


class AugmentParams(NamedTuple):
    """Per-sample parameters, CPU tensors. boxes: int64 (N, 4) = (top, left, h, w); factors: float32
    (N, 4) = (brightness, contrast, saturation, hue); order: int64 (N, 4), ColorJitter's fn_idx;
    jitter/gray/flip: bool (N,); sigma: float32 (N,), 0 = no blur."""
    boxes: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    jitter: torch.Tensor
    gray: torch.Tensor
    flip: torch.Tensor
    sigma: torch.Tensor


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator,
               scale: tuple[float, float], ratio: tuple[float, float] = RATIO, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop.get_params for every image at once: int64 (N, 4) = (top, left, h, w).

    All attempts are drawn at once and the first acceptable one is kept; an image with none takes the
    central crop with its aspect ratio clamped to `ratio`, as torchvision does.
    """
    H = heights.to(torch.float64)[:, None]                                  # N x 1
    W = widths.to(torch.float64)[:, None]
    u = torch.rand(len(heights), attempts, 2, dtype=torch.float64, generator=generator)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])            # N x attempts
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w, h = torch.round(torch.sqrt(area * r)), torch.round(torch.sqrt(area / r))  # both round half to even
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)                  # first accepted attempt
    found = ok.any(dim=1)
    H, W = H[:, 0], W[:, 0]
    in_ratio = W / H
    fw = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)      # the central fallback
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    w = torch.where(found, w.gather(1, first)[:, 0], fw)
    h = torch.where(found, h.gather(1, first)[:, 0], fh)
    pos = torch.rand(len(heights), 2, dtype=torch.float64, generator=generator)
    top = torch.where(found, torch.floor(pos[:, 0] * (H - h + 1)), torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(pos[:, 1] * (W - w + 1)), torch.div(W - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def sample_params(recipe: str, heights: torch.Tensor, widths: torch.Tensor,
                  generator: torch.Generator, crop_scale: float | None = None) -> AugmentParams:
    """One view's random parameters for images of the given sizes (int64 (N,) CPU tensors); crop_scale
    replaces the recipe's smallest crop area fraction (--crop-scale)."""
    rc = RECIPES[recipe]
    n = len(heights)
    boxes = crop_boxes(heights, widths, generator, rc.crop_scale(crop_scale))
    u = torch.rand(n, 4, generator=generator)
    *bcs, hue = rc.jitter                                                    # factors ~ U[1 - s, 1 + s], hue ~ U[-s, s]
    lo = torch.tensor([1 - s for s in bcs] + [-hue])
    factors = lo + torch.tensor([2 * s for s in rc.jitter]) * u              # ColorJitter.get_params
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)      # a uniform permutation
    coins = torch.rand(n, 4, generator=generator)
    sigma = SIGMA[0] + (SIGMA[1] - SIGMA[0]) * torch.rand(n, generator=generator)
    sigma = torch.where(coins[:, 2] < rc.p_blur, sigma, torch.zeros(()))
    return AugmentParams(boxes, factors, order, coins[:, 0] < rc.p_jitter, coins[:, 1] < rc.p_gray,
                         coins[:, 3] < 0.5, sigma)


def gaussian_kernels(sigma: torch.Tensor, size: int = BLUR_KERNEL) -> torch.Tensor:
    """float32 (N, size): torchvision's _get_gaussian_kernel1d per sigma (> 0)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=torch.float32, device=sigma.device)
    pdf = torch.exp(-0.5 * (x / sigma[:, None]).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def _blurred_rows(x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row indices on x's device, those rows blurred in x's dtype), or None when no sigma is > 0.

    The convolution runs in fp32 on the blurred rows only: an exact kernel and one rounding to x's dtype,
    without an fp32 copy of the whole batch."""
    sigma = sigma.cpu()
    idx = torch.nonzero(sigma > 0)[:, 0]                                     # no device sync: sigma is on the host
    if len(idx) == 0:
        return None
    n, c, hgt, wid = len(idx), x.shape[1], x.shape[2], x.shape[3]
    kernel = gaussian_kernels(sigma[idx]).to(x.device)                       # n x 13, fp32
    kernel = kernel.repeat_interleave(c, dim=0)[:, None]                     # (n*C) x 1 x 13
    pad = BLUR_KERNEL // 2
    dev_idx = idx.to(x.device)
    y = x.index_select(0, dev_idx).float().contiguous().view(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernel[:, :, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernel[:, :, :, None], groups=n * c)
    return dev_idx, y.view(n, c, hgt, wid).to(x.dtype)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of x (N, C, H, W), float; sigma: (N,) (0 = unchanged).

    Same as torchvision.transforms.functional.gaussian_blur(x[i], [13, 13], [sigma[i]] * 2) for every
    i (reflect padding). Only the blurred samples are touched; the result has x's memory format.
    """
    rows = _blurred_rows(x, sigma)
    return x if rows is None else x.clone().index_copy_(0, *rows)  # clone keeps x's memory format


def gaussian_blur_(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """gaussian_blur written into x itself (for views the caller owns); returns x."""
    rows = _blurred_rows(x, sigma)
    return x if rows is None else x.index_copy_(0, *rows)


class BatchAugment:
    """One recipe's augmentation of a batch of packed uint8 images into normalised views.

        aug = BatchAugment("v2", 224, IMAGENET_MEAN, IMAGENET_STD, out_dtype=torch.bfloat16)
        view = aug(packed, generator)                  # (N, 3, 224, 224), channels_last
        im_q, im_k = aug.two_views(packed, generator)  # independent parameters, one launch per op

    The pixels live on packed.data's device (CUDA or CPU); parameters come from `generator` (CPU).
    """

    def __init__(self, recipe: str, image_size: int, mean, std, out_dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, backend: str = "auto", crop_scale: float | None = None):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        self.recipe, self.size, self.backend = recipe, int(image_size), backend
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.out_dtype, self.channels_last = out_dtype, channels_last
        self.gray_first, self.crop_scale = RECIPES[recipe].gray_first, crop_scale

    def params(self, packed: Packed, generator: torch.Generator) -> AugmentParams:
        return sample_params(self.recipe, packed.heights, packed.widths, generator, self.crop_scale)

    def apply(self, packed: Packed, p: AugmentParams) -> torch.Tensor:
        """The views of `packed` under parameters `p`: (N, 3, S, S) in out_dtype on packed.data's device."""
        # Index and parameter tensors stay on the host: the ops copy them over without a host sync and
        # bound the filter taps from the host boxes.
        x = ops.crop_resize(packed.data, packed.offsets, packed.heights, packed.widths, p.boxes, self.size,
                            backend=self.backend)                            # N x 3 x S x S, fp32 in [0, 1]
        x = ops.color_augment(x, p.factors, p.order, p.jitter, p.gray, p.flip, self.mean, self.std, self.gray_first,
                              out_dtype=self.out_dtype, channels_last=self.channels_last, backend=self.backend)
        return gaussian_blur_(x, p.sigma)  # the views are ours: blurred in place, in out_dtype

    def __call__(self, packed: Packed, generator: torch.Generator) -> torch.Tensor:
        return self.apply(packed, self.params(packed, generator))

    def two_views(self, packed: Packed, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key views, both images' parameters drawn independently, augmented in one batch of 2N."""
        n = len(packed)
        doubled = Packed(packed.data, packed.offsets.repeat(2), packed.heights.repeat(2), packed.widths.repeat(2))
        views = self(doubled, generator)
        return views[:n], views[n:]
