"""crop_resize and color_augment: the per-pixel stages of the MoCo augmentation, two ops in one file.

Two ops with the layers, keys and self-check of every other op: each has its own backend table, resolves per
device and dtypes, and is self-checked before a fast backend serves it. They share a file because they share
their kernel files (kernels/augment.py, csrc/cpu/augment.cpp), their test file and their benchmark case.
Backends "triton" (CUDA tensors, or CPU ones in the interpreter), "cpu" (C++) and "reference"; no CUDA C++.
Layers per op: kernel -> launcher (torch.ops.moco_fast.crop_resize_kernel / color_augment_kernel_,
kernels/augment.py:crop_resize / color_augment_) -> custom op moco_fast::crop_resize / color_augment with its
fake -> the public function. Spec: reference.crop_resize_ref, reference.color_augment_ref.
"""
from __future__ import annotations

import math

import torch

from moco_fast import reference
from moco_fast.ops import _backends
from moco_fast.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, fail, same_device_or_cpu

Tensor = torch.Tensor


# crop_resize's kernel on each backend: (data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x)
# -> (N, 3, size, size) fp32. The tap bounds size Triton's static loops; the C++ kernel checks them.
def _crop_resize_cpp(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x):  # csrc/cpu/augment.cpp
    return torch.ops.moco_fast.crop_resize_kernel(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x)


def _crop_resize_triton(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x):
    from moco_fast.kernels.augment import crop_resize  # Triton is imported on first use, not with moco_fast
    return crop_resize(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x)


def _crop_resize_ref(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x):
    return reference.crop_resize_ref(data, offsets, heights, widths, boxes, size)


# color_augment's kernel on each backend: (x, factors, order, jitter, gray, flip, mean, std, gray_first, out)
# -> None, writing out
def _color_augment_cpp(x, factors, order, jitter, gray, flip, mean, std, gray_first, out) -> None:
    torch.ops.moco_fast.color_augment_kernel_(x, factors, order, jitter, gray, flip, mean, std, gray_first, out)


def _color_augment_triton(x, factors, order, jitter, gray, flip, mean, std, gray_first, out) -> None:
    from moco_fast.kernels.augment import color_augment_  # Triton is imported on first use only
    color_augment_(x, factors, order, jitter, gray, flip, mean, std, gray_first, out)


def _color_augment_ref_(x, factors, order, jitter, gray, flip, mean, std, gray_first, out) -> None:
    out.copy_(reference.color_augment_ref(x, factors, order, jitter, gray, flip, mean, std, gray_first))


_backends.register("crop_resize", {"reference": _crop_resize_ref, "cpu": _crop_resize_cpp,
                                   "triton": _crop_resize_triton})
_backends.register("color_augment", {"reference": _color_augment_ref_, "cpu": _color_augment_cpp,
                                     "triton": _color_augment_triton})


def crop_resize_kernel(backend: str):
    """The crop_resize kernel `backend` runs (the custom op and the self-check call it through here)."""
    return _backends.kernel("crop_resize", backend)


def color_augment_kernel(backend: str):
    """The color_augment kernel `backend` runs (the custom op and the self-check call it through here)."""
    return _backends.kernel("color_augment", backend)


# ------------------------------------------------------------------------------------ crop_resize
def check_crop_resize(data, offsets, heights, widths, boxes, size) -> None:
    op = "crop_resize"
    check_tensor(op, "data", data, dim=1, dtypes=(torch.uint8,), contiguous=True)
    check_tensor(op, "boxes", boxes, dim=2, dtypes=INDEX_DTYPES)
    N = boxes.shape[0]
    if boxes.shape[1] != 4:
        fail(op, f"boxes must be (N, 4) rows of (top, left, height, width); got shape {tuple(boxes.shape)}")
    for name, t in (("offsets", offsets), ("heights", heights), ("widths", widths)):
        check_tensor(op, name, t, dim=1, dtypes=INDEX_DTYPES)
        if t.shape[0] != N:
            fail(op, f"{name} must have shape ({N},), one entry per row of boxes; got {tuple(t.shape)}")
    for name, t in (("offsets", offsets), ("heights", heights), ("widths", widths), ("boxes", boxes)):
        same_device_or_cpu(op, name, t, data.device)
    if not (isinstance(size, int) and size >= 1):
        fail(op, f"size must be a positive int; got {size!r}")


