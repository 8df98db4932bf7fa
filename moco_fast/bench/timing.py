"""Timing helpers shared by the benchmarks (moco_fast.bench.*) and tests/benchmarks.

Medians of many runs with warm-up excluded; CUDA events on the GPU, perf_counter on the CPU.
"""
from __future__ import annotations

import ctypes
import functools
import statistics
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


# ------------------------------------------------------------------------------ op timing: two figures
# An op has two costs. Device time: what the GPU spends on it, which is all a captured step pays (the
# trainer's --cuda-graph). Eager host time: what the CPU spends issuing one un-graphed call (input
# checks, dispatch, autograd, launches), which bounds an eager loop whenever it exceeds the device time.
# Events around one eager call on an idle GPU mix the two, so each is measured on its own.

FLUSH_BYTES = 256 << 20  # written before every timed CUDA call: > any L2 today (H200: 60 MB), as do_bench does
ROUND_S = 2e-3  # host work queued per round: ~400 launches at ~5 us each, well under the launch queue's depth
KINDS = ("graph", "eager", "sync")  # how a provider may be timed on CUDA; see time_op
METHODS = {  # the labels in device_method and host_method
    "graph": "device: one call captured in a CUDA graph, each replay timed with events",
    "eager+sleep": "device: eager calls timed with events, queued behind torch.cuda._sleep so the device "
                   "never waits for the host (else marked [device may have waited])",
    "sync": "device: eager calls that wait for the device (a host read); the host is inside the events",
    "cpu=host": "on the CPU the host does the work: device time is the eager host time",
    "L2": "on CUDA a 256 MiB buffer is written before every timed call, outside the timed region",
    "loop+sleep xN": "host: wall time per call over rounds of N back-to-back eager calls, no sync, "
                     "queued behind torch.cuda._sleep",
    "loop xN": "host: wall time per call over rounds of N back-to-back calls (CPU, or one that syncs)",
    "idle [host waited behind the sleep]": "host: a round waited for the device (a host sync, or more "
                                           "launches than the launch queue holds); re-timed on an idle device",
}


def time_op(fn, device: str, kind: str = "graph", repeats: int = 100, warmup: int = 3,
            budget_s: float = 10.0) -> dict:
    """Device and eager host microseconds per call of fn(), and how each was measured.

    kind says what fn allows on CUDA: "graph", it can be captured in a CUDA graph; "eager", it cannot
    (it reads or allocates on the host, as the official EMA loop does) but never waits for the device;
    "sync", it waits for the device (a host read of a device value). On the CPU the host does the
    work, so the device time is the eager host time: one measurement, reported twice.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    # 30 rounds make a steady median; more would only wait for the device work each round queues
    host_s, spread, host_method = host_seconds(fn, device, kind, rounds=min(repeats, 30), warmup=warmup,
                                               budget_s=budget_s)
    if device.startswith("cuda"):
        device_s, device_method = device_seconds(fn, kind, repeats=repeats, budget_s=budget_s)
    else:
        device_s, device_method = host_s, "cpu=host"
    return {"device_us": device_s * 1e6, "device_method": device_method, "host_us": host_s * 1e6,
            "host_spread": spread, "host_method": host_method}


def host_seconds(fn, device: str, kind: str = "graph", rounds: int = 30, warmup: int = 3,
                 budget_s: float = 10.0) -> tuple[float, float, str]:
    """(median, relative interquartile spread, method) of the wall time per call over rounds of
    back-to-back eager calls with no synchronisation between them: what an un-graphed loop pays.

    On CUDA each round is queued behind torch.cuda._sleep, so the device stays busy until the host has
    issued the whole round, as in training, where the GPU is always behind. Two things follow: a call
    never finds the device idle, so a hidden host sync (a pageable copy, an .item()) waits for the
    sleep, and is caught (the sleep was over when the round ended) instead of returning at once; and
    the figure is the host's alone, since no call waits for device work. A round is about ROUND_S of
    host work so its launches fit in the launch queue (a full queue would also block the host).
    A "sync" fn waits by design: it is timed on an idle device and labelled so.
    """
    for _ in range(warmup):
        fn()
    cuda = device.startswith("cuda")
    queued = cuda and kind != "sync"
    sync(device)
    t = time.perf_counter()
    fn()
    one = time.perf_counter() - t  # an estimate, to size the rounds
    sync(device)
    calls = max(1, min(100, int((ROUND_S if cuda else 0.02) / max(one, 1e-7))))
    per_call, slack, waited, start = [], 2.0, False, time.perf_counter()
    while len(per_call) < rounds:
        sync(device)
        lead = _queue_sleep(slack * calls * one + 1e-3) if queued else None
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t
        if lead is not None and lead.query():  # the sleep ran out before the host had issued the round
            if slack < 8:  # a hiccup of the host, or too short an estimate: once more, longer
                slack *= 4
                continue
            waited = True
            break
        per_call.append(elapsed / calls)
        if len(per_call) >= 3 and time.perf_counter() - start > budget_s:
            break
    sync(device)
    if waited:  # re-measured on an idle device; the label says it waited
        median, spread, _ = host_seconds(fn, device, "sync", rounds, 0, budget_s)
        return median, spread, "idle [host waited behind the sleep]"
    q = statistics.quantiles(per_call, n=4) if len(per_call) >= 2 else [per_call[0]] * 3
    method = f"{'loop+sleep' if queued else 'loop (syncs)' if cuda else 'loop'} x{calls}"
    return statistics.median(per_call), (q[2] - q[0]) / q[1] if q[1] > 0 else 0.0, method


def device_seconds(fn, kind: str = "graph", repeats: int = 100, budget_s: float = 10.0) -> tuple[float, str]:
    """(median device seconds per call, method) on CUDA, with L2 flushed before every timed call.

    "graph": fn is captured once in a CUDA graph and each replay is timed with events: no host
    dispatch at all, what a captured training step pays. If the capture fails, fn is timed as "eager"
    and the method names the error. "eager": each call is timed with events, the round queued behind
    torch.cuda._sleep long enough that the host issues all of it before the device gets there, so the
    device never waits for the host between the events (checked: else the round is redone smaller).
    "sync": fn waits for the device, so the host is inside its events whatever is done; labelled so.
    The flush (a 256 MiB write, as triton.testing.do_bench does) is outside the timed region: without
    it a 32 MiB queue stays in the H200's 60 MB L2 between calls, while in training the encoders
    evict it.
    """
    call, method = fn, {"eager": "eager+sleep", "sync": "sync"}.get(kind)
    graph = None
    if kind == "graph":
        try:
            graph = _capture(fn)
            call, method = graph.replay, "graph"
        except Exception as err:  # noqa: BLE001 - any capture failure: time it eagerly, say why
            torch.cuda.synchronize()
            kind, method = "eager", f"eager+sleep [capture failed: {type(err).__name__}: {str(err)[:80]}]"
    flush = _flush_buffer()
    sync("cuda")
    t = time.perf_counter()
    flush.zero_()
    call()
    one = time.perf_counter() - t  # host cost of one timed iteration, to size the sleep
    calls = max(1, min(repeats, int(ROUND_S / max(one, 1e-7))))
    times, slack, retries, flagged, start = [], 1.5, 0, False, time.perf_counter()
    while len(times) < repeats:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(calls)]
        torch.cuda.synchronize()
        lead = _queue_sleep(slack * calls * one + 5e-4) if kind != "sync" else None
        for begin, end in events:
            flush.zero_()
            begin.record()
            call()
            end.record()
        lagged = lead is not None and lead.query()
        torch.cuda.synchronize()
        if lagged and retries < 4:  # the device may have waited for the host: redo, smaller or longer
            retries += 1
            calls, slack = (calls // 2, slack) if calls > 1 else (1, 2 * slack)
            continue
        if lagged and not flagged:  # still lagging after 4 tries: keep the figures, say so
            method, flagged = method + " [device may have waited]", True
        times += [begin.elapsed_time(end) / 1e3 for begin, end in events]
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    del graph
    return statistics.median(times), method


def _capture(fn) -> "torch.cuda.CUDAGraph":
    """fn captured once, after warm-up calls on a side stream (as PyTorch's CUDA-graph docs do)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph, before = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            fn()
    except BaseException:
        # torch.cuda.graph leaves its capture stream current when capture_end raises
        torch.cuda.set_stream(before)
        raise
    torch.cuda.synchronize()
    return graph


@functools.cache
def _flush_buffer() -> torch.Tensor:
    return torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")


def _queue_sleep(seconds: float) -> "torch.cuda.Event":
    """Queue about `seconds` of spinning on the current stream; returns an event recorded after it."""
    torch.cuda._sleep(int(min(seconds, 2.0) * _sleep_cycles_per_second()))
    done = torch.cuda.Event()
    done.record()
    return done


@functools.cache
def _sleep_cycles_per_second() -> float:
    """_sleep spins for SM clock cycles, and an idle GPU clocks low (an H200 here: 345 MHz idle, 1980
    busy): measured after ~10 ms of work, the highest of three rates, so that a sleep sized from it
    lasts at least as long as asked for."""
    flush = _flush_buffer()
    for _ in range(100):
        flush.zero_()
    rates = []
    for _ in range(3):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        rates.append(20_000_000 / (begin.elapsed_time(end) / 1e3))
    return max(rates)


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
