"""InfoNCE's partial pass over the queue with tiles shaped for Hopper (variant "hopper" of kernels/infonce.py).

The same kernel as v1 (kernels/infonce.py's `_infonce_partial_kernel`, merged by v1's combine and finish
kernels) at other shapes and with its TMA path on; this file holds those shapes, their launch plans and the
tuner (a separate file because infonce.py would pass ~400 lines with them).
  - BLOCK_N >= 64 query rows per program, so the first dot's M can take a warpgroup MMA (wgmma needs 64
    rows per warpgroup); up to all 256 rows of a batch in one program for 16-bit queues, so the queue
    leaves L2 for the SMs once per row block, not 8 times as with v1's 32-row blocks.
  - splits of the queue = the SM count (infonce.py's, queried at run time, cached) / row blocks: one wave.
  - the key tile comes through a TMA tensor descriptor where this Triton has host-side descriptors and
    the layout allows one (sm_90+, 16-byte aligned rows, BLOCK_C <= 256), else through pointers; it is
    loaded once and feeds both products (logits q.k^T and the weighted key sum p.k).
  - num_stages pipelines the key loads (cp.async or TMA) under the MMAs.
  - a handful of configs per dtype family, chosen once per (N, C, K bucket, dtypes, precision) outside
    CUDA-graph capture by timing each on the call's own inputs; each candidate's result must agree with
    v1's (loosely: it catches a broken config, not an ulp) before it may win. The choice is logged and
    cached; during a capture with no cached choice the default config runs and nothing is timed.
    The variant "hopper:<name>" forces one config (MOCO_FAST_TRITON_INFONCE_CONFIG=<name>; tests, benchmarks).

Floors, H200, N=256 C=128 K=65,536 (fwd+bwd is this pass; the combine reads splits*N*(C+3)*4 bytes):
  MMA: 4*N*K*C = 8.6 GFLOP: 8.7 us at ~989 TFLOP/s (bf16/fp16 wgmma), 17.4 us at ~494 (TF32); the hi/lo
       split dots of allow_tf32=False with a 16-bit queue double it; "ieee" fp32 runs on FMA units (~67 TF).
  DRAM: the queue once, K*C*4 = 32 MiB fp32 (7.0 us at 4.8 TB/s) or 16 MiB bf16 (3.5 us), + workspace.
  L2 -> SM: the queue once per row block: 32 MiB x N/BLOCK_N (v1: x8 = 256 MiB; here x1..x4).
  shared memory: each key tile written once and read by each warpgroup for each of the two products:
       queue bytes x row blocks x 2 x warpgroups (128 rows, 8 warps, fp32: 32 MiB x 2 x 2 x 2 = 256 MiB,
       ~8 us at ~33 TB/s); a stage holds BLOCK_K*BLOCK_C*size bytes (32 KB at 64 x 128 fp32).
  At K=1,048,576 multiply all but the workspace by 16. Known limit: with an fp32 queue the second
  product's operand (keys, reduction along BLOCK_K, C contiguous) is MN-major, which TF32 wgmma cannot
  read from shared memory; Triton then transposes or falls back to mma.sync. A 16-bit queue has no
  such limit (the fast path).
"""
import logging
from typing import Callable, NamedTuple

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: pointer loads only
    TensorDescriptor = None

log = logging.getLogger("moco_fast")


class Config(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    desc: bool  # use a tensor descriptor for the queue when the layout allows one


# name: config. Each compiled for sm_90a on the CPU (triton.compile with GPUTarget("cuda", 90, 32), then
# ptxas -v; Triton 3.8, C=128): every tf32 and b16 config uses wgmma, the "desc" ones TMA, none spills;
# registers and shared memory per program in the comments. Dropped for spilling: tf32 n128-k64 (255
# registers, 8 B spilled), b16 n64-k128 with pointers (24 B), and ieee at 64 x 64 or more (15 KB: an
# "ieee" dot runs on FMA units with both operands in registers, so its tiles stay small; 32 rows is
# fine there, no MMA shape to meet).
CONFIGS = {
    "tf32-n128-k32-w8-s4": Config(128, 32, 8, 4, True),       # 217 regs, 128 KB
    "tf32-n64-k64-w4-s3": Config(64, 64, 4, 3, True),         # 255 regs, 128 KB
    "tf32-n64-k32-w4-s4": Config(64, 32, 4, 4, True),         # 211 regs, 96 KB
    "tf32-n128-k32-w8-s4-ptr": Config(128, 32, 8, 4, False),  # 209 regs, 96 KB (no TMA: the comparison)
    "b16-n128-k64-w8-s3": Config(128, 64, 8, 3, True),        # 173 regs, 80 KB
    "b16-n256-k64-w16-s3": Config(256, 64, 16, 3, True),      # 128 regs, 128 KB: the whole batch
    "b16-n128-k128-w8-s3": Config(128, 128, 8, 3, True),      # 254 regs, 128 KB
    "b16-n64-k128-w8-s3": Config(64, 128, 8, 3, True),        # 204 regs, 112 KB
    "b16-n64-k64-w4-s4-ptr": Config(64, 64, 4, 4, False),     # 182 regs, 80 KB (cp.async)
    "ieee-n64-k32-w8-s2": Config(64, 32, 8, 2, False),        # 154 regs, 56 KB
    "ieee-n64-k16-w8-s2": Config(64, 16, 8, 2, False),        # 146 regs, 44 KB
    "ieee-n32-k32-w8-s2": Config(32, 32, 8, 2, False),        # 93 regs, 36 KB (v1's tile)
}
DEFAULTS = {"tf32": "tf32-n128-k32-w8-s4", "b16": "b16-n128-k64-w8-s3", "ieee": "ieee-n64-k32-w8-s2"}
_CHOICES: dict = {}
_WORKSPACE_CAP = 32 << 20  # one wave of 128-row programs at N=256, C=128 needs ~8.8 MB


def family(queue: torch.Tensor, allow_tf32: bool) -> str:
    if queue.dtype != torch.float32:
        return "b16"
    return "tf32" if allow_tf32 else "ieee"


def configs_for(fam: str) -> list:
    return [name for name in CONFIGS if name.startswith(fam + "-")]


def _descriptor_ok(queue: torch.Tensor, block_c: int) -> bool:
    """TMA's rules: 16-byte aligned base and row pitch, box dims <= 256; sm_90+ on a GPU."""
    if TensorDescriptor is None or block_c > 256:
        return False
    if queue.data_ptr() % 16 or (queue.shape[1] * queue.element_size()) % 16:
        return False
    return not queue.is_cuda or torch.cuda.get_device_capability(queue.device)[0] >= 9


def plan(name: str, N: int, C: int, K: int, queue: torch.Tensor, sms: int) -> dict:
    """The launch of one named config at this shape: blocks, splits (one wave of the `sms` SMs), descriptor."""
    c = CONFIGS[name]
    block_c = max(16, triton.next_power_of_2(C))
    rb, kb = triton.cdiv(N, c.block_n), triton.cdiv(K, c.block_k)
    if queue.is_cuda:
        cap = max(1, _WORKSPACE_CAP // (N * (C + 3) * 4))
        splits = max(1, min(kb, triton.cdiv(sms, rb), cap))
        warps = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    else:  # interpreter: few programs, but more than one split so the merge runs
        splits, warps = min(kb, 3), {}
    return dict(name=name, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_C=block_c, splits=splits,
                warps=warps, desc=c.desc and _descriptor_ok(queue, block_c), comb_c=16 if queue.is_cuda else 32,
                comb_s=16 if queue.is_cuda else 2)


def launch_partial(kernel, cfg: dict, grid, args: tuple, constexprs: dict) -> None:
    """kernel: kernels/infonce.py's partial kernel (passed in: this file never imports that one), with the
    descriptor path on; args are its arguments (q, k, queue, ws_acc, ...): the descriptor goes after queue."""
    queue = args[2]
    desc = queue  # unused by the kernel when USE_DESC is False
    if cfg["desc"]:
        desc = TensorDescriptor(queue, list(queue.shape), list(queue.stride()), [cfg["BLOCK_K"], cfg["BLOCK_C"]])
    kernel[grid](*args[:3], desc, *args[3:], **constexprs, BLOCK_N=cfg["BLOCK_N"],
                                  BLOCK_K=cfg["BLOCK_K"], BLOCK_C=cfg["BLOCK_C"], USE_DESC=cfg["desc"],
                                  **cfg["warps"])


def _agrees(out, ref) -> bool:
    """Loose: the configs differ in rounding (TF32) but a broken one is off by far more, or NaN."""
    return all(bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
               for a, b in zip(out[:2], ref[:2]))


def choose(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, allow_tf32: bool, sms: int, forced: str,
           run: Callable[[dict], tuple], reference: Callable[[], tuple]) -> dict:
    """The config for this call (see the module docstring): `forced` when given, else the tuned one.
    run(cfg) launches the op with a plan."""
    N, C = q.shape
    K = queue.shape[0]
    if forced:
        if forced not in CONFIGS:
            raise ValueError(f"infonce_fwd: unknown Triton config {forced!r}; choose one of {list(CONFIGS)}")
        return plan(forced, N, C, K, queue, sms)
    fam = family(queue, allow_tf32)
    key = (str(q.device), N, C, triton.next_power_of_2(K), q.dtype, k.dtype, queue.dtype, fam)
    if key in _CHOICES:
        return plan(_CHOICES[key], N, C, K, queue, sms)
    if not queue.is_cuda:  # the interpreter times nothing worth keeping
        return plan(DEFAULTS[fam], N, C, K, queue, sms)
    if torch.cuda.is_current_stream_capturing():  # never time inside a capture; tune on a later eager call
        log.info("moco_fast: infonce (triton, hopper) has no tuned config for %s during a CUDA-graph capture; "
                 "using %s", key, DEFAULTS[fam])
        return plan(DEFAULTS[fam], N, C, K, queue, sms)
    _CHOICES[key] = _tune(key, fam, N, C, K, queue, sms, run, reference)
    return plan(_CHOICES[key], N, C, K, queue, sms)


def _tune(key, fam, N, C, K, queue, sms, run, reference) -> str:
    ref = reference()
    times = {}
    for name in configs_for(fam):
        cfg = plan(name, N, C, K, queue, sms)
        try:
            if not _agrees(run(cfg), ref):
                log.warning("moco_fast: infonce (triton, hopper) config %s disagrees with v1 on %s; skipped", name, key)
                continue
            times[name] = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20)
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory for this tile on this GPU
            log.warning("moco_fast: infonce (triton, hopper) config %s failed on %s: %s", name, key, err)
    if not times:
        raise RuntimeError(f"infonce_fwd: no Triton 'hopper' config runs correctly for {key}; use variant v1")
    best = min(times, key=times.get)
    log.info("moco_fast: infonce (triton, hopper) for %s picked %s (%s)", key, best,
             ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in sorted(times.items(), key=lambda x: x[1])))
    return best
