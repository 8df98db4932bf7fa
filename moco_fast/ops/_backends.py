"""Which backends exist on this machine, which one serves a call, and the registry of each op's kernels.

Every op file (ops/<op>.py) registers its table here: backend -> the kernel function that backend runs, each
reached by a plain import (the C++ ops through torch.ops.moco_fast once the extension is loaded, the Triton
launchers from moco_fast.kernels on first use). `auto`'s order and the kernel variants live in variants.py.
Nothing is probed at import time: the C++ extension, Triton and CUDA are looked at on first use, so
importing moco_fast works on any machine (the reference backend always runs).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from typing import Callable

import torch

from moco_fast.ops import variants

log = logging.getLogger("moco_fast")

BACKENDS = ("reference", "cpu", "cuda", "triton")
BUILD_HINT = ("build it from the checkout with `python setup.py build_ext --inplace` "
              "or `pip install --no-build-isolation -e .`")


# ------------------------------------------------------------------------------------- importing
@functools.cache
def extension():
    """(module, None) when moco_fast._C imports (which registers torch.ops.moco_fast.*), else (None, why)."""
    try:
        return importlib.import_module("moco_fast._C"), None
    except ImportError as err:  # not built, or built against another torch
        return None, f"{type(err).__name__}: {err}"


def triton_interpreted() -> bool:
    """TRITON_INTERPRET as Triton itself reads it (libtriton's getBoolEnv: 1, true or on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


# --------------------------------------------------------------------------------- the op tables
OPS: dict[str, dict[str, Callable]] = {}  # op -> backend -> kernel; filled by ops/<op>.py in import order


def register(name: str, kernels: dict[str, Callable]) -> None:
    """One op's backend table: backend -> the function one layer below its custom op (a backend it lacks is
    left out)."""
    OPS[name] = kernels


def kernel(op: str, backend: str) -> Callable:
    """The kernel function of `op` on `backend`, after making sure the C++ extension is loaded for cpu/cuda."""
    fn = OPS[op].get(backend)
    if fn is None:
        raise RuntimeError(f"moco_fast: {op} has no kernel on backend {backend!r}")
    if backend in ("cpu", "cuda"):
        ext, err = extension()
        if ext is None:
            raise RuntimeError(f"backend '{backend}' needs the C++ extension moco_fast._C ({err}); {BUILD_HINT}")
    return fn


def unusable_reason(op: str, backend: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on tensors of `device_type`, else a message saying what is missing."""
    if backend == "reference":
        return None
    if backend == "cuda" and op in OPS and "cuda" not in OPS[op]:
        return f"backend 'cuda' has no kernel for {op}; use 'triton' (CUDA tensors), 'cpu' or 'reference'"
    if backend in ("cpu", "cuda"):
        ext, err = extension()
        if ext is None:
            return f"backend '{backend}' needs the C++ extension moco_fast._C, which is not built ({err}); {BUILD_HINT}"
        if backend == "cpu" and device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors; got {device_type} tensors (use 'cuda', 'triton' or 'auto')"
        if backend == "cuda":
            if not ext.with_cuda:
                return ("backend 'cuda' is not built: moco_fast._C was compiled without its CUDA kernels; "
                        f"rebuild on a machine with nvcc and a CUDA build of torch (MOCO_FAST_CUDA=1), {BUILD_HINT}")
            if device_type != "cuda":
                return f"backend 'cuda' runs on CUDA tensors; got {device_type} tensors (use 'cpu' or 'auto')"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "backend 'triton' needs the triton package (pip install triton)"
        if device_type == "cpu" and not triton_interpreted():
            return ("backend 'triton' on CPU tensors runs only under the Triton interpreter: "
                    "set TRITON_INTERPRET=1 before importing moco_fast")
        if device_type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA tensors; got {device_type} tensors"
        return None
    return f"unknown backend '{backend}'; choose one of {('auto',) + BACKENDS}"


# every (device type, fast backend) pair there is; Triton on CPU tensors is the interpreter (tests, not speed)
FAST_PAIRS = (("cpu", "cpu"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton"))


def fast_backends(op: str) -> list[tuple[str, str, str | None]]:
    """(device type, backend, None or why it cannot run here) for every fast pair of `op` (tests, benchmarks)."""
    def reason(device: str, backend: str) -> str | None:
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return unusable_reason(op, backend, device)
    return [(device, backend, reason(device, backend)) for device, backend in FAST_PAIRS]


def available_backends() -> dict[str, list[str]]:
    """Backends that can run on this machine, per op: CPU ones plus, when a GPU is visible, CUDA ones."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {op: [b for b in BACKENDS if any(unusable_reason(op, b, d) is None for d in devices)] for op in OPS}


# ------------------------------------------------------------------------------------ resolution
_RESOLVED: dict[tuple, str] = {}


@torch.compiler.assume_constant_result  # run eagerly while tracing; the answer is a constant
def resolve(op: str, backend: str, device, variant: tuple | None = None) -> str:
    """The concrete backend for a call on `device` (a torch.device, "cuda:0", or a bare device type); raises
    with the reason when the one asked for cannot run. With `variant` (the dtypes the call uses, and for
    infonce "tf32" or "ieee"; see _self_check) a fast backend must also pass its run-time self-check on
    that device for that variant first."""
    key = (op, backend, device, variant, variants.key())
    if key not in _RESOLVED:
        variants.check(op)  # a misspelt switch is an error, not a failed self-check that auto would skip
        names = None if variant is None else tuple(str(v).removeprefix("torch.") for v in variant)
        _RESOLVED[key] = _resolve(op, backend, str(device), names)
    return _RESOLVED[key]


def self_check_failure(op: str, backend: str, device: str, variant: tuple[str, ...] | None) -> str | None:
    """None when the self-check passes or does not apply, else what failed."""
    from moco_fast.ops import _self_check
    if backend == "reference" or variant is None or op not in _self_check.CHECKS or not _self_check.enabled():
        return None
    result = _self_check.run(op, backend, device, variant)
    return None if result.ok else result.detail


def _resolve(op: str, backend: str, device: str, variant: tuple[str, ...] | None) -> str:
    device_type = device.split(":")[0]
    if backend == "auto":
        for candidate in variants.auto_order(op, device_type):
            if unusable_reason(op, candidate, device_type) is not None:
                continue
            failure = self_check_failure(op, candidate, device, variant)
            if failure is None:
                log.info("moco_fast: %s on %s tensors uses the '%s' backend", op, device, candidate)
                return candidate
            log.warning("moco_fast: %s backend '%s' failed its self-check on %s for %s (%s); not using it",
                        op, candidate, device, "/".join(variant), failure)
        return "reference"
    reason = unusable_reason(op, backend, device_type)
    if reason is not None:
        raise RuntimeError(f"moco_fast.ops.{op}: {reason}")
    failure = self_check_failure(op, backend, device, variant)
    if failure is not None:
        raise RuntimeError(
            f"moco_fast.ops.{op}: backend '{backend}' failed its run-time self-check on {device} for "
            f"{'/'.join(variant)}: {failure}. Use backend 'auto' (it skips a failing backend) or another one; "
            "set MOCO_FAST_SELF_CHECK=0 to use it anyway, and please report the device and this message")
    return backend


def clear_caches() -> None:
    """Forget every resolution and self-check result (tests; a process normally keeps them)."""
    from moco_fast.ops import _self_check
    _RESOLVED.clear()
    _self_check._RESULTS.clear()


@torch.compiler.assume_constant_result  # fixed for a compiled graph: set the precision before compiling
def allow_tf32() -> bool:
    """fp32 inputs may use TF32 tensor cores unless matmul precision is "highest"."""
    return torch.get_float32_matmul_precision() != "highest"


# ------------------------------------------------------------------------------- the eager rule
def skips_dispatch(*tensors: torch.Tensor, differentiable: bool = False) -> bool:
    """The one eager rule of every public op: the registered custom op is entered when something needs it,
    i.e. torch.compile is tracing (the graph must see the op and its declared mutations), a tensor is a
    subclass (fake or functional tensors), or autograd must record the call (a `differentiable` op given a
    tensor that requires grad, grad mode on). Any other call runs the very function the custom op
    registers, without the dispatch, which on the 2-core CPU costs more than the kernel: 115 us a call
    for the 161-tensor EMA (kernel 54 us), 17 us for an enqueue (kernel 7 us)."""
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
        return False
    return not (differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
