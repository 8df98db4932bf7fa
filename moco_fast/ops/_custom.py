"""The registered ops moco_fast::infonce, momentum_update_, enqueue_, crop_resize and color_augment.

Each is a torch.library custom op taking the (already resolved) backend name, with a fake kernel for
torch.compile, declared mutations, and autograd for infonce. The implementations call one layer down:
the C++/CUDA kernels (torch.ops.moco_fast.*_kernel_ / infonce_fwd), the Triton launchers in kernels/,
or the pure-PyTorch reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from moco_fast import reference
from moco_fast.ops import _backends

Tensor = torch.Tensor


def _accum_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _infonce_fwd_reference(q, k, queue, inv_temperature, allow_tf32):
    # Autograd is below us inside a custom op, so dL/dq is written out: (softmax - onehot) @ keys / (T N).
    acc = _accum_dtype(q, k, queue)
    loss, stats = reference.infonce_ref(q, k, queue, 1.0 / inv_temperature, return_stats=True)
    dtype = reference._common_dtype(q, k, queue)
    q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) * inv_temperature  # Nx(1+K)
    p = torch.softmax(logits.to(acc), dim=1)
    grad_q = (p[:, :1] * k.to(acc) + p[:, 1:] @ queue.to(acc) - k.to(acc)) * (inv_temperature / q.shape[0])
    return loss.to(acc), grad_q, torch.stack([stats["acc1"], stats["acc5"]])


def kernel(op: str, backend: str):
    """The function implementing `op` ('infonce_fwd', 'momentum_update_', 'enqueue_') for a backend."""
    if backend in ("cpu", "cuda"):
        _backends.extension()  # loading the extension registers torch.ops.moco_fast.*
        return {"infonce_fwd": torch.ops.moco_fast.infonce_fwd,
                "momentum_update_": torch.ops.moco_fast.momentum_update_kernel_,
                "enqueue_": torch.ops.moco_fast.enqueue_kernel_}[op]
    if backend == "triton":
        module = _backends.triton_kernels(op.rstrip("_").removesuffix("_fwd"))
        return getattr(module, op)
    if backend == "reference":
        return {"infonce_fwd": _infonce_fwd_reference,
                "momentum_update_": lambda pk, pq, m_tensor, m: reference.momentum_update_ref_(
                    pk, pq, m if m_tensor is None else float(m_tensor)),
                "enqueue_": reference.enqueue_ref_}[op]
    raise RuntimeError(f"unknown backend {backend!r}")


@torch.library.custom_op("moco_fast::infonce", mutates_args=())
def infonce_op(q: Tensor, k: Tensor, queue: Tensor, temperature: float, backend: str,
               allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, dL/dq for an upstream gradient of 1, [acc1, acc5]) in one pass over the queue."""
    loss, grad_q, stats = kernel("infonce_fwd", backend)(q, k, queue, 1.0 / temperature, allow_tf32)
    return loss, grad_q, stats


@infonce_op.register_fake
def _(q, k, queue, temperature, backend, allow_tf32):
    acc = _accum_dtype(q, k, queue)
    return q.new_empty((), dtype=acc), q.new_empty(q.shape, dtype=acc), q.new_empty((2,), dtype=torch.float32)


def _infonce_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1])
    ctx.q_dtype = inputs[0].dtype


def _infonce_backward(ctx, grad_loss, grad_grad_q, grad_stats):
    (grad_q,) = ctx.saved_tensors  # computed in the forward: the queue may have changed since
    return (grad_loss * grad_q).to(ctx.q_dtype), None, None, None, None, None


infonce_op.register_autograd(_infonce_backward, setup_context=_infonce_setup_context)


@torch.library.custom_op("moco_fast::momentum_update_", mutates_args=("params_k",))
def momentum_update_op(params_k: list[Tensor], params_q: list[Tensor], m_tensor: Optional[Tensor], m: float,
                       backend: str) -> None:
    """p_k <- m * p_k + (1 - m) * p_q for every pair, m read from m_tensor when it is given."""
    kernel("momentum_update_", backend)(params_k, params_q, m_tensor, m)


@momentum_update_op.register_fake
def _(params_k, params_q, m_tensor, m, backend):
    return None


@torch.library.custom_op("moco_fast::enqueue_", mutates_args=("queue", "ptr"))
def enqueue_op(queue: Tensor, ptr: Tensor, keys: Tensor, backend: str) -> None:
    """Write keys into the ring buffer at the device-side pointer, then advance it."""
    kernel("enqueue_", backend)(queue, ptr, keys)


@enqueue_op.register_fake
def _(queue, ptr, keys, backend):
    return None


# ---------------------------------------------------------------------------------------- augment
# Backends "triton" (CUDA tensors, or CPU ones in the interpreter), "cpu" (C++) and "reference"; no CUDA C++.

def _crop_resize_cpu(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x):
    return torch.ops.moco_fast.crop_resize_kernel(data, offsets, heights, widths, boxes, size)


def _color_augment_cpu(x, factors, order, jitter, gray, flip, mean, std, gray_first, out):
    torch.ops.moco_fast.color_augment_kernel_(x, factors, order, jitter, gray, flip, mean, std, gray_first, out)


def augment_kernel(name: str, backend: str):
    """The 'crop_resize' or 'color_augment' launcher of a backend ('triton', 'cpu'); None for the reference."""
    if backend == "triton":
        return getattr(_backends.triton_kernels("augment"), name)
    if backend == "cpu":
        _backends.extension()  # registers torch.ops.moco_fast.*
        return {"crop_resize": _crop_resize_cpu, "color_augment": _color_augment_cpu}[name]
    return None


def crop_resize_taps(max_crop: int, size: int) -> int:
    """A bound on the filter taps along an axis whose crops are at most max_crop long, resized to size:
    ceil(2 * support) + 1 (support = max(crop / size, 1)), and never more than the crop itself."""
    return max(1, min(math.ceil(2 * max(max_crop / size, 1.0)) + 1, max_crop))


def crop_resize_impl(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x, backend) -> Tensor:
    launcher = augment_kernel("crop_resize", backend)
    if launcher is None:
        return reference.crop_resize_ref(data, offsets, heights, widths, boxes, size)
    return launcher(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x)


def color_augment_impl(x, factors, order, jitter, gray, flip, mean, std, gray_first, out_dtype, channels_last,
                       backend) -> Tensor:
    launcher = augment_kernel("color_augment", backend)
    if launcher is None:
        out = reference.color_augment_ref(x, factors, order, jitter, gray, flip, mean, std, gray_first)
        return _new_image(x, out_dtype, channels_last).copy_(out)  # never an alias of x
    out = _new_image(x, out_dtype, channels_last)
    launcher(x.float().contiguous(), factors.float().contiguous(), order.contiguous(), jitter, gray, flip,
             mean, std, gray_first, out)
    return out


def _new_image(x: Tensor, dtype: torch.dtype, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)


@torch.library.custom_op("moco_fast::crop_resize", mutates_args=())
def crop_resize_op(data: Tensor, offsets: Tensor, heights: Tensor, widths: Tensor, boxes: Tensor, size: int,
                   max_taps_y: int, max_taps_x: int, backend: str) -> Tensor:
    """(N, 3, size, size) fp32: antialiased bilinear crop-and-resize of the packed uint8 images."""
    return crop_resize_impl(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x, backend)


@crop_resize_op.register_fake
def _(data, offsets, heights, widths, boxes, size, max_taps_y, max_taps_x, backend):
    return data.new_empty((boxes.shape[0], 3, size, size), dtype=torch.float32)


@torch.library.custom_op("moco_fast::color_augment", mutates_args=())
def color_augment_op(x: Tensor, factors: Tensor, order: Tensor, jitter: Tensor, gray: Tensor, flip: Tensor,
                     mean: list[float], std: list[float], gray_first: bool, out_dtype: torch.dtype,
                     channels_last: bool, backend: str) -> Tensor:
    """(N, 3, H, W) of out_dtype: grayscale, colour jitter, flip and normalisation, per sample."""
    return color_augment_impl(x, factors, order, jitter, gray, flip, mean, std, gray_first, out_dtype,
                              channels_last, backend)


@color_augment_op.register_fake
def _(x, factors, order, jitter, gray, flip, mean, std, gray_first, out_dtype, channels_last, backend):
    return _new_image(x, out_dtype, channels_last)
