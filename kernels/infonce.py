"""InfoNCE forward against a queue in Triton: loss, dL/dq and acc@1/acc@5 in ONE pass over the queue.

Three launches, no atomics, so the same inputs give bitwise identical outputs run after run:
  1. `_infonce_partial_kernel`, grid (row blocks, splits): each program streams its share of the
     queue with an online log-sum-exp (base 2) and accumulates the softmax-weighted keys, an
     fp32 [BLOCK_N, BLOCK_C] tile, plus a count of negatives scoring above the positive.
  2. `_infonce_combine_kernel`, grid (row blocks, column blocks): merges the positive and the
     splits in a fixed order; writes dL/dq and, per row, the loss and the count.
  3. `_infonce_finish_kernel`, one program: the means (loss, acc1, acc5) in a fixed order.
The N x (K+1) logits never exist; the workspace is splits * N * (C + 3) fp32 values, which the
split heuristic keeps under 2 MiB where that still leaves the GPU about one wave of programs.

Precision of the tensor-core dots (`allow_tf32`):
  fp32 queue: input_precision "ieee" (False) or "tf32" (True).
  bf16/fp16 queue: operands in the queue's dtype, fp32 accumulation. With allow_tf32=False an
  operand that is not exactly representable (fp32 q, the fp32 probabilities) is split into
  hi + lo parts in that dtype (two dots), which gives about 16 mantissa bits, near fp32 results;
  with True it is rounded once (one dot), the 16-bit analogue of TF32.

Variants (the `variant` argument of infonce_fwd; moco_fast/ops/variants.py chooses it); "v1" stays the
default until a GPU run has timed and self-checked the other:
  v1      this file's partial kernel with pointer loads: 32-row blocks, splits for a 2 MiB workspace (~1 wave).
  hopper  the same kernel at kernels/infonce_hopper.py's shapes (>= 64 rows, SM-sized splits, TMA
          descriptors, autotuned; "hopper:<config>" forces one config); the same workspace layout, merged by
          the same combine and finish kernels.
          Rows wider than 256 (C > 256) run v1's shapes under either name.

Floors of v1, H200, N=256 C=128 K=65,536 (x16 at K=1,048,576 but the workspace):
  MMA: 4*N*K*C = 8.6 GFLOP: 17.4 us at ~494 TFLOP/s TF32, but BLOCK_N=32 < 64 rules out wgmma:
       mma.sync reaches about 2/3 of it; 8.7 us at ~989 for a 16-bit queue (allow_tf32=False: x2).
  DRAM: the queue once (32 MiB fp32: 7.0 us at 4.8 TB/s; 16 MiB bf16: 3.5 us) + the 1.9 MiB workspace.
  L2 -> SM: the queue once per 32-row block: 8 x 32 MiB = 256 MiB (~30 us at ~9 TB/s of L2 bandwidth).
  shared memory: each key tile (64 x 128 fp32 = 32 KB) read ~4x (both products, 2 warps' fragments).
"""
import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_WORKSPACE_BYTES = 2 << 20  # the budget the split heuristic aims for (design target at K=65536)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_C = 1024  # the register tile is [BLOCK_N, next_pow2(C)]
_SM_COUNT = {}
VARIANTS = ("v1", "hopper")
# hopper's configs were sized (registers, shared memory) at C=128; above 256 its [BLOCK_N, C] tiles
# would not fit, so wider rows run v1's kernel (still the same backend and result)
_HOPPER_MAX_C = 256


@triton.jit
def _partial_rows(q_ptr, k_ptr, queue_ptr, pos_ptr, rows, cols, row_ok, rc_ok, stride_q, stride_k,
                  QUEUE_FP32: tl.constexpr):
    """A block of queries as the dots take them (q_hi, and q_lo = what the queue's dtype loses of fp32 q) and
    their raw positive logits; every split computes them identically, split 0 hands them to the combine."""
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + rows64[:, None] * stride_q + cols[None, :], mask=rc_ok, other=0.0).to(tl.float32)
    kk = tl.load(k_ptr + rows64[:, None] * stride_k + cols[None, :], mask=rc_ok, other=0.0).to(tl.float32)
    pos = tl.sum(q * kk, axis=1)
    if tl.program_id(1) == 0:
        tl.store(pos_ptr + rows, pos, mask=row_ok)
    kdt = queue_ptr.dtype.element_ty
    if QUEUE_FP32:
        q_hi = q
        q_lo = q  # unused
    else:
        q_hi = q.to(kdt)
        q_lo = (q - q_hi.to(tl.float32)).to(kdt)
    return q_hi, q_lo, pos


