"""momentum_update: the key encoder's EMA, p_k <- m * p_k + (1 - m) * p_q, every pair in one call.

Layers: kernel (csrc/{cpu,cuda}/momentum_update.*, kernels/momentum_update.py) -> launcher
(torch.ops.moco_fast.momentum_update_kernel_, kernels/momentum_update.py:momentum_update_) -> custom op
moco_fast::momentum_update_ with its fake -> `momentum_update_`. Spec: reference.momentum_update_ref_.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Optional

import torch

from moco_fast import reference
from moco_fast.ops import _backends, variants
from moco_fast.ops._checks import FLOAT_DTYPES, check_tensor, dense, fail

Tensor = torch.Tensor
OP = "momentum_update_"


# The kernel on each backend, (params_k, params_q, m_tensor or None, m, variant) -> None, params_k updated in
# place; variant is variants.variant("momentum_update", backend).
def _cpp(params_k, params_q, m_tensor, m, variant) -> None:  # csrc/cpu/momentum_update.cpp, csrc/cuda/*.cu
    torch.ops.moco_fast.momentum_update_kernel_(params_k, params_q, m_tensor, m)


def _triton(params_k, params_q, m_tensor, m, variant) -> None:
    from moco_fast.kernels.momentum_update import momentum_update_  # Triton is imported on first use only
    momentum_update_(params_k, params_q, m_tensor, m, variant)


def _reference(params_k, params_q, m_tensor, m, variant) -> None:
    reference.momentum_update_ref_(params_k, params_q, m if m_tensor is None else m_tensor)


_backends.register("momentum_update", {"reference": _reference, "cpu": _cpp, "cuda": _cpp, "triton": _triton})


def kernel(backend: str):
    """The kernel function `backend` runs (the custom op and the self-check call it through here)."""
    return _backends.kernel("momentum_update", backend)

# Three caches keyed by the same list of tensors, one per layer, each holding only what its layer needs:
# here, that the pairs passed the checks (161 pairs cost more to check than the EMA itself); in
# kernels/momentum_update.py and csrc/cuda/momentum_update.cu, the device table of addresses each kernel
# reads (built once on the host and copied; a CUDA graph replays the copy's address, so those tables also
# outlive captures). A kernel cannot use this layer's cache (kernels never import moco_fast.ops) nor the
# other kernel's table (a different layout, in another language).
_CHECKED: "OrderedDict[tuple, tuple]" = OrderedDict()  # pairs of lists already checked, LRU
_CHECKED_SIZE = 8


def check(params_k, params_q, m) -> tuple:
    """Checks the pairs (once per list of tensors: the encoder's 161 pairs cost ~0.2-2 ms a call on a CPU
    core, more than the kernel on a GPU) and m (every call). Returns the dtypes of params_k, in order."""
    _check_momentum(m, params_k[0].device if len(params_k) else None)
    key = None if torch.compiler.is_compiling() else _pairs_key(params_k, params_q)
    if key is None:  # traced once per graph, or not plain tensors: check without the cache
        _check_pairs(params_k, params_q)
        return tuple(dict.fromkeys(p.dtype for p in params_k))
    hit = _CHECKED.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], itertools.chain(params_k, params_q))):
        _CHECKED.move_to_end(key)
        return hit[1]
    _check_pairs(params_k, params_q)
    dtypes = tuple(dict.fromkeys(p.dtype for p in params_k))
    _CHECKED[key] = ([weakref.ref(t) for t in itertools.chain(params_k, params_q)], dtypes)
    if len(_CHECKED) > _CHECKED_SIZE:
        _CHECKED.popitem(last=False)
    return dtypes


def _pairs_key(params_k, params_q) -> tuple | None:
    """The storage of every tensor (a parameter whose .data was replaced, e.g. by model.half(), misses); a
    hit is confirmed against weakrefs to the very tensor objects, so new tensors at old addresses miss.
    None for anything but plain tensors (fake tensors, wrong types): the full check explains those."""
    try:
        return len(params_k), tuple(map(torch.Tensor.data_ptr, itertools.chain(params_k, params_q)))
    except (TypeError, RuntimeError):
        return None


def _check_pairs(params_k, params_q) -> None:
    if len(params_k) != len(params_q):
        fail(OP, f"params_k and params_q must have the same length; got {len(params_k)} and {len(params_q)}")
    for i, (pk, pq) in enumerate(zip(params_k, params_q)):
        # the common case in a few C calls (this runs for every tensor of the encoder, every step)
        if (type(pk) is torch.Tensor and type(pq) is torch.Tensor and pk.dtype in FLOAT_DTYPES
                and pq.dtype == pk.dtype and pq.device == pk.device and pk.is_contiguous() and pq.is_contiguous()
                and pk.shape == pq.shape):
            continue
        check_tensor(OP, f"params_k[{i}]", pk)
        check_tensor(OP, f"params_q[{i}]", pq, dtypes=(pk.dtype,), device=pk.device)
        if pk.shape != pq.shape:
            fail(OP, f"params_k[{i}] has shape {tuple(pk.shape)} but params_q[{i}] has {tuple(pq.shape)}")
        if pk.stride() != pq.stride() or not dense(pk):
            fail(OP, f"params_k[{i}] and params_q[{i}] must be dense with equal strides; "
                     f"got strides {pk.stride()} and {pq.stride()}")


def _check_momentum(m, device) -> None:
    if isinstance(m, torch.Tensor):
        device = device if device is not None else m.device
        if m.numel() != 1 or m.device != device or not m.is_floating_point():
            fail(OP, f"m as a tensor must be one floating-point element on {device}; "
                     f"got shape {tuple(m.shape)}, {m.dtype} on {m.device}")
    elif not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
        fail(OP, f"m must be a float in [0, 1] or a one-element tensor; got {m!r}")


def _momentum_update(params_k: list[Tensor], params_q: list[Tensor], m_tensor: Optional[Tensor], m: float,
                     backend: str, variant: str) -> None:
    """p_k <- m * p_k + (1 - m) * p_q for every pair, m read from m_tensor when it is given."""
    kernel(backend)(params_k, params_q, m_tensor, m, variant)


momentum_update_op = torch.library.custom_op("moco_fast::momentum_update_", _momentum_update,
                                             mutates_args=("params_k",))


@momentum_update_op.register_fake
def _(params_k, params_q, m_tensor, m, backend, variant):
    return None


def momentum_update_(params_k, params_q, m, backend: str = "auto") -> None:
    """In place, for every pair: p_k <- m * p_k + (1 - m) * p_q, math in fp32.

    params_k, params_q: sequences of T tensors, pair i of equal shape (any), dtype (fp32, bf16, fp16; fp64
    on the reference and cpu backends) and strides (dense). m: a float in [0, 1], or a one-element floating-point
    tensor on the params' device (a momentum schedule then needs no recompilation and can live in a CUDA
    graph).
    """
    params_k, params_q = list(params_k), list(params_q)
    dtypes = check(params_k, params_q, m)
    if not params_k:
        return
    name = _backends.resolve("momentum_update", backend, params_k[0].device, dtypes)
    m_tensor, m_float = (m, 0.0) if isinstance(m, torch.Tensor) else (None, float(m))
    args = (params_k, params_q, m_tensor, m_float, name, variants.variant("momentum_update", name))
    if _backends.skips_dispatch(params_k[0]):
        _momentum_update(*args)
    else:
        momentum_update_op(*args)
