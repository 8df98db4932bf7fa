"""The op benchmarks behind scripts/bench_ops.py: every provider of an op side by side in one run.

Floors are stated in the code: InfoNCE does 4*N*K*C FLOPs (logits and the weighted key sum) and must
read the queue once; the EMA moves 12 bytes per fp32 parameter (read p_k and p_q, write p_k); enqueue
writes B rows; augment must read each crop's uint8 pixels and write its output. Each figure is a median
with warm-up excluded; compile time is reported apart. Every provider gets two figures (bench.timing.time_op):
device time (on CUDA a CUDA-graph replay where the provider can be captured, L2 flushed before each
call), on which the rates, speed-ups and floors are computed, and eager host time per call.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F
import torchvision

from moco_fast import ops
from moco_fast.bench.timing import copy_bandwidth_gbps, host_seconds, matmul_tflops, peak_extra_mib, time_op
from moco_fast.data.batch_augment import sample_params
from moco_fast.ops.momentum_update import kernel as momentum_update_kernel
from moco_fast.ops import _backends, variants
from moco_fast.reference import enqueue_ref_, infonce_ref, momentum_update_ref_

T = 0.2


def fast_backends(op: str, device: str) -> list[str]:
    """Fast backends that really run on this device (the Triton interpreter is no benchmark)."""
    return [b for d, b, reason in _backends.fast_backends(op)
            if d == device and reason is None and not (d == "cpu" and b == "triton")]


# Kernel variants timed side by side as providers "<backend>[<variant>]": each switch of variants.SWITCHES
# is set while its provider runs
VARIANT_ENV = {(s.backend, s.op): s.env for s in variants.SWITCHES}
VARIANTS = {(s.backend, s.op): s.names for s in variants.SWITCHES}


@contextlib.contextmanager
def triton_variant(op: str, provider: str):
    """Sets the op's variant switch for provider "<backend>[<variant>]"; any other provider runs as it is."""
    backend = _backend(provider)
    if (backend, op) not in VARIANT_ENV or not provider.endswith("]"):
        yield
        return
    name = VARIANT_ENV[backend, op]
    before = os.environ.get(name)
    os.environ[name] = provider[len(backend) + 1:-1]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name)
        else:
            os.environ[name] = before


def _backend(provider: str) -> str:
    return provider.split("[")[0]


def _providers(op: str, device: str, variants: bool) -> list[str]:
    names = fast_backends(op, device)
    if variants:
        names = [m for n in names for m in ([f"{n}[{v}]" for v in VARIANTS[n, op]] if (n, op) in VARIANTS else [n])]
    return names


# ---------------------------------------------------------------------------------------- infonce
def infonce_cases(device: str, quick: bool, variants: bool = False):
    """(N, C, K, queue dtype, fp32 matmul precision). variants: the side-by-side grid of issue 14."""
    if variants and not quick:
        return [(n, 128, k, dt, "high") for dt in (torch.float32, torch.bfloat16) for k in (4096, 65536, 1 << 20)
                for n in (32, 256)]
    if quick:
        return [(16, 32, 1000, torch.float32, "highest")]
    if device == "cpu":
        return [(256, 128, 65536, torch.float32, "highest"), (32, 128, 65536, torch.float32, "highest")]
    return [(256, 128, 65536, torch.float32, "high"), (256, 128, 65536, torch.bfloat16, "high"),
            (256, 128, 65536, torch.float32, "highest"), (256, 128, 1 << 20, torch.float32, "high"),
            (32, 128, 65536, torch.float32, "high")]


def infonce_inputs(N, C, K, queue_dtype, device):
    """q (N, C) requiring grad, k (N, C), queue (K, C) of queue_dtype: normalised rows, as the model gives."""
    q = F.normalize(torch.randn(N, C, device=device), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(N, C, device=device), dim=1)
    queue = F.normalize(torch.randn(K, C, device=device), dim=1).to(queue_dtype)
    return q, k, queue


def _infonce_step(provider: str, q, k, queue):
    if provider.startswith("reference"):
        fn = torch.compile(infonce_ref) if provider == "reference-compiled" else infonce_ref
    else:
        def fn(q, k, queue, t):
            return ops.infonce(q, k, queue, t, backend=_backend(provider))

    def step():
        fn(q, k, queue, T).backward()
        q.grad = None
    return step