@triton.jit
def _partial_step(q_hi, q_lo, kt, key_ok, pos, m_i, l_i, above, acc, scale2, P_SCALE, QUEUE_FP32: tl.constexpr,
                  SPLIT_Q: tl.constexpr, SPLIT_P: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile kt (BLOCK_K x BLOCK_C) into the running (max, sum of exp, count above, weighted key sum)."""
    kdt = kt.dtype
    if QUEUE_FP32:
        d = tl.dot(q_hi, tl.trans(kt), input_precision=PRECISION)      # BLOCK_N x BLOCK_K
    else:
        d = tl.dot(q_hi, tl.trans(kt))
        if SPLIT_Q:
            d = tl.dot(q_lo, tl.trans(kt), d)
    d = tl.where(key_ok[None, :], d, float("-inf"))
    # the reference compares unscaled logits; scaling by 1/T > 0 keeps the order
    above += tl.sum((d > pos[:, None]).to(tl.int32), axis=1)
    s = d * scale2
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    # P_SCALE (2**14 for fp16) lifts small weights out of fp16's subnormal range
    p = p * P_SCALE
    if QUEUE_FP32:
        acc = tl.dot(p, kt, acc, input_precision=PRECISION)
    else:
        p_hi = p.to(kdt)
        acc = tl.dot(p_hi, kt, acc)
        if SPLIT_P:
            acc = tl.dot((p - p_hi.to(tl.float32)).to(kdt), kt, acc)
    return m_new, l_i, above, acc


@triton.jit
def _partial_store(ws_acc, ws_m, ws_l, ws_above, rows, cols, row_ok, rc_ok, N, C, m_i, l_i, above, acc):
    """This split's partial results for its rows, at split-major offsets (the combine's layout)."""
    base = tl.program_id(1).to(tl.int64) * N
    tl.store(ws_m + base + rows, m_i, mask=row_ok)
    tl.store(ws_l + base + rows, l_i, mask=row_ok)
    tl.store(ws_above + base + rows, above, mask=row_ok)
    tl.store(ws_acc + (base + rows.to(tl.int64))[:, None] * C + cols[None, :], acc, mask=rc_ok)


@triton.jit
def _infonce_partial_kernel(q_ptr, k_ptr, queue_ptr, queue_desc, ws_acc, ws_m, ws_l, ws_above, pos_ptr,
                            N, C, K, stride_q, stride_k, scale2, P_SCALE,
                            QUEUE_FP32: tl.constexpr, SPLIT_Q: tl.constexpr, SPLIT_P: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_C: tl.constexpr, USE_DESC: tl.constexpr):
    """Both variants' partial pass: v1 loads key tiles through pointers (queue_desc unused), hopper through
    the TMA descriptor queue_desc when USE_DESC."""
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    rc_ok = row_ok[:, None] & col_ok[None, :]
    q_hi, q_lo, pos = _partial_rows(q_ptr, k_ptr, queue_ptr, pos_ptr, rows, cols, row_ok, rc_ok, stride_q,
                                    stride_k, QUEUE_FP32)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_N], tl.float32)                 # sum of exp2(s - m_i)
    above = tl.zeros([BLOCK_N], tl.int32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)       # sum of exp2(s - m_i) * key * P_SCALE
    # split s owns queue blocks [s*kb/splits, (s+1)*kb/splits): balanced, never empty (splits <= kb)
    kb = tl.cdiv(K, BLOCK_K).to(tl.int64)
    for b in range(pid_s * kb // n_splits, (pid_s + 1) * kb // n_splits):
        keys = b * BLOCK_K + tl.arange(0, BLOCK_K)
        key_ok = keys < K
        if USE_DESC:  # TMA: rows past K and columns past C arrive as zeros
            kt = queue_desc.load([tl.cast(b * BLOCK_K, tl.int32), 0])
        else:
            kt = tl.load(queue_ptr + keys[:, None] * C + cols[None, :],
                         mask=key_ok[:, None] & col_ok[None, :], other=0.0)  # BLOCK_K x BLOCK_C
        m_i, l_i, above, acc = _partial_step(q_hi, q_lo, kt, key_ok, pos, m_i, l_i, above, acc, scale2, P_SCALE,
                                             QUEUE_FP32, SPLIT_Q, SPLIT_P, PRECISION)
    _partial_store(ws_acc, ws_m, ws_l, ws_above, rows, cols, row_ok, rc_ok, N, C, m_i, l_i, above, acc)


@triton.jit
def _infonce_combine_kernel(k_ptr, ws_acc, ws_m, ws_l, ws_above, pos_ptr, grad_ptr, loss_rows, above_rows,
                            N, C, stride_k, n_splits, scale2, inv_temperature, grad_scale, P_SCALE,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    pos2 = pos * scale2
    # Pass 1 over the splits (BLOCK_S at a time, fixed order): global max, sum of exp, count.
    m_glob = pos2
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        sr_ok = (ss < n_splits)[:, None] & row_ok[None, :]
        idx = ss.to(tl.int64)[:, None] * N + rows[None, :]                   # BLOCK_S x BLOCK_N
        m_s = tl.load(ws_m + idx, mask=sr_ok, other=float("-inf"))
        m_glob = tl.maximum(m_glob, tl.max(m_s, axis=0))
    l_neg = tl.zeros([BLOCK_N], tl.float32)
    above = tl.zeros([BLOCK_N], tl.int32)
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        sr_ok = (ss < n_splits)[:, None] & row_ok[None, :]
        idx = ss.to(tl.int64)[:, None] * N + rows[None, :]
        m_s = tl.load(ws_m + idx, mask=sr_ok, other=float("-inf"))
        l_s = tl.load(ws_l + idx, mask=sr_ok, other=0.0)
        l_neg += tl.sum(l_s * tl.exp2(m_s - m_glob[None, :]), axis=0)
        above += tl.sum(tl.load(ws_above + idx, mask=sr_ok, other=0), axis=0)
    l_pos = tl.exp2(pos2 - m_glob)
    l_tot = l_pos + l_neg
    if pid_c == 0:
        # loss_i = logsumexp - positive, kept as a difference of log2 terms to avoid cancellation
        tl.store(loss_rows + rows, (m_glob - pos2 + tl.log2(l_tot)) * 0.6931471805599453, mask=row_ok)
        tl.store(above_rows + rows, above, mask=row_ok)

    # Pass 2: g = sum_j p_j key_j - k = -(l_neg / l_tot) k + sum_s w_s acc_s; the positive's
    # coefficient p_0 - 1 is written as -l_neg / l_tot so it keeps its precision when p_0 ~ 1.
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rc_ok = row_ok[:, None] & (cols < C)[None, :]
    kk = tl.load(k_ptr + rows64[:, None] * stride_k + cols[None, :], mask=rc_ok, other=0.0).to(tl.float32)
    g = -(l_neg / l_tot)[:, None] * kk
    inv_norm = 1.0 / (l_tot * P_SCALE)
    for s0 in range(0, n_splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < n_splits
        sr_ok = s_ok[:, None] & row_ok[None, :]
        idx = ss.to(tl.int64)[:, None] * N + rows[None, :]
        w = tl.exp2(tl.load(ws_m + idx, mask=sr_ok, other=float("-inf")) - m_glob[None, :]) * inv_norm[None, :]
        a = tl.load(ws_acc + idx[:, :, None] * C + cols[None, None, :],
                    mask=sr_ok[:, :, None] & (cols < C)[None, None, :], other=0.0)   # S x N x C
        g += tl.sum(w[:, :, None] * a, axis=0)
    tl.store(grad_ptr + rows64[:, None] * C + cols[None, :], g * grad_scale, mask=rc_ok)


@triton.jit
def _infonce_finish_kernel(loss_rows, above_rows, loss_ptr, stats_ptr, N, BLOCK: tl.constexpr):
    tot = tl.zeros([BLOCK], tl.float64)  # fp64 so the mean of many rows loses nothing
    top1 = tl.zeros([BLOCK], tl.int32)
    top5 = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < N
        tot += tl.load(loss_rows + offs, mask=ok, other=0.0).to(tl.float64)
        a = tl.load(above_rows + offs, mask=ok, other=5)
        top1 += (a == 0).to(tl.int32)
        top5 += (a < 5).to(tl.int32)
    tl.store(loss_ptr, (tl.sum(tot, axis=0) / N).to(tl.float32))
    tl.store(stats_ptr, tl.sum(top1, axis=0).to(tl.float32) / N)
    tl.store(stats_ptr + 1, tl.sum(top5, axis=0).to(tl.float32) / N)


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _config(N: int, C: int, K: int, queue: torch.Tensor, allow_tf32: bool) -> dict:
    """Block sizes, split count and launch options; the one place to tune for a GPU."""
    block_c = max(16, triton.next_power_of_2(C))  # tl.dot needs every dim >= 16
    if queue.device.type != "cuda":
        # interpreter: few, fat programs (each Triton op costs a numpy call per program)
        block_n = min(32, max(16, triton.next_power_of_2(N)))
        block_k = 64 if K <= 8192 else 1024  # the training-size tests in seconds, not minutes
        splits = min(triton.cdiv(K, block_k), 3)
        # BLOCK_S=2 < splits, so the chunked merge loop and its masks run here too
        return dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=block_c, splits=splits, warps={}, comb_c=32, comb_s=2)
    # key tile <= 32 KB of shared memory per pipeline stage: C=128 gives 64 rows fp32, 128 bf16
    block_k = min(128, max(16, 32768 // (block_c * queue.element_size())))
    if queue.dtype == torch.float32 and not allow_tf32:
        block_k = min(block_k, 32)  # "ieee" dots run on FMA units with operands in registers
    # The accumulator and q live in registers. BLOCK_N = 32 at C=128 is what the 2 MiB workspace
    # allows with ~1 wave (64 would take wgmma but leave half the SMs idle at N=256). ptxas for
    # sm_90 (no GPU here): 8 warps at BLOCK_N * BLOCK_C >= 4K removes the spills of 4 warps.
    block_n = 64 if block_c <= 64 else 32 if block_c <= 256 else 16
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    num_warps = 4 if block_n * block_c < 4096 else 8
    rb, kb = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    sms = _sm_count(queue.device)
    # Aim for 2 waves of programs, but keep the workspace within budget (2 MiB, or 1/64 of the
    # queue for huge queues) as long as that leaves ~3/4 of a wave: at N=256, C=128, K=65536 that
    # is 8 row blocks x 15 splits, 1.9 MiB; at K=2**20, 8 x 33.
    budget = max(_WORKSPACE_BYTES, queue.numel() * queue.element_size() // 64)
    s_mem = max(1, budget // (N * (C + 3) * 4))
    splits = max(1, min(kb, triton.cdiv(2 * sms, rb), max(s_mem, triton.cdiv(3 * sms, 4 * rb))))
    warps = dict(num_warps=num_warps, num_stages=3 if block_c <= 128 else 2)
    # combine: 16 x 16 output tiles (128 programs at N=256, C=128), 16 splits per load
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=block_c, splits=splits, warps=warps, comb_c=16, comb_s=16)


def _check(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> None:
    """What these kernels assume beyond moco_fast.ops.infonce's checks (shapes, devices, a contiguous queue,
    N, K >= 1, the temperature): no fp64, unit column strides for q and k, and C within the register tile."""
    for name, t in (("q", q), ("k", k), ("queue", queue)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"infonce_fwd: {name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"infonce_fwd: rows of {name} must be contiguous, got strides {t.stride()}")
    if q.shape[1] > _MAX_C:
        raise ValueError(f"infonce_fwd: need C <= {_MAX_C}; got C={q.shape[1]}")


def _variant(name: str) -> tuple[str, str]:
    """("v1" | "hopper", a forced hopper config or "") from the variant argument."""
    which, _, config = name.partition(":")
    if which not in VARIANTS or (config and which != "hopper"):
        raise ValueError(f"infonce_fwd: unknown Triton variant {name!r}; choose one of {VARIANTS} "
                         "(or hopper:<config>)")
    return which, config


def _launch_v1(cfg: dict, grid, args: tuple, constexprs: dict) -> None:
    """args: (q, k, queue, ws_acc, ...); the queue stands in for the descriptor v1 does not use."""
    _infonce_partial_kernel[grid](*args[:3], args[2], *args[3:], **constexprs, BLOCK_N=cfg["BLOCK_N"],
                                  BLOCK_K=cfg["BLOCK_K"], BLOCK_C=cfg["BLOCK_C"], USE_DESC=False, **cfg["warps"])


def infonce_fwd(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, inv_temperature: float,
                allow_tf32: bool, variant: str = "v1"):
    """q: (N, C), k: (N, C), queue: (K, C), rows contiguous. Returns (loss: fp32 0-dim,
    grad_q: fp32 (N, C) = dL/dq for an upstream gradient of 1, stats: fp32 (2,) = [acc1, acc5]).
    variant: "v1", "hopper" or "hopper:<config>" (module docstring)."""
    which, forced = _variant(variant)
    _check(q, k, queue)
    N, C = q.shape
    K = queue.shape[0]
    v1 = _config(N, C, K, queue, allow_tf32)
    if which == "v1" or C > _HOPPER_MAX_C:
        return _run(q, k, queue, inv_temperature, allow_tf32, v1, _launch_v1)
    from . import infonce_hopper as hop  # imported only when the variant asks for it
    launch = functools.partial(hop.launch_partial, _infonce_partial_kernel)
    sms = _sm_count(q.device) if q.is_cuda else 0
    cfg = hop.choose(q, k, queue, allow_tf32, sms, forced,
                     run=lambda c: _run(q, k, queue, inv_temperature, allow_tf32, c, launch),
                     reference=lambda: _run(q, k, queue, inv_temperature, allow_tf32, v1, _launch_v1))
    return _run(q, k, queue, inv_temperature, allow_tf32, cfg, launch)


def _run(q, k, queue, inv_temperature: float, allow_tf32: bool, cfg: dict, launch_partial):
    """Workspace, partial pass (launch_partial(cfg, grid, args, constexprs)), combine and finish."""
    N, C = q.shape
    K = queue.shape[0]
    splits, dev = cfg["splits"], q.device
    f32 = dict(device=dev, dtype=torch.float32)
    # one workspace allocation, cut into flat views (the kernels index them by hand):
    # acc [splits, N, C], max, sum, count [splits, N], then pos, loss, count per row [N]
    ws_acc, ws_m, ws_l, ws_above, pos, loss_rows, above_rows = torch.empty(
        splits * N * (C + 3) + 3 * N, **f32).split([splits * N * C] + [splits * N] * 3 + [N] * 3)
    ws_above, above_rows = ws_above.view(torch.int32), above_rows.view(torch.int32)
    loss = torch.empty((), **f32)
    grad_q = torch.empty(N, C, **f32)
    stats = torch.empty(2, **f32)

    queue_fp32 = queue.dtype == torch.float32
    scale2 = float(inv_temperature) * _LOG2E
    p_scale = 16384.0 if queue.dtype == torch.float16 else 1.0
    rb = triton.cdiv(N, cfg["BLOCK_N"])
    with torch.cuda.device(q.device if q.is_cuda else -1):  # launch on the tensors' GPU
        launch_partial(cfg, (rb, splits), (q, k, queue, ws_acc, ws_m, ws_l, ws_above, pos, N, C, K, q.stride(0),
                                           k.stride(0), scale2, p_scale),
                       dict(QUEUE_FP32=queue_fp32, SPLIT_Q=(not queue_fp32 and not allow_tf32 and q.dtype != queue.dtype),
                            SPLIT_P=(not queue_fp32 and not allow_tf32), PRECISION="tf32" if allow_tf32 else "ieee"))
        comb_n, comb_c, comb_s = 16, min(cfg["comb_c"], max(16, triton.next_power_of_2(C))), cfg["comb_s"]
        _infonce_combine_kernel[(triton.cdiv(N, comb_n), triton.cdiv(C, comb_c))](
            k, ws_acc, ws_m, ws_l, ws_above, pos, grad_q, loss_rows, above_rows, N, C, k.stride(0), splits,
            scale2, float(inv_temperature), float(inv_temperature) / N, p_scale,
            BLOCK_N=comb_n, BLOCK_C=comb_c, BLOCK_S=comb_s)
        _infonce_finish_kernel[(1,)](loss_rows, above_rows, loss, stats, N, BLOCK=1024 if dev.type == "cuda" else 128)
    return loss, grad_q, stats
