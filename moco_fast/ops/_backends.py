"""Which backends exist on this machine, which one serves a call, and where each op's kernels live.

Every op file (ops/<op>.py) registers its backend table here: the backends `auto` tries per device type
and its `Kernel`s, each naming the C++ op and the Triton launcher it calls. Nothing is probed at import
time: the C++ extension, Triton and CUDA are looked at on first use, so importing moco_fast works on any
machine (the reference backend always runs).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import pathlib
import sys
from typing import Callable

import torch

log = logging.getLogger("moco_fast")

BACKENDS = ("reference", "cpu", "cuda", "triton")
BUILD_HINT = ("build it from the checkout with `python setup.py build_ext --inplace` "
              "or `pip install --no-build-isolation -e .`")
# the kernels' variant switches (kernels/infonce.py, kernels/momentum_update.py, csrc/cuda/infonce.cu)
KERNEL_VARIANT_ENVS = ("MOCO_FAST_TRITON_INFONCE", "MOCO_FAST_TRITON_INFONCE_CONFIG", "MOCO_FAST_TRITON_EMA",
                       "MOCO_FAST_CUDA_INFONCE")


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


def triton_module(name: str):
    """kernels/<name>.py, imported as moco_fast.kernels.<name>: the installed package, or in a checkout the
    top-level kernels/ folder registered under that name (never as `kernels`, another PyPI package's)."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend 'triton' needs the triton package: pip install triton")
    if "moco_fast.kernels" not in sys.modules and importlib.util.find_spec("moco_fast.kernels") is None:
        folder = pathlib.Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location("moco_fast.kernels", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
    try:
        return importlib.import_module(f"moco_fast.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"moco_fast.kernels.{name}":
            raise
        raise RuntimeError(f"backend 'triton' has no kernel file kernels/{name}.py") from None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """Where one kernel lives on each backend, one layer below the custom op. A str names the C++ op
    torch.ops.moco_fast.<name> (cpu, cuda) or the launcher <name> in kernels/<module>.py (triton); a
    function is used as it is (an adapter, or the reference); None: no kernel on that backend."""
    module: str
    cpu: str | Callable | None
    cuda: str | Callable | None
    triton: str | None
    reference: Callable

    def __call__(self, backend: str) -> Callable:
        entry = getattr(self, backend) if backend in BACKENDS else None
        if entry is None:
            raise RuntimeError(f"moco_fast: {self.module} has no kernel on backend {backend!r}")
        if backend in ("cpu", "cuda"):
            ext, err = extension()
            if ext is None:
                raise RuntimeError(f"backend '{backend}' needs the C++ extension moco_fast._C ({err}); {BUILD_HINT}")
            return getattr(torch.ops.moco_fast, entry) if isinstance(entry, str) else entry
        if backend == "triton":
            return getattr(triton_module(self.module), entry)
        return entry


# --------------------------------------------------------------------------------- the op tables
@dataclasses.dataclass(frozen=True)
class Op:
    auto: dict[str, tuple[str, ...]]  # device type -> the backends `auto` tries, best first
    kernels: tuple[Kernel, ...]


OPS: dict[str, Op] = {}  # filled by ops/<op>.py, in import order (available_backends lists them so)


def register(name: str, cuda_order: tuple[str, ...], *kernels: Kernel) -> None:
    """One op's backend table: `auto` on CUDA tensors tries cuda_order, on CPU tensors cpu then reference."""
    OPS[name] = Op({"cuda": cuda_order, "cpu": ("cpu", "reference")}, kernels)


def unusable_reason(op: str, backend: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on tensors of `device_type`, else a message saying what is missing."""
    if backend == "reference":
        return None
    if backend == "cuda" and op in OPS and any(k.cuda is None for k in OPS[op].kernels):
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


def available_backends() -> dict[str, list[str]]:
    """Backends that can run on this machine, per op: CPU ones plus, when a GPU is visible, CUDA ones."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {op: [b for b in BACKENDS if any(unusable_reason(op, b, d) is None for d in devices)] for op in OPS}


# ------------------------------------------------------------------------------------ resolution
_RESOLVED: dict[tuple, str] = {}


def kernel_variant_env() -> tuple[str, ...]:
    """Part of the resolution and self-check keys: a process that switches a kernel variant (a benchmark
    timing old and new side by side) self-checks the new one too."""
    return tuple(os.environ.get(name, "") for name in KERNEL_VARIANT_ENVS)


@torch.compiler.assume_constant_result  # run eagerly while tracing; the answer is a constant
def resolve(op: str, backend: str, device, variant: tuple | None = None) -> str:
    """The concrete backend for a call on `device` (a torch.device, "cuda:0", or a bare device type); raises
    with the reason when the one asked for cannot run. With `variant` (the dtypes the call uses, and for
    infonce "tf32" or "ieee"; see _self_check) a fast backend must also pass its run-time self-check on
    that device for that variant first."""
    key = (op, backend, device, variant, kernel_variant_env())
    if key not in _RESOLVED:
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
        table = OPS.get(op)
        for candidate in table.auto.get(device_type, ("reference",)) if table else ("reference",):
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
