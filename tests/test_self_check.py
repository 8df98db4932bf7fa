"""The run-time self-check (moco_fast/ops/_self_check.py): a fast backend that is wrong on the user's device
is never picked by `auto` and raises when asked for by name; `python -m moco_fast.info` reports it."""
import importlib
import logging
import subprocess
import sys

import pytest
import torch

from moco_fast import ops
from moco_fast.ops import _backends, _self_check

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
needs_cpu_backend = pytest.mark.skipif(_backends.unusable_reason("infonce", "cpu", "cpu") is not None,
                                       reason="the C++ extension is not built")


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    monkeypatch.delenv(_self_check.ENV, raising=False)
    _backends.clear_caches()
    yield
    _backends.clear_caches()


def op_module(op: str):
    return importlib.import_module(f"moco_fast.ops.{op}")  # not ops.<op>: ops.infonce is the function


def wrong(op: str, backend: str, monkeypatch, how):
    """Replace one backend's kernel for `op` by `how(real kernel)`; the others stay real."""
    real = op_module(op).kernel

    def kernel(b):
        return how(real(b)) if b == backend else real(b)
    monkeypatch.setattr(op_module(op), "kernel", kernel)


def off_by_a_bit(fn, rel=1e-3):
    def infonce_fwd(*args):
        loss, grad, stats = fn(*args)
        return loss, grad * (1 + rel), stats
    return infonce_fwd


def infonce_inputs(n=4, c=8, k=10):
    return torch.randn(n, c), torch.randn(n, c), torch.randn(k, c)


@needs_cpu_backend
def test_every_cpu_kernel_passes_its_self_check():
    for op, variant in [("infonce", ("float32", "float32", "float32", "ieee")),
                        ("infonce", ("bfloat16", "bfloat16", "float32", "ieee")),
                        ("momentum_update", ("float32", "bfloat16")), ("enqueue", ("float16", "float32"))]:
        result = _self_check.run(op, "cpu", "cpu", variant)
        assert result.ok, (op, variant, result)
        assert result.max_error < 1e-2


@needs_cpu_backend
def test_a_wrong_infonce_kernel_is_refused_by_auto_and_raises_by_name(monkeypatch, caplog):
    wrong("infonce", "cpu", monkeypatch, off_by_a_bit)
    q, k, queue = infonce_inputs()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        loss = ops.infonce(q, k, queue, 0.2)  # auto: the cpu backend fails, the reference serves
    assert torch.equal(loss, ops.infonce(q, k, queue, 0.2, backend="reference"))
    assert _backends.resolve("infonce", "auto", "cpu", (q.dtype,) * 3 + ("ieee",)) == "reference"
    message = caplog.text
    assert "infonce backend 'cpu' failed its self-check on cpu for float32/float32/float32/ieee" in message
    assert "dL/dq: max error" in message
    with pytest.raises(RuntimeError, match=r"backend 'cpu' failed its run-time self-check on cpu for "
                                           r"float32/float32/float32/ieee: dL/dq: max error .*MOCO_FAST_SELF_CHECK=0"):
        ops.infonce(q, k, queue, 0.2, backend="cpu")


@needs_cpu_backend
def test_the_check_is_per_dtype_combination(monkeypatch):
    """A kernel wrong only for a bf16 queue is refused for that combination and kept for fp32 (off by 10%:
    the bound for a bf16 queue is twice PyTorch's own bf16 error, a few parts in a thousand)."""
    def bf16_only(fn):
        return lambda q, k, queue, *rest: off_by_a_bit(fn, 0.1)(q, k, queue, *rest) if queue.dtype == torch.bfloat16 \
            else fn(q, k, queue, *rest)
    wrong("infonce", "cpu", monkeypatch, bf16_only)
    q, k, queue = infonce_inputs()
    assert _backends.resolve("infonce", "auto", "cpu", (q.dtype, k.dtype, queue.dtype, "ieee")) == "cpu"
    assert _backends.resolve("infonce", "auto", "cpu", (q.dtype, k.dtype, torch.bfloat16, "ieee")) == "reference"


@needs_cpu_backend
@pytest.mark.parametrize("op, how", [
    ("momentum_update", lambda fn: lambda pk, pq, mt, m: fn(pk, pq, mt, m * (1 - 1e-7) if mt is None else m)),
    ("enqueue", lambda fn: lambda queue, ptr, keys: fn(queue, ptr, keys[:-1]) if keys.shape[0] > 1 else fn(
        queue, ptr, keys)),
    ("momentum_update", lambda fn: lambda *args: (_ for _ in ()).throw(RuntimeError("no kernel image for sm_120"))),
], ids=["ema-one-ulp", "enqueue-drops-a-key", "ema-raises"])
def test_wrong_ema_and_enqueue_kernels_are_refused(monkeypatch, op, how):
    wrong(op, "cpu", monkeypatch, how)
    variant = ("float32",) if op == "momentum_update" else ("float32", "float32")
    assert _backends.resolve(op, "auto", "cpu", variant) == "reference"
    with pytest.raises(RuntimeError, match="failed its run-time self-check"):
        _backends.resolve(op, "cpu", "cpu", variant)


@needs_cpu_backend
def test_the_environment_variable_turns_the_check_off(monkeypatch):
    wrong("infonce", "cpu", monkeypatch, off_by_a_bit)
    monkeypatch.setenv(_self_check.ENV, "0")
    q, k, queue = infonce_inputs()
    assert _backends.resolve("infonce", "auto", "cpu", (q.dtype,) * 3 + ("ieee",)) == "cpu"
    ops.infonce(q, k, queue, 0.2, backend="cpu")  # no error: the user chose to skip the check


@pytest.fixture
def infonce_checks(monkeypatch):
    """The arguments of every infonce self-check that runs (each still runs the real check)."""
    calls = []
    real = _self_check.CHECKS["infonce"]
    monkeypatch.setitem(_self_check.CHECKS, "infonce", lambda *a: calls.append(a) or real(*a))
    return calls


@needs_cpu_backend
def test_the_check_runs_once_per_key(infonce_checks):
    calls = infonce_checks
    q, k, queue = infonce_inputs()
    for _ in range(3):
        ops.infonce(q, k, queue, 0.2)
    ops.infonce(q, k, queue.bfloat16(), 0.2)
    assert [c[2] for c in calls] == [("float32",) * 3 + ("ieee",), ("float32", "float32", "bfloat16", "ieee")]


@needs_cpu_backend
def test_the_check_runs_on_real_tensors_while_torch_compile_traces(infonce_checks):
    """The first call of a compiled graph resolves the backend during tracing: the check must still compute."""
    calls = infonce_checks
    q, k, queue = infonce_inputs()
    compiled = torch.compile(lambda q: ops.infonce(q, k, queue, 0.2), fullgraph=True)
    torch.testing.assert_close(compiled(q), ops.infonce(q, k, queue, 0.2, backend="reference"))
    assert len(calls) == 1 and _self_check.run("infonce", "cpu", "cpu", calls[0][2]).ok


def test_info_command_reports_every_op_and_backend():
    result = subprocess.run([sys.executable, "-m", "moco_fast.info", "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("== cpu") for line in lines)
    for op in ("infonce", "momentum_update", "enqueue"):
        rows = [line for line in lines if line.startswith(op + " ")]
        assert {line.split()[2] for line in rows} == set(_backends.BACKENDS), op
        assert sum("<- auto" in line for line in rows) == sum(1 for v in __import__("moco_fast.info").info.VARIANTS[
            op] if "tf32" not in v)
    if _backends.unusable_reason("infonce", "cpu", "cpu") is None:
        cpu_rows = [line for line in lines if line.split()[2:3] == ["cpu"]]
        assert cpu_rows and all("pass (max error" in line for line in cpu_rows)


def test_each_triton_variant_gets_its_own_self_check(monkeypatch):
    """A process that switches MOCO_FAST_TRITON_INFONCE (the side-by-side benchmark) checks the new variant."""
    if _backends.unusable_reason("infonce", "triton", "cpu") is not None:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    seen = []
    real = op_module("infonce").kernel

    def kernel(b):
        fn = real(b)
        return (lambda *a: (seen.append(__import__("os").environ.get("MOCO_FAST_TRITON_INFONCE")), fn(*a))[1]) \
            if b == "triton" else fn
    monkeypatch.setattr(op_module("infonce"), "kernel", kernel)
    variant = ("float32", "float32", "float32", "ieee")
    for name in ("v1", "hopper", "v1"):
        monkeypatch.setenv("MOCO_FAST_TRITON_INFONCE", name)
        assert _backends.resolve("infonce", "triton", "cpu", variant) == "triton"
    assert seen == ["v1", "hopper"]  # checked once per variant, the repeat served from the cache
