"""pytest-benchmark figures for each op and backend (run apart: pytest tests/benchmarks --benchmark-only).

Sizes follow the official recipe on a GPU and are cut down on the CPU. The Triton interpreter is not
benchmarked. These are figures, not tests: nothing here asserts a time.
"""
import pytest
import torch

from moco_fast import ops
from moco_fast.bench.ops import augment_inputs, ema_inputs, fast_backends, infonce_inputs
from moco_fast.bench.timing import sync
from moco_fast.reference import enqueue_ref_, infonce_ref, momentum_update_ref_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"


def timed(benchmark, fn):
    def call():
        fn()
        sync(DEVICE)
    benchmark.pedantic(call, warmup_rounds=3, rounds=20 if ON_GPU else 5, iterations=1)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("infonce", DEVICE))
def test_bench_infonce(benchmark, backend):
    q, k, queue = infonce_inputs(256, 128, 65536 if ON_GPU else 16384, torch.float32, DEVICE)
    loss_fn = infonce_ref if backend == "reference" else (
        lambda *a: ops.infonce(*a, backend=backend))
    timed(benchmark, lambda: loss_fn(q, k, queue, 0.2).backward())


@pytest.mark.parametrize("backend", ["reference", "foreach_lerp_"] + fast_backends("momentum_update", DEVICE))
def test_bench_momentum_update(benchmark, backend):
    params_k, params_q = ema_inputs(DEVICE)
    if backend == "reference":
        fn = lambda: momentum_update_ref_(params_k, params_q, 0.999)  # noqa: E731
    elif backend == "foreach_lerp_":
        fn = lambda: torch._foreach_lerp_(params_k, params_q, 0.001)  # noqa: E731
    else:
        fn = lambda: ops.momentum_update_(params_k, params_q, 0.999, backend=backend)  # noqa: E731
    timed(benchmark, fn)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("enqueue", DEVICE))
def test_bench_enqueue(benchmark, backend):
    queue, keys = torch.randn(65536, 128, device=DEVICE), torch.randn(256, 128, device=DEVICE)
    ptr = torch.zeros(1, dtype=torch.long, device=DEVICE)
    fn = (lambda: enqueue_ref_(queue, ptr, keys)) if backend == "reference" else (
        lambda: ops.enqueue_(queue, ptr, keys, backend=backend))
    timed(benchmark, fn)


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("crop_resize", DEVICE))
def test_bench_augment(benchmark, backend):
    """Two 224 views' worth of pixels: crop-resize from 375x500 uint8, then colour to bf16 channels_last."""
    n, side, size = (256, (375, 500), 224) if ON_GPU else (16, (120, 160), 64)
    crop_args, color_args = augment_inputs(n, side, DEVICE)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def fn():
        x = ops.crop_resize(*crop_args, size, backend=backend)
        ops.color_augment(x, *color_args, mean, std, False, out_dtype=torch.bfloat16, backend=backend)
    timed(benchmark, fn)