def check_crop_resize_values(data, offsets, heights, widths, boxes) -> None:
    """Every image inside data and every box inside its image (one host sync for device tensors)."""
    top, left, h, w = boxes.unbind(1)
    offsets, heights, widths = offsets.to(boxes.device), heights.to(boxes.device), widths.to(boxes.device)
    bad_image = (offsets < 0) | (heights < 1) | (widths < 1) | (offsets + 3 * heights * widths > data.numel())
    bad_box = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > heights) | (left + w > widths)
    if not bool((bad_image | bad_box).any()):
        return
    i = int((bad_image | bad_box).nonzero()[0, 0])
    image = f"image {i} (offset {int(offsets[i])}, height {int(heights[i])}, width {int(widths[i])})"
    if bool(bad_image[i]):
        fail("crop_resize", f"{image} must be a non-empty 3 x height x width image inside data of "
                            f"{data.numel()} elements")
    fail("crop_resize", f"boxes[{i}] = {tuple(boxes[i].tolist())} (top, left, height, width) must be a non-empty "
                        f"crop inside {image}")


def taps(max_crop: int, size: int) -> int:
    """A bound on the filter taps along an axis whose crops are at most max_crop long, resized to size:
    ceil(2 * support) + 1 (support = max(crop / size, 1)), and never more than the crop itself."""
    return max(1, min(math.ceil(2 * max(max_crop / size, 1.0)) + 1, max_crop))


def _crop_resize(data: Tensor, offsets: Tensor, heights: Tensor, widths: Tensor, boxes: Tensor, size: int,
                 max_taps_y: int, max_taps_x: int, backend: str) -> Tensor:
    """(N, 3, size, size) fp32: antialiased bilinear crop-and-resize of the packed uint8 images."""
    return crop_resize_kernel(backend)(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x)


crop_resize_op = torch.library.custom_op("moco_fast::crop_resize", _crop_resize, mutates_args=())


@crop_resize_op.register_fake
def _(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x, backend):
    return data.new_empty((boxes.shape[0], 3, size, size), dtype=torch.float32)


def crop_resize(data: Tensor, offsets: Tensor, heights: Tensor, widths: Tensor, boxes: Tensor, size: int,
                backend: str = "auto", max_crop=None, check_values: bool = True) -> Tensor:
    """Antialiased bilinear crop-and-resize of packed uint8 images (torchvision's resized_crop, PIL-like).

    data: (total,) uint8 holding image i as contiguous (3, heights[i], widths[i]) from data[offsets[i]];
    offsets, heights, widths: (N,) int64; boxes: (N, 4) int64 (top, left, height, width) inside each image.
    Returns (N, 3, size, size) fp32 in [0, 1] on data's device. The index tensors may be on the cpu when
    data is not (they are copied over). The kernel loops over a bound on the filter taps, from max_crop
    (the largest crop side, an int or (height, width)) when given, else from the boxes when they are on
    the cpu, else from the largest image side (one host sync). check_values checks every box lies inside
    its image (free on the cpu, one host sync on the GPU; skipped under torch.compile).
    """
    check_crop_resize(data, offsets, heights, widths, boxes, size)
    if check_values and not torch.compiler.is_compiling():
        check_crop_resize_values(data, offsets, heights, widths, boxes)
    name = _backends.resolve("crop_resize", backend, data.device, (data.dtype,))
    if max_crop is None:
        max_crop = (boxes[:, 2].max(), boxes[:, 3].max()) if boxes.device.type == "cpu" else (
            heights.max(), widths.max())
        max_crop = tuple(int(v) for v in max_crop) if boxes.shape[0] else (1, 1)
    crop_y, crop_x = (max_crop, max_crop) if isinstance(max_crop, int) else max_crop
    index = [t.to(data.device, non_blocking=True) for t in (offsets, heights, widths, boxes)]
    args = (data, *index, size, taps(crop_y, size), taps(crop_x, size), name)
    return _crop_resize(*args) if _backends.skips_dispatch(data) else crop_resize_op(*args)


# ---------------------------------------------------------------------------------- color_augment
def check_color_augment(x, factors, order, jitter, gray, flip, mean, std, out_dtype) -> None:
    op = "color_augment"
    check_tensor(op, "x", x, dim=4)
    N = x.shape[0]
    if x.shape[1] != 3:
        fail(op, f"x must be (N, 3, H, W); got shape {tuple(x.shape)}")
    check_tensor(op, "factors", factors)
    check_tensor(op, "order", order, dtypes=INDEX_DTYPES)
    for name, t in (("factors", factors), ("order", order)):
        if tuple(t.shape) != (N, 4):
            fail(op, f"{name} must have shape ({N}, 4); got {tuple(t.shape)}")
    for name, t in (("jitter", jitter), ("gray", gray), ("flip", flip)):
        check_tensor(op, name, t, dtypes=(torch.bool,))
        if tuple(t.shape) != (N,):
            fail(op, f"{name} must have shape ({N},); got {tuple(t.shape)}")
    for name, t in (("factors", factors), ("order", order), ("jitter", jitter), ("gray", gray), ("flip", flip)):
        same_device_or_cpu(op, name, t, x.device)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3:
            fail(op, f"{name} must hold 3 floats, one per channel; got {len(v)}")
    if any(float(s) == 0 for s in std):
        fail(op, f"std must not contain 0; got {tuple(std)}")
    if out_dtype not in FLOAT_DTYPES:
        fail(op, f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}; got {out_dtype}")


