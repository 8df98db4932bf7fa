"""Momentum (EMA) update of the key encoder in Triton: every pair of tensors in ONE launch.

p_k <- m * p_k + (1 - m) * p_q, computed as a = fp32(p_k) * m; b = fp32(p_q) * (1 - m);
p_k = cast(a + b), the two roundings of the reference (fp-fusion is off, so no FMA).

The kernel reads a device-side table (int64) built once per pair of lists and cached:
  [5 * t + 0..4]     for tensor t: address of p_k, address of p_q, numel, first block, dtype code
  [5 * T + b]        for block b: the index of its tensor (the block -> tensor map)
so program b finds its tensor with two loads and a repeated call copies nothing to the device.
Mixed dtypes share the launch: the dtype code picks the branch (one compiled kernel per branch
is inlined; a program takes one). Offsets are int64, so tensors above 2**31 elements work.
The same path runs under TRITON_INTERPRET=1 (integer-to-pointer casts work on host memory).

Variants (the `variant` argument of momentum_update_; moco_fast/ops/variants.py chooses it); "v1" is the
default until a GPU run has timed and self-checked v2:
  v1  every access masked by `offs < numel` on a pointer made from an integer: the compiler knows neither
      the pointer's alignment nor a constant mask, so every load and store is a scalar 4-byte access.
  v2  the same table, but a block that lies wholly inside its tensor takes an unmasked path, and the last
      (partial) block of each tensor the masked one: one runtime branch per program. When every address
      in the table is 16-byte aligned (the host checks; PyTorch's allocator gives 512 B), the pointers are
      declared so with tl.multiple_of (the integer-to-pointer cast drops what the compiler would know of a
      pointer argument) and the offsets with tl.multiple_of / tl.max_contiguous, so the full blocks use
      16-byte vector loads and stores. Same arithmetic in the same order: bitwise the same result as v1.

Floors on an H200 (ResNet-50: 161 tensors, 25.6M fp32): 12 bytes per element from and to DRAM
(read p_k and p_q, write p_k) = 307 MB, ~64 us at 4.8 TB/s (~72 us at the ~4.3 TB/s a copy reaches);
no reuse, so L2 (60 MB, smaller than the 307 MB) and shared memory (unused) add nothing; 3 fp32 FLOPs
per element (77 MFLOP), nothing next to the bytes. The table costs 40 B per tensor + 8 B per block.
"""
from collections import OrderedDict
from typing import List, Optional

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # elements per program: at 8 warps, 16 elements (4 x 16 B loads) per thread per tensor
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CACHE_SIZE = 8
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_PINNED: dict = {}  # tables a captured CUDA graph points to: never freed
VARIANTS = ("v1", "v2")
_ALIGN = 16  # bytes of one vector access (the literal 16 in _ema_block_v2)


@triton.jit
def _record(table_ptr, n_tensors, pid):
    """Program pid's tensor from the table: (address of p_k, address of p_q, numel, first block, dtype code)."""
    rec = table_ptr + 5 * tl.load(table_ptr + 5 * n_tensors + pid)
    return tl.load(rec), tl.load(rec + 1), tl.load(rec + 2), tl.load(rec + 3), tl.load(rec + 4)


@triton.jit
def _momentum(m_ptr, m_val, om_val, HAS_M_TENSOR: tl.constexpr):
    """(m, 1 - m) in fp32; from the tensor: 1 - m in fp64, then both rounded, as the reference with float(m)."""
    if HAS_M_TENSOR:
        mt = tl.load(m_ptr).to(tl.float64)
        return mt.to(tl.float32), (1.0 - mt).to(tl.float32)
    return m_val, om_val


@triton.jit
def _ema_block(k_addr, q_addr, offs, mask, m, om, DT: tl.constexpr):
    pk = k_addr.to(tl.pointer_type(DT))
    pq = q_addr.to(tl.pointer_type(DT))
    a = tl.load(pk + offs, mask=mask).to(tl.float32) * m
    b = tl.load(pq + offs, mask=mask).to(tl.float32) * om
    tl.store(pk + offs, (a + b).to(DT), mask=mask)


@triton.jit
def _ema_block_v2(k_addr, q_addr, start, numel, m, om, DT: tl.constexpr, ALIGNED: tl.constexpr,
                  BLOCK: tl.constexpr):
    pk = k_addr.to(tl.pointer_type(DT))
    pq = q_addr.to(tl.pointer_type(DT))
    if ALIGNED:  # the host checked every address of the table; the cast lost it
        pk = tl.multiple_of(pk, 16)
        pq = tl.multiple_of(pq, 16)
    # (the hints sit on the ops that make the values; on a callee's argument, as `start` is here, a hint
    # would be dropped, which is why the caller marks start)
    offs = start + tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK).to(tl.int64)
    if start + BLOCK <= numel:  # a full block: no mask, so nothing stops vector accesses
        a = tl.load(pk + offs).to(tl.float32) * m
        b = tl.load(pq + offs).to(tl.float32) * om
        tl.store(pk + offs, (a + b).to(DT))
    else:  # the tensor's one partial block
        mask = offs < numel
        a = tl.load(pk + offs, mask=mask).to(tl.float32) * m
        b = tl.load(pq + offs, mask=mask).to(tl.float32) * om
        tl.store(pk + offs, (a + b).to(DT), mask=mask)