def bench_infonce(device: str, quick: bool = False, copy_gbps: float = 0.0, variants: bool = False) -> list[dict]:
    rows = []
    for i, (N, C, K, queue_dtype, precision) in enumerate(infonce_cases(device, quick, variants)):
        torch.set_float32_matmul_precision(precision)
        q, k, queue = infonce_inputs(N, C, K, queue_dtype, device)
        flops = 4 * N * K * C
        mm_dtype = torch.bfloat16 if queue_dtype == torch.bfloat16 else torch.float32
        rate = matmul_tflops(device, mm_dtype, 512 if device == "cpu" or quick else 8192)
        floor = max(flops / (rate * 1e12), queue.numel() * queue.element_size() / (copy_gbps * 1e9))
        case = f"N={N} C={C} K={K} queue={str(queue_dtype).removeprefix('torch.')} {precision}"
        ref_time = None
        # torch.compile of the reference (tens of seconds per shape on a GPU): the first case alone
        compiled = ["reference-compiled"] if i == 0 else []
        for provider in ["reference"] + compiled + _providers("infonce", device, variants):
            step = _infonce_step(provider, q, k, queue)
            compile_s = None
            with triton_variant("infonce", provider):  # the hopper variant tunes in the first (eager) call
                if provider == "reference-compiled" or provider.startswith("triton["):
                    t0 = time.perf_counter()
                    step()
                    compile_s = time.perf_counter() - t0
                timing = time_op(step, device, "graph", repeats=30 if device == "cpu" else 100)
                mib = peak_extra_mib(step, device)
            seconds = timing["device_us"] / 1e6
            ref_time = ref_time or seconds
            rows.append({"op": "infonce", "case": case, "provider": provider, **timing, "TFLOP/s": flops / seconds / 1e12,
                         "GB/s": queue.numel() * queue.element_size() / seconds / 1e9, "speedup_vs_ref": ref_time / seconds,
                         "x_floor": seconds / floor, "peak_extra_MiB": mib, "compile_s": compile_s})
        del q, k, queue
    torch.set_float32_matmul_precision("highest")
    return rows


# -------------------------------------------------------------------------------- momentum_update
def ema_inputs(device: str, quick: bool = False) -> tuple[list, list]:
    """(params_k, params_q) of ResNet-50's shapes (ResNet-18's when quick), random values: a fresh init has
    tiny weights whose EMA runs into denormals."""
    encoder = (torchvision.models.resnet18() if quick else torchvision.models.resnet50()).to(device)
    params_q = [torch.randn_like(p) for p in encoder.parameters()]
    return [torch.randn_like(p) for p in params_q], params_q


def bench_momentum_update(device: str, quick: bool = False, copy_gbps: float = 0.0, variants: bool = False) -> list[dict]:
    params_k, params_q = ema_inputs(device, quick)
    numel = sum(p.numel() for p in params_q)
    nbytes = 12 * numel  # read p_k and p_q, write p_k (fp32)
    m = 0.999
    flat_q, flat_k = torch.randn(numel, device=device), torch.randn(numel, device=device)
    holders = [torch.nn.Parameter(p.clone(), requires_grad=False) for p in params_k]

    def official_loop():  # facebookresearch/moco: a new tensor per parameter
        for p_q, p_k in zip(params_q, holders):
            p_k.data = p_k.data * m + p_q.data * (1.0 - m)

    providers = {  # name: (fn, how it may be timed on CUDA: see bench.timing.time_op)
        # reassigning .data: new tensors every call, the host holds the result; timed eagerly
        "official-loop": (official_loop, "eager"),
        "reference": (lambda: momentum_update_ref_(params_k, params_q, m), "graph"),  # float m: no host read
        "foreach_lerp_": (lambda: torch._foreach_lerp_(params_k, params_q, 1 - m), "graph"),
        "flat lerp_": (lambda: flat_k.lerp_(flat_q, 1 - m), "graph"),
    }
    for provider in _providers("momentum_update", device, variants):
        def fn(p=provider):  # the variant switch is read at each call (and at capture)
            with triton_variant("momentum_update", p):
                ops.momentum_update_(params_k, params_q, m, backend=_backend(p))
        providers[provider] = (fn, "graph")
    case = f"{'ResNet-18' if quick else 'ResNet-50'}: {len(params_q)} tensors, {numel / 1e6:.1f}M fp32"
    rows = _timed_rows("momentum_update", case, providers, device, repeats=20 if device == "cpu" else 100)
    for row in rows:
        seconds = row["device_us"] / 1e6
        row.update({"GB/s": nbytes / seconds / 1e9, "x_floor": seconds / (nbytes / (copy_gbps * 1e9))})
    return rows


def _timed_rows(op: str, case: str, providers: dict, device: str, repeats: int) -> list[dict]:
    """One row per provider (name: (fn, kind)), with both figures and the speed-up over 'reference'."""
    rows = [{"op": op, "case": case, "provider": name, **time_op(fn, device, kind, repeats=repeats)}
            for name, (fn, kind) in providers.items()]
    ref_us = next(r["device_us"] for r in rows if r["provider"] == "reference")
    for row in rows:
        row["speedup_vs_ref"] = ref_us / row["device_us"]
    return rows


# ---------------------------------------------------------------------------------------- enqueue
def bench_enqueue(device: str, quick: bool = False, copy_gbps: float = 0.0, variants: bool = False) -> list[dict]:
    K, C, B = (4096, 128, 64) if quick else (65536, 128, 256)
    queue = torch.randn(K, C, device=device)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    keys = torch.randn(B, C, device=device)

    def official():  # host read of the pointer: a device synchronisation per step
        p = int(ptr)
        queue[p:p + B] = keys
        ptr[0] = (p + B) % K

    def index_copy():
        idx = (ptr + torch.arange(B, device=device)) % K
        queue.index_copy_(0, idx, keys)
        ptr.add_(B).remainder_(K)

    # the reference reads the pointer on the host too (int(ptr)): neither it nor the official code
    # can be captured, and both wait for the device by design
    providers = {"official (sync)": (official, "sync"), "index_copy_": (index_copy, "graph"),
                 "reference": (lambda: enqueue_ref_(queue, ptr, keys), "sync")}
    for backend in fast_backends("enqueue", device):
        providers[backend] = (lambda b=backend: ops.enqueue_(queue, ptr, keys, backend=b), "graph")
    nbytes = 2 * B * C * 4
    rows = _timed_rows("enqueue", f"K={K} C={C} B={B}", providers, device, repeats=50 if device == "cpu" else 200)
    for row in rows:
        row["x_floor"] = row["device_us"] / 1e6 / (nbytes / (copy_gbps * 1e9))
    return rows


# ---------------------------------------------------------------------------------------- augment
def augment_inputs(n: int, side: tuple[int, int], device: str):
    """n decoded uint8 images of one size packed in one buffer, and MoCo v2's parameters for them."""
    h, w = side
    data = torch.randint(0, 256, (n * 3 * h * w,), dtype=torch.uint8, device=device)
    offsets = torch.arange(n, dtype=torch.int64) * (3 * h * w)
    heights, widths = torch.full((n,), h), torch.full((n,), w)
    p = sample_params("v2", heights, widths, torch.Generator().manual_seed(0))
    return (data, offsets, heights, widths, p.boxes), (p.factors, p.order, p.jitter, p.gray, p.flip)


def bench_augment(device: str, quick: bool = False, copy_gbps: float = 0.0, variants: bool = False) -> list[dict]:
    """crop_resize (uint8 -> fp32 224x224) then color_augment (-> bf16 channels_last), MoCo v2's recipe."""
    n, side, size = (8, (40, 50), 24) if quick else ((32 if device == "cpu" else 256), (375, 500), 224)
    crop_args, color_args = augment_inputs(n, side, device)
    boxes = crop_args[4]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # floor: read every crop's uint8 pixels once, write and re-read the fp32 crops, write bf16 output
    nbytes = int(3 * (boxes[:, 2] * boxes[:, 3]).sum()) + n * 3 * size * size * (4 + 4 + 2)

    def pipeline(backend):
        x = ops.crop_resize(*crop_args, size, backend=backend)
        return ops.color_augment(x, *color_args, mean, std, False, out_dtype=torch.bfloat16, backend=backend)

    rows, ref_time = [], None
    for provider in ["reference"] + fast_backends("crop_resize", device):
        # the per-sample parameters travel from the host each call (a pageable copy): not capturable;
        # the reference reads them back per image (int(offsets[i]) on the device): a sync
        kind = "sync" if provider == "reference" else "eager"
        timing = time_op(lambda: pipeline(provider), device, kind, repeats=5 if provider == "reference" else 50)
        seconds = timing["device_us"] / 1e6
        ref_time = ref_time or seconds
        rows.append({"op": "augment", "case": f"N={n} {side[0]}x{side[1]} -> {size}", "provider": provider,
                     **timing, "GB/s": nbytes / seconds / 1e9, "speedup_vs_ref": ref_time / seconds,
                     "x_floor": seconds / (nbytes / (copy_gbps * 1e9))})
    return rows


# -------------------------------------------------------------------------------------- host only
def bench_host(device: str, quick: bool = False) -> list[dict]:
    """Eager host time per call of the three ops where the work is small next to the dispatch (input
    checks, custom-op and autograd dispatch, launches): the figure a cheaper dispatch, such as a cache
    of the EMA's input validation, moves. Run `scripts/bench_ops.py --host-only` before and after a
    change on the same machine; compare medians against host_spread (relative interquartile range).
    The "kernel only" rows call the backend's kernel entry directly, past ops' checks and dispatch."""
    rows = []
    q, k, queue = infonce_inputs(8, 64, 300, torch.float32, device)
    for backend in ["reference"] + fast_backends("infonce", device):
        def step(b=backend):
            ops.infonce(q, k, queue, T, backend=b).backward()
            q.grad = None
        rows.append(_host_row("infonce", "fwd+bwd N=8 C=64 K=300 fp32", backend, step, device, quick))
    shapes = [p.shape for p in (torchvision.models.resnet18() if quick else torchvision.models.resnet50()).parameters()]
    name = "ResNet-18" if quick else "ResNet-50"
    for label, sizes in ((f"{name}'s {len(shapes)} tensors, each dim cut to <= 2 (dispatch only)",
                          [[min(d, 2) for d in s] for s in shapes]),
                         (f"{name}'s {len(shapes)} tensors, full size", shapes)):
        params_k = [torch.randn(s, device=device) for s in sizes]
        params_q = [torch.randn(s, device=device) for s in sizes]
        for backend in ["reference"] + fast_backends("momentum_update", device):
            rows.append(_host_row("momentum_update", label, backend, lambda b=backend: ops.momentum_update_(
                params_k, params_q, 0.999, backend=b), device, quick))
        for backend in fast_backends("momentum_update", device):
            kernel, name = momentum_update_kernel(backend), variants.variant("momentum_update", backend)
            rows.append(_host_row("momentum_update", label, f"{backend} kernel only",
                                  lambda f=kernel, v=name: f(params_k, params_q, None, 0.999, v), device, quick))
    queue, keys = torch.randn(4096, 64, device=device), torch.randn(8, 64, device=device)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    for backend in ["reference"] + fast_backends("enqueue", device):
        rows.append(_host_row("enqueue", "K=4096 C=64 B=8 fp32", backend,
                              lambda b=backend: ops.enqueue_(queue, ptr, keys, backend=b), device, quick))
    return rows


def _host_row(op: str, case: str, provider: str, fn, device: str, quick: bool) -> dict:
    # the reference enqueue reads the pointer on the host: on CUDA it waits for the device by design
    kind = "sync" if op == "enqueue" and provider == "reference" else "eager"
    median, spread, method = host_seconds(fn, device, kind, rounds=5 if quick else 30)
    return {"op": op, "case": case, "provider": provider, "host_us": median * 1e6, "host_spread": spread,
            "host_method": method}


BENCHES = {"infonce": bench_infonce, "momentum_update": bench_momentum_update, "enqueue": bench_enqueue,
           "augment": bench_augment}


def run(op_names: list[str], device: str, quick: bool = False, on_rows=None,
        variants: bool = False) -> tuple[float, list[dict]]:
    """(copy GB/s, rows) of the named benchmarks; on_rows(rows so far) after each, to save as it goes.
    variants: each Triton variant as its own provider (triton[v1], triton[hopper], triton[v2]) and, for
    infonce, the grid N in (32, 256) x K in (4,096, 65,536, 1,048,576) x fp32 (TF32) and bf16 queues."""
    copy_gbps = copy_bandwidth_gbps(device, (64 << 20) if device == "cpu" or quick else (2 << 30))
    rows = []
    for name in op_names:
        rows += BENCHES[name](device, quick=quick, copy_gbps=copy_gbps, variants=variants)
        if on_rows is not None:
            on_rows(rows)
    return copy_gbps, rows