def check_color_augment_values(factors, order) -> None:
    """Each order row a permutation of 0..3, factors in ColorJitter's ranges (one host sync on the GPU)."""
    bad_order = (order.sort(dim=1).values != torch.arange(4, device=order.device)).any(1)
    bad_factor = (factors[:, :3] < 0).any(1) | (factors[:, 3].abs() > 0.5) | ~factors.isfinite().all(1)
    if not bool((bad_order | bad_factor).any()):
        return
    i = int((bad_order | bad_factor).nonzero()[0, 0])
    if bool(bad_order[i]):
        fail("color_augment", f"order[{i}] must be a permutation of 0..3; got {order[i].tolist()}")
    fail("color_augment", f"factors[{i}] must be (brightness >= 0, contrast >= 0, saturation >= 0, hue in "
                          f"[-0.5, 0.5]); got {factors[i].tolist()}")


def _new_image(x: Tensor, dtype: torch.dtype, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)


def _color_augment(x: Tensor, factors: Tensor, order: Tensor, jitter: Tensor, gray: Tensor, flip: Tensor,
                   mean: list[float], std: list[float], gray_first: bool, out_dtype: torch.dtype,
                   channels_last: bool, backend: str) -> Tensor:
    """(N, 3, H, W) of out_dtype: grayscale, colour jitter, flip and normalisation, per sample."""
    out = _new_image(x, out_dtype, channels_last)  # never an alias of x
    if backend != "reference":  # the kernels compute in fp32 on contiguous inputs; the reference in x's dtype
        x, factors, order = x.float().contiguous(), factors.float().contiguous(), order.contiguous()
    color_augment_kernel(backend)(x, factors, order, jitter, gray, flip, mean, std, gray_first, out)
    return out


color_augment_op = torch.library.custom_op("moco_fast::color_augment", _color_augment, mutates_args=())


@color_augment_op.register_fake
def _(x, factors, order, jitter, gray, flip, mean, std, gray_first, out_dtype, channels_last, backend):
    return _new_image(x, out_dtype, channels_last)


def color_augment(x: Tensor, factors: Tensor, order: Tensor, jitter: Tensor, gray: Tensor, flip: Tensor, mean, std,
                  gray_first: bool, out_dtype: torch.dtype = torch.float32, channels_last: bool = True,
                  backend: str = "auto", check_values: bool = True) -> Tensor:
    """Per sample: RandomGrayscale (before the jitter when gray_first, MoCo v1; after it otherwise), ColorJitter
    in the sample's order, horizontal flip, Normalize; torchvision's math on float tensors.

    x: (N, 3, H, W) float in [0, 1]; factors: (N, 4) float (brightness, contrast, saturation >= 0, hue shift
    in [-0.5, 0.5]); order: (N, 4) int64, a permutation of 0..3 per sample (0 brightness, 1 contrast,
    2 saturation, 3 hue: ColorJitter's fn_idx); jitter, gray, flip: (N,) bool, whether each applies;
    mean, std: 3 floats (or a (3,) tensor). The parameter tensors may be on the cpu when x is not. Returns a
    new (N, 3, H, W) tensor of out_dtype, channels_last by default (what a convolution wants). The triton
    and cpu backends compute in fp32; the reference in x's dtype. check_values checks order and factors
    (free on the cpu, one host sync on the GPU; skipped under torch.compile).
    """
    # Python floats: each is a kernel argument (tensors are read once, a host sync when on the GPU)
    mean, std = ([float(v) for v in (m.tolist() if isinstance(m, torch.Tensor) else m)] for m in (mean, std))
    check_color_augment(x, factors, order, jitter, gray, flip, mean, std, out_dtype)
    if check_values and not torch.compiler.is_compiling():
        check_color_augment_values(factors, order)
    name = _backends.resolve("color_augment", backend, x.device, (x.dtype, out_dtype))
    params = [t.to(x.device, non_blocking=True) for t in (factors, order, jitter, gray, flip)]
    args = (x, *params, mean, std, bool(gray_first), out_dtype, bool(channels_last), name)
    return _color_augment(*args) if _backends.skips_dispatch(x) else color_augment_op(*args)
