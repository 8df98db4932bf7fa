"""Ring-buffer enqueue of keys into the MoCo queue in Triton, with the pointer on the device.

Two launches on one stream, no host synchronisation:
  1. `_enqueue_rows_kernel`: each program copies ROWS surviving keys (the last min(B, K)) x
     BLOCK_C columns to rows (ptr + i) % K, casting to the queue's dtype; every program reads
     ptr, so ptr cannot change during this launch.
  2. `_enqueue_advance_kernel`: one program, ptr <- (ptr + B) % K, ordered after 1 by the stream.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _enqueue_rows_kernel(queue_ptr, ptr_ptr, keys_ptr, K, C, n_rows, skip, stride_kb, stride_kc,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)    # surviving key r is key skip + r
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < n_rows)[:, None] & (cols < C)[None, :]
    start = tl.load(ptr_ptr)
    start = (start % K + K) % K                                     # Python's modulo for a negative ptr
    i = skip + r
    dst = (start + i) % K
    x = tl.load(keys_ptr + i[:, None] * stride_kb + cols[None, :] * stride_kc, mask=mask)
    tl.store(queue_ptr + dst[:, None] * C + cols[None, :], x.to(queue_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _enqueue_advance_kernel(ptr_ptr, K, B):
    p = tl.load(ptr_ptr)
    p = (p % K + K) % K
    tl.store(ptr_ptr, (p + B % K) % K)


def enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """queue: (K, C) contiguous, K >= 1, ptr: int64 (1,), keys: (B, C) any dtype and strides, all on one device
    (moco_fast.ops.enqueue_ checks all of it; these kernels assume nothing more).
    queue[(ptr + i) % K] = keys[i] for i < B (the last K keys when B > K); ptr <- (ptr + B) % K."""
    K, C = queue.shape
    B = keys.shape[0]
    n_rows = min(B, K)  # keys that survive: when B > K the first B - K are overwritten anyway
    with torch.cuda.device(queue.device if queue.is_cuda else -1):  # launch on the tensors' GPU
        if n_rows > 0 and C > 0:
            block_c = min(1024, triton.next_power_of_2(C))
            rows = max(1, min(16, 4096 // block_c))  # ~4K elements per program
            grid = (triton.cdiv(n_rows, rows), triton.cdiv(C, block_c))
            _enqueue_rows_kernel[grid](queue, ptr, keys, K, C, n_rows, B - n_rows, keys.stride(0), keys.stride(1),
                                       ROWS=rows, BLOCK_C=block_c, num_warps=4)
        _enqueue_advance_kernel[(1,)](ptr, K, B, num_warps=1)
