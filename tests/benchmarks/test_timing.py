"""The benchmarks' two figures (device time, eager host time) and how each is measured.

These run in the ordinary suite (no pytest-benchmark fixture): they check what the benchmarks report
and which method they pick, never how fast anything is. The gpu-marked ones check the CUDA methods:
CUDA-graph replay where a provider can be captured, the _sleep-queued fallbacks, the sync labels.
"""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from moco_fast.bench import timing as bench_timing
from moco_fast.bench.ops import bench_enqueue, bench_host, fast_backends

ROOT = pathlib.Path(__file__).resolve().parents[2]
ON_GPU = torch.cuda.is_available()


def _figures_ok(row: dict) -> None:
    for key in ("device_us", "host_us"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["device_method"] and row["host_method"], row


def test_on_the_cpu_device_time_is_the_host_time():
    x = torch.randn(1000)
    calls = []

    def fn():
        calls.append(1)
        x.mul_(1.0)
    timing = bench_timing.time_op(fn, "cpu", "graph", repeats=5, warmup=2)
    _figures_ok(timing)
    assert timing["device_us"] == timing["host_us"]
    assert timing["device_method"] == "cpu=host" and timing["host_method"].startswith("loop x")
    calls_per_round = int(timing["host_method"].removeprefix("loop x"))
    assert len(calls) >= 2 + 1 + 5 * calls_per_round  # warm-up, the estimate, the rounds


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        bench_timing.time_op(lambda: None, "cpu", "captured")


def test_op_rows_carry_both_figures_and_their_methods():
    rows = bench_enqueue("cpu", quick=True, copy_gbps=10.0)
    assert {r["provider"] for r in rows} >= {"official (sync)", "index_copy_", "reference"}
    for row in rows:
        _figures_ok(row)
        assert row["device_us"] == row["host_us"]  # the CPU
        assert math.isfinite(row["speedup_vs_ref"]) and math.isfinite(row["x_floor"])
    assert next(r for r in rows if r["provider"] == "reference")["speedup_vs_ref"] == 1.0


def test_host_only_covers_the_three_ops_and_every_backend():
    rows = bench_host("cpu", quick=True)
    backends = ["reference"] + fast_backends("momentum_update", "cpu")
    ema = {r["provider"] for r in rows if r["op"] == "momentum_update"}
    assert ema == set(backends) | {f"{b} kernel only" for b in backends[1:]}
    assert {r["op"] for r in rows} == {"infonce", "momentum_update", "enqueue"}
    assert len({r["case"] for r in rows if r["op"] == "momentum_update"}) == 2  # dispatch only, full size
    for row in rows:
        assert math.isfinite(row["host_us"]) and row["host_us"] > 0, row
        assert row["host_spread"] >= 0 and row["host_method"].startswith("loop x")


@pytest.mark.parametrize("args", [["--host-only", "--quick"], ["--op", "enqueue", "--quick"]],
                         ids=["host-only", "enqueue"])
def test_bench_ops_script_writes_both_figures_to_json(tmp_path, args):
    out = tmp_path / "ops.json"
    result = subprocess.run([sys.executable, "scripts/bench_ops.py", "--device", "cpu", *args, "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["methods"] == bench_timing.METHODS and payload["rows"]
    for row in payload["rows"]:
        assert row["host_us"] > 0 and row["host_method"]
        if "--host-only" not in args:
            assert row["device_us"] > 0 and row["device_method"] == "cpu=host"
    assert "host_us" in result.stdout


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
def test_a_capturable_op_is_timed_from_a_cuda_graph():
    x = torch.randn(1 << 20, device="cuda")
    timing = bench_timing.time_op(lambda: x.mul_(1.0001), "cuda", "graph", repeats=20)
    _figures_ok(timing)
    assert timing["device_method"] == "graph", timing
    assert timing["host_method"].startswith("loop+sleep x"), timing


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
def test_an_op_that_fails_capture_falls_back_and_says_why():
    x = torch.randn(1 << 10, device="cuda")
    timing = bench_timing.time_op(lambda: x.add_(float(x[0]) * 0), "cuda", "graph", repeats=5)  # a host read
    _figures_ok(timing)
    assert timing["device_method"].startswith("eager+sleep [capture failed"), timing
    assert timing["host_method"].startswith("idle [host waited"), timing  # the sync is caught
    torch.cuda.synchronize()
    y = torch.ones(4, device="cuda") * 2  # the context still works after the failed capture
    assert y.sum().item() == 8


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="no CUDA device")
def test_eager_and_sync_providers_are_labelled():
    params = [torch.randn(1000, device="cuda") for _ in range(50)]
    eager = bench_timing.time_op(lambda: [p.mul_(1.0001) for p in params], "cuda", "eager", repeats=10)
    assert eager["device_method"] == "eager+sleep", eager
    ptr = torch.zeros(1, dtype=torch.long, device="cuda")
    synced = bench_timing.time_op(lambda: ptr.fill_(int(ptr) + 1), "cuda", "sync", repeats=10)
    assert synced["device_method"] == "sync" and synced["host_method"].startswith("loop (syncs) x"), synced
    for timing in (eager, synced):
        _figures_ok(timing)
