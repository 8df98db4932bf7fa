"""enqueue: the ring-buffer write of the keys into the MoCo queue, the pointer kept on the device.

Layers: kernel (csrc/{cpu,cuda}/enqueue.*, kernels/enqueue.py) -> launcher (torch.ops.moco_fast.enqueue_kernel_,
kernels/enqueue.py:enqueue_) -> custom op moco_fast::enqueue_ with its fake -> `enqueue_`.
Spec: reference.enqueue_ref_.
"""
from __future__ import annotations

import torch

from moco_fast import reference
from moco_fast.ops import _backends
from moco_fast.ops._checks import check_tensor, fail

Tensor = torch.Tensor
OP = "enqueue_"

# The kernel on each backend, (queue, ptr, keys) -> None, queue and ptr updated in place.
def _cpp(queue, ptr, keys) -> None:  # csrc/cpu/enqueue.cpp, csrc/cuda/enqueue.cu
    torch.ops.moco_fast.enqueue_kernel_(queue, ptr, keys)


def _triton(queue, ptr, keys) -> None:
    from moco_fast.kernels.enqueue import enqueue_  # Triton is imported on first use, not with moco_fast
    enqueue_(queue, ptr, keys)


_backends.register("enqueue", {"reference": reference.enqueue_ref_, "cpu": _cpp, "cuda": _cpp, "triton": _triton})


def kernel(backend: str):
    """The kernel function `backend` runs (the custom op and the self-check call it through here)."""
    return _backends.kernel("enqueue", backend)


def check(queue, ptr, keys) -> None:
    check_tensor(OP, "queue", queue, dim=2, contiguous=True)
    check_tensor(OP, "ptr", ptr, dtypes=(torch.int64,), device=queue.device)
    if tuple(ptr.shape) != (1,):
        fail(OP, f"ptr must have shape (1,); got {tuple(ptr.shape)}")
    check_tensor(OP, "keys", keys, dim=2, device=queue.device)
    if keys.shape[1] != queue.shape[1]:
        fail(OP, f"keys must be (B, {queue.shape[1]}) like the queue's rows; got {tuple(keys.shape)}")
    if queue.shape[0] < 1:
        fail(OP, f"queue must have at least one row; got shape {tuple(queue.shape)}")


def _enqueue(queue: Tensor, ptr: Tensor, keys: Tensor, backend: str) -> None:
    """Write keys into the ring buffer at the device-side pointer, then advance it."""
    kernel(backend)(queue, ptr, keys)


enqueue_op = torch.library.custom_op("moco_fast::enqueue_", _enqueue, mutates_args=("queue", "ptr"))


@enqueue_op.register_fake
def _(queue, ptr, keys, backend):
    return None


def enqueue_(queue: Tensor, ptr: Tensor, keys: Tensor, backend: str = "auto") -> None:
    """Ring-buffer enqueue with the pointer kept on the device.

    queue: (K, C) contiguous, K >= 1; ptr: int64 (1,) on the queue's device; keys: (B, C), any B >= 0, cast
    to the queue's dtype. Same result as `for i in range(B): queue[(ptr + i) % K] = keys[i]`, then
    ptr <- (ptr + B) % K (B > K keeps the last K keys), with no host synchronisation on the fast backends.
    """
    check(queue, ptr, keys)
    name = _backends.resolve("enqueue", backend, queue.device, (queue.dtype, keys.dtype))
    if _backends.skips_dispatch(queue):
        _enqueue(queue, ptr, keys, name)
    else:
        enqueue_op(queue, ptr, keys, name)
