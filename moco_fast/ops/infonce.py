"""infonce: the mean InfoNCE loss against a queue of negatives, with dL/dq computed in the same pass.

Layers: kernel (csrc/{cpu,cuda}/infonce.*, kernels/infonce.py) -> launcher (torch.ops.moco_fast.infonce_kernel,
kernels/infonce.py:infonce_fwd) -> custom op moco_fast::infonce with its fake and autograd -> `infonce`.
Spec: moco_fast.reference.infonce_ref (the public function), infonce_fwd_ref (the kernel).
"""
from __future__ import annotations

import math

import torch

from moco_fast import reference
from moco_fast.ops import _backends, variants
from moco_fast.ops._checks import check_tensor, fail

Tensor = torch.Tensor


# The kernel on each backend, (q, k, queue, 1/T, allow_tf32, variant) -> (loss, dL/dq, [acc1, acc5]) in one
# pass over the queue; variant is variants.variant("infonce", backend).
def _cpp(q, k, queue, inv_temperature, allow_tf32, variant):  # csrc/cpu/infonce.cpp, csrc/cuda/infonce.cu
    return torch.ops.moco_fast.infonce_kernel(q, k, queue, inv_temperature, allow_tf32, variant)


def _triton(q, k, queue, inv_temperature, allow_tf32, variant):
    from moco_fast.kernels.infonce import infonce_fwd  # Triton is imported on first use, not with moco_fast
    return infonce_fwd(q, k, queue, inv_temperature, allow_tf32, variant)


def _reference(q, k, queue, inv_temperature, allow_tf32, variant):
    return reference.infonce_fwd_ref(q, k, queue, inv_temperature, allow_tf32)


_backends.register("infonce", {"reference": _reference, "cpu": _cpp, "cuda": _cpp, "triton": _triton})


def kernel(backend: str):
    """The kernel function `backend` runs (the custom op and the self-check call it through here)."""
    return _backends.kernel("infonce", backend)


def check(q, k, queue, temperature) -> None:
    check_tensor("infonce", "q", q, dim=2)
    check_tensor("infonce", "k", k, dim=2, device=q.device)
    check_tensor("infonce", "queue", queue, dim=2, device=q.device, contiguous=True)
    N, C = q.shape
    if N < 1 or C < 1:
        fail("infonce", f"q must be (N, C) with N >= 1 and C >= 1; got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        fail("infonce", f"k must have the shape of q, {tuple(q.shape)}; got {tuple(k.shape)}")
    if queue.shape[1] != C or queue.shape[0] < 1:
        fail("infonce", f"queue must be (K, {C}) with K >= 1; got {tuple(queue.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        fail("infonce", f"temperature must be a positive finite float; got {temperature!r}")


def _infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float, backend: str,
             allow_tf32: bool, variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, dL/dq for an upstream gradient of 1, [acc1, acc5]) in one pass over the queue."""
    return kernel(backend)(q, k, queue, 1.0 / temperature, allow_tf32, variant)


infonce_op = torch.library.custom_op("moco_fast::infonce", _infonce, mutates_args=())


@infonce_op.register_fake
def _(q, k, queue, temperature, backend, allow_tf32, variant):
    acc = reference.accum_dtype(q, k, queue)
    return q.new_empty((), dtype=acc), q.new_empty(q.shape, dtype=acc), q.new_empty((2,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1])
    ctx.q_dtype = inputs[0].dtype


def _backward(ctx, grad_loss, grad_grad_q, grad_stats):
    (grad_q,) = ctx.saved_tensors  # computed in the forward: the queue may have changed since
    return (grad_loss * grad_q).to(ctx.q_dtype), None, None, None, None, None, None


infonce_op.register_autograd(_backward, setup_context=_setup_context)


def infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float, backend: str = "auto",
            return_stats: bool = False):
    """Mean InfoNCE loss of each query against its positive key and the queue of negatives.

    q: (N, C) queries (gradient flows here), k: (N, C) positive keys, queue: (K, C) negative keys, rows
    contiguous; fp32, bf16 or fp16 each (fp64 on the reference and cpu backends). Logits row i is
    [q_i.k_i, q_i.queue_0, ..., q_i.queue_{K-1}] / temperature with label 0; returns the mean
    cross-entropy as an fp32 () scalar, and with return_stats also {"acc1": (), "acc5": ()}: the fraction
    of rows whose positive ranks first / in the top 5. The fast backends never build the (N, K+1) logits
    and compute dL/dq in the forward, so the queue may be overwritten right after this call.
    TF32 is used for fp32 inputs unless torch.get_float32_matmul_precision() == "highest".
    """
    check(q, k, queue, temperature)
    tf32 = _backends.allow_tf32()
    name = _backends.resolve("infonce", backend, q.device,
                             (q.dtype, k.dtype, queue.dtype, "tf32" if tf32 else "ieee"))
    args = (q, k, queue, float(temperature), name, tf32, variants.variant("infonce", name))
    direct = _backends.skips_dispatch(q, k, queue, differentiable=True)
    loss, _, stats = _infonce(*args) if direct else infonce_op(*args)
    if return_stats:
        return loss, {"acc1": stats[0], "acc5": stats[1]}
    return loss