@triton.jit
def _momentum_update_v2_kernel(table_ptr, n_tensors, m_ptr, m_val, om_val, HAS_M_TENSOR: tl.constexpr,
                               ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    k_addr, q_addr, numel, first, code = _record(table_ptr, n_tensors, pid)
    start = tl.multiple_of((pid - first) * BLOCK, BLOCK)
    m, om = _momentum(m_ptr, m_val, om_val, HAS_M_TENSOR)
    if code == 0:
        _ema_block_v2(k_addr, q_addr, start, numel, m, om, tl.float32, ALIGNED, BLOCK)
    elif code == 1:
        _ema_block_v2(k_addr, q_addr, start, numel, m, om, tl.bfloat16, ALIGNED, BLOCK)
    else:
        _ema_block_v2(k_addr, q_addr, start, numel, m, om, tl.float16, ALIGNED, BLOCK)


@triton.jit
def _momentum_update_kernel(table_ptr, n_tensors, m_ptr, m_val, om_val,
                            HAS_M_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    k_addr, q_addr, numel, first, code = _record(table_ptr, n_tensors, pid)
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    m, om = _momentum(m_ptr, m_val, om_val, HAS_M_TENSOR)
    if code == 0:
        _ema_block(k_addr, q_addr, offs, mask, m, om, tl.float32)
    elif code == 1:
        _ema_block(k_addr, q_addr, offs, mask, m, om, tl.bfloat16)
    else:
        _ema_block(k_addr, q_addr, offs, mask, m, om, tl.float16)


def _check(params_k: List[torch.Tensor]) -> None:
    """What these kernels assume beyond moco_fast.ops.momentum_update_'s checks (pairs of one shape, dtype and
    dense strides on one device, m_tensor one element there): a dtype with a code, so no fp64."""
    for i, pk in enumerate(params_k):
        if pk.dtype not in _CODES:
            raise TypeError(f"momentum_update_: pair {i} has dtype {pk.dtype}; the Triton kernel takes "
                            "float32, bfloat16 and float16")


def _table(params_k: List[torch.Tensor], params_q: List[torch.Tensor]):
    """(device table, number of blocks), cached by addresses, dtypes and sizes (LRU of 8). A table used
    while a CUDA graph is captured is pinned for the life of the process: the graph keeps its address and
    replays read it, so evicting it would let a replay read freed memory and write anywhere."""
    key = (params_k[0].device,) + tuple((pk.data_ptr(), pq.data_ptr(), pk.dtype, pk.numel())
                                         for pk, pq in zip(params_k, params_q))
    capturing = params_k[0].is_cuda and torch.cuda.is_current_stream_capturing()
    hit = _PINNED.get(key) or _TABLES.get(key)
    if hit is not None:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            if capturing:
                _PINNED[key] = _TABLES.pop(key)
        return hit
    if capturing:  # building it would copy from the host inside the capture
        raise RuntimeError("momentum_update_ (triton): these tensors have no device table yet; call the op "
                           "once before capturing a CUDA graph (a warm-up step builds it)")
    counts = torch.tensor([triton.cdiv(pk.numel(), _BLOCK) for pk in params_k], dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    rec = torch.tensor([[pk.data_ptr(), pq.data_ptr(), pk.numel(), 0, _CODES[pk.dtype]]
                        for pk, pq in zip(params_k, params_q)], dtype=torch.int64)
    rec[:, 3] = first
    owner = torch.repeat_interleave(torch.arange(len(params_k), dtype=torch.int64), counts)
    table = torch.cat([rec.flatten(), owner]).to(params_k[0].device)
    aligned = all(p.data_ptr() % _ALIGN == 0 for pair in zip(params_k, params_q) for p in pair)
    hit = (table, int(counts.sum()), aligned)
    _TABLES[key] = hit
    if len(_TABLES) > _CACHE_SIZE:
        _TABLES.popitem(last=False)
    return hit


def momentum_update_(params_k: List[torch.Tensor], params_q: List[torch.Tensor],
                     m_tensor: Optional[torch.Tensor], m: float, variant: str = "v1") -> None:
    """For every pair, p_k <- m * p_k + (1 - m) * p_q in place; m is read from m_tensor (one
    element on the params' device, read on the device) when given, else the float m.
    variant: "v1" or "v2" (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"momentum_update_: unknown Triton variant {variant!r}; choose one of {VARIANTS}")
    if len(params_k) == 0 and len(params_q) == 0:
        return
    _check(params_k)
    table, n_blocks, aligned = _table(params_k, params_q)
    if n_blocks == 0:
        return
    m = float(m)
    args = (table, len(params_k), m_tensor if m_tensor is not None else table, m, 1.0 - m)
    with torch.cuda.device(table.device if table.is_cuda else -1):  # launch on the tensors' GPU
        if variant == "v2":
            _momentum_update_v2_kernel[(n_blocks,)](*args, HAS_M_TENSOR=m_tensor is not None, ALIGNED=aligned,
                                                    BLOCK=_BLOCK, num_warps=8, enable_fp_fusion=False)
        else:
            _momentum_update_kernel[(n_blocks,)](*args, HAS_M_TENSOR=m_tensor is not None, BLOCK=_BLOCK,
                                                 num_warps=8, enable_fp_fusion=False)
