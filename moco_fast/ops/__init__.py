"""The public ops. The model calls only these.

    loss = ops.infonce(q, k, queue, temperature, backend="auto")
    loss, stats = ops.infonce(q, k, queue, temperature, return_stats=True)
    ops.momentum_update_(params_k, params_q, m, backend="auto")
    ops.enqueue_(queue, ptr, keys, backend="auto")
    images = ops.crop_resize(data, offsets, heights, widths, boxes, size, backend="auto")
    x = ops.color_augment(images, factors, order, jitter, gray, flip, mean, std, gray_first, backend="auto")
    ops.available_backends()

Backends: "reference" (pure PyTorch), "cpu" (C++), "cuda" (C++/CUDA), "triton", and "auto", which takes
the best usable one for the tensors' device and logs its choice once. A backend that cannot run raises
a RuntimeError saying what is missing; nothing falls back silently.
"""
from __future__ import annotations

import torch

from moco_fast.ops import _backends, _custom, _validate
from moco_fast.ops._backends import BACKENDS, OPS, available_backends, resolve

__all__ = ["infonce", "momentum_update_", "enqueue_", "crop_resize", "color_augment", "available_backends",
           "BACKENDS", "OPS"]


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, backend: str = "auto",
            return_stats: bool = False):
    """Mean InfoNCE loss of each query against its positive key and the queue of negatives.

    q: (N, C) queries (gradient flows here), k: (N, C) positive keys, queue: (K, C) negative keys, rows
    contiguous; fp32, bf16 or fp16 each (fp64 on the reference and cpu backends). Logits row i is
    [q_i.k_i, q_i.queue_0, ..., q_i.queue_{K-1}] / temperature with label 0; returns the mean
    cross-entropy as an fp32 scalar, and with return_stats also {"acc1", "acc5"}: the fraction of rows
    whose positive ranks first / in the top 5. The fast backends never build the (N, K+1) logits and
    compute dL/dq in the forward, so the queue may be overwritten right after this call.
    TF32 is used for fp32 inputs unless torch.get_float32_matmul_precision() == "highest".
    """
    _validate.check_infonce(q, k, queue, temperature)
    tf32 = _backends.allow_tf32()
    name = resolve("infonce", backend, q.device, (q.dtype, k.dtype, queue.dtype, "tf32" if tf32 else "ieee"))
    loss, _, stats = _custom.infonce_op(q, k, queue, float(temperature), name, tf32)
    if return_stats:
        return loss, {"acc1": stats[0], "acc5": stats[1]}
    return loss


def momentum_update_(params_k, params_q, m, backend: str = "auto") -> None:
    """In place, for every pair: p_k <- m * p_k + (1 - m) * p_q, math in fp32.

    params_k, params_q: sequences of tensors of equal shapes, dtypes (fp32, bf16, fp16) and strides.
    m: a float, or a one-element tensor on the params' device (a momentum schedule then needs no
    recompilation and can live in a CUDA graph).
    """
    params_k, params_q = list(params_k), list(params_q)
    dtypes = _validate.check_momentum_update(params_k, params_q, m)
    if not params_k:
        return
    name = resolve("momentum_update", backend, params_k[0].device, dtypes)
    m_tensor, m_float = (m, 0.0) if isinstance(m, torch.Tensor) else (None, float(m))
    if _eager(params_k[0]):
        _custom.kernel("momentum_update_", name)(params_k, params_q, m_tensor, m_float)
    else:
        _custom.momentum_update_op(params_k, params_q, m_tensor, m_float, name)


def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, backend: str = "auto") -> None:
    """Ring-buffer enqueue with the pointer kept on the device.

    queue: (K, C), ptr: int64 (1,) on the queue's device, keys: (B, C), cast to the queue's dtype.
    Same result as `for i in range(B): queue[(ptr + i) % K] = keys[i]`, then ptr <- (ptr + B) % K
    (B > K keeps the last K keys), with no host synchronisation on the fast backends.
    """
    _validate.check_enqueue(queue, ptr, keys)
    name = resolve("enqueue", backend, queue.device, (queue.dtype, keys.dtype))
    if _eager(queue):
        _custom.kernel("enqueue_", name)(queue, ptr, keys)
    else:
        _custom.enqueue_op(queue, ptr, keys, name)


def crop_resize(data: torch.Tensor, offsets: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                boxes: torch.Tensor, size: int, backend: str = "auto", max_crop=None,
                check_values: bool = True) -> torch.Tensor:
    """Antialiased bilinear crop-and-resize of packed uint8 images (torchvision's resized_crop, PIL-like).

    data: (total,) uint8 holding image i as contiguous (3, heights[i], widths[i]) from data[offsets[i]];
    offsets, heights, widths: (N,) int64; boxes: (N, 4) int64 (top, left, height, width) inside each image.
    Returns (N, 3, size, size) fp32 in [0, 1] on data's device. The index tensors may be on the cpu when
    data is not (they are copied over). The kernel loops over a bound on the filter taps, from max_crop
    (the largest crop side, an int or (height, width)) when given, else from the boxes when they are on
    the cpu, else from the largest image side (one host sync). check_values checks every box lies inside
    its image (free on the cpu, one host sync on the GPU; skipped under torch.compile).
    """
    _validate.check_crop_resize(data, offsets, heights, widths, boxes, size)
    if check_values and not torch.compiler.is_compiling():
        _validate.check_crop_resize_values(data, offsets, heights, widths, boxes)
    name = resolve("augment", backend, data.device.type)
    if max_crop is None:
        max_crop = (boxes[:, 2].max(), boxes[:, 3].max()) if boxes.device.type == "cpu" else (
            heights.max(), widths.max())
        max_crop = tuple(int(v) for v in max_crop) if boxes.shape[0] else (1, 1)
    crop_y, crop_x = (max_crop, max_crop) if isinstance(max_crop, int) else max_crop
    taps = _custom.crop_resize_taps(crop_y, size), _custom.crop_resize_taps(crop_x, size)
    index = [t.to(data.device, non_blocking=True) for t in (offsets, heights, widths, boxes)]
    if _eager(data):
        return _custom.crop_resize_impl(data, *index, size, *taps, name)
    return _custom.crop_resize_op(data, *index, size, *taps, name)


def color_augment(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, jitter: torch.Tensor,
                  gray: torch.Tensor, flip: torch.Tensor, mean, std, gray_first: bool,
                  out_dtype: torch.dtype = torch.float32, channels_last: bool = True, backend: str = "auto",
                  check_values: bool = True) -> torch.Tensor:
    """Per sample: RandomGrayscale (before the jitter when gray_first, MoCo v1; after it otherwise), ColorJitter
    in the sample's order, horizontal flip, Normalize; torchvision's math on float tensors.

    x: (N, 3, H, W) float in [0, 1]; factors: (N, 4) float (brightness, contrast, saturation >= 0, hue shift
    in [-0.5, 0.5]); order: (N, 4) int64, a permutation of 0..3 per sample (0 brightness, 1 contrast,
    2 saturation, 3 hue: ColorJitter's fn_idx); jitter, gray, flip: (N,) bool, whether each applies;
    mean, std: 3 floats (or a tensor of 3). The parameter tensors may be on the cpu when x is not. Returns a new
    (N, 3, H, W) tensor of out_dtype, channels_last by default (what a convolution wants). The triton
    backend computes in fp32; the reference in x's dtype. check_values checks order and factors (free on
    the cpu, one host sync on the GPU; skipped under torch.compile).
    """
    # Python floats: each is a kernel argument (tensors are read once, a host sync when on the GPU)
    mean, std = ([float(v) for v in (m.tolist() if isinstance(m, torch.Tensor) else m)] for m in (mean, std))
    _validate.check_color_augment(x, factors, order, jitter, gray, flip, mean, std, out_dtype)
    if check_values and not torch.compiler.is_compiling():
        _validate.check_color_augment_values(factors, order)
    name = resolve("augment", backend, x.device.type)
    params = [t.to(x.device, non_blocking=True) for t in (factors, order, jitter, gray, flip)]
    args = (x, *params, mean, std, bool(gray_first), out_dtype, bool(channels_last), name)
    return _custom.color_augment_impl(*args) if _eager(x) else _custom.color_augment_op(*args)


def _eager(t: torch.Tensor) -> bool:
    """Plain eager call: the ops without autograd skip the custom-op dispatch, which costs tens of µs a
    call, and reach their kernel directly. Under torch.compile (and for tensor subclasses such as fake
    tensors) the registered op is used, so graphs see a declared mutation."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor
