"""Timing helpers shared by scripts/bench_ops.py, scripts/bench_step.py and tests/benchmarks.

Medians of many runs with warm-up excluded; CUDA events on the GPU, perf_counter on the CPU. The
header names the machine, the versions and the commit, so a table can be read on its own.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import statistics
import subprocess
import time

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int = 50, warmup: int = 5, budget_s: float = 10.0) -> float:
    """Median seconds per call of fn(); stops early once budget_s is spent (at least 3 timed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def wall_seconds_per_call(fn, device: str, calls: int = 200) -> float:
    """Host wall time per call with no synchronisation between calls (what the training loop sees)."""
    for _ in range(5):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t
    sync(device)
    return elapsed / calls


def peak_extra_mib(fn, device: str) -> float:
    """Peak memory fn() allocates beyond what exists before it: CUDA allocator statistics on the GPU;
    on Linux CPUs the growth of the resident set's high-water mark, reset just before the call, with
    every allocation of 64 KiB or more served by fresh pages (so reused heap memory is not missed)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _fresh_pages_for_large_allocations()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # back to glibc's initial threshold for the timings
    return (peak - base) / 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@functools.cache
def _fresh_pages_for_large_allocations() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD: mmap (and unmap on free) every block >= 64 KiB


def copy_bandwidth_gbps(device: str, nbytes: int) -> float:
    """Bytes read plus written per second by a plain tensor copy: the floor for memory-bound ops."""
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    t = median_seconds(lambda: y.copy_(x), device, repeats=20, warmup=3)
    return 2 * x.numel() * 4 / t / 1e9


def matmul_tflops(device: str, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * size**3 / t / 1e12


def machine_header(device: str) -> dict:
    """What the figures were measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu: {cpu}",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns), flush=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
