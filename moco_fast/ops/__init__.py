"""The public ops. The model calls only these.

    loss = ops.infonce(q, k, queue, temperature, backend="auto")
    loss, stats = ops.infonce(q, k, queue, temperature, return_stats=True)
    ops.momentum_update_(params_k, params_q, m, backend="auto")
    ops.enqueue_(queue, ptr, keys, backend="auto")
    ops.available_backends()

Backends: "reference" (pure PyTorch), "cpu" (C++), "cuda" (C++/CUDA), "triton", and "auto", which takes
the best usable one for the tensors' device and logs its choice once. A backend that cannot run raises
a RuntimeError saying what is missing; nothing falls back silently.
"""
from __future__ import annotations

import torch

from moco_fast.ops import _backends, _custom, _validate
from moco_fast.ops._backends import BACKENDS, OPS, available_backends, resolve

__all__ = ["infonce", "momentum_update_", "enqueue_", "available_backends", "BACKENDS", "OPS"]


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
    name = resolve("infonce", backend, q.device.type)
    loss, _, stats = _custom.infonce_op(q, k, queue, float(temperature), name, _backends.allow_tf32())
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
    _validate.check_momentum_update(params_k, params_q, m)
    if not params_k:
        return
    name = resolve("momentum_update", backend, params_k[0].device.type)
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
    name = resolve("enqueue", backend, queue.device.type)
    if _eager(queue):
        _custom.kernel("enqueue_", name)(queue, ptr, keys)
    else:
        _custom.enqueue_op(queue, ptr, keys, name)


def _eager(t: torch.Tensor) -> bool:
    """Plain eager call: the ops without autograd skip the custom-op dispatch, which costs tens of µs a
    call, and reach their kernel directly. Under torch.compile (and for tensor subclasses such as fake
    tensors) the registered op is used, so graphs see a declared mutation."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor
