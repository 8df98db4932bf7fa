"""Every kernel variant and `auto`'s order of backends: one table each, read here and nowhere else.

A variant is a second kernel for the same op and backend, built for a newer GPU's floors; both stay until a
GPU run has timed and self-checked them (the GPU check's variants call prints which default to change, and
this is the table it names). The op layer asks `variant(op, backend)` once per call and passes the name down
as an argument: the Triton launchers and the C++ launcher take it, none reads the environment.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Switch:
    op: str
    backend: str
    names: tuple[str, ...]
    default: str
    env: str
    what: str


SWITCHES = (
    Switch("infonce", "triton", ("v1", "hopper"), "v1", "MOCO_FAST_TRITON_INFONCE",
           "v1: 32-row blocks, ~2 MiB workspace; hopper: 64-256-row programs, SM-sized splits, TMA, autotuned "
           "among kernels/infonce_hopper.py's CONFIGS (kernels/infonce.py)"),
    Switch("infonce", "cuda", ("v1", "v2"), "v1", "MOCO_FAST_CUDA_INFONCE",
           "v1: 64-row CTAs; v2: mma.sync with register-resident fragments, 128-row CTAs, cp.async ring "
           "(csrc/cuda/infonce_v1.cuh, infonce_v2.cuh)"),
    Switch("momentum_update", "triton", ("v1", "v2"), "v1", "MOCO_FAST_TRITON_EMA",
           "v1: masked blocks; v2: full blocks unmasked with 16-byte alignment hints (kernels/momentum_update.py)"),
)
# forces one config of the hopper variant (tests, benchmarks): a name of kernels/infonce_hopper.py's CONFIGS
HOPPER_CONFIG_ENV = "MOCO_FAST_TRITON_INFONCE_CONFIG"

# `auto`'s candidates per (op, device type), best first, each with its reason. No GPU has timed these yet:
# the first GPU run's variants call settles them. CPU tensors: the C++ kernels, then the reference (Triton on
# CPU tensors is the interpreter, for tests only, never picked by auto).
AUTO: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("infonce", "cuda"): (("triton", "cuda", "reference"),
                          "compute-bound: Triton's kernel covers every C and dtype pair with one code path and was "
                          "reviewed first; CUDA v1/v2 are estimated at similar speed. A GPU measurement decides."),
    ("momentum_update", "cuda"): (("cuda", "triton", "reference"),
                                  "161 small tensors, memory-bound: the C++ launch (one kernel, tensor table built "
                                  "in C++) costs a few us against Triton's Python launcher and first-call compile"),
    ("enqueue", "cuda"): (("cuda", "triton", "reference"),
                          "a few KB copied: launch overhead is all there is, and C++ launches cheapest"),
    ("crop_resize", "cuda"): (("triton", "reference"), "no CUDA C++ kernel for the augmentation"),
    ("color_augment", "cuda"): (("triton", "reference"), "no CUDA C++ kernel for the augmentation"),
}
CPU_ORDER = (("cpu", "reference"), "the C++ kernels (OpenMP, AVX2 where built) beat PyTorch's eager ops")


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends `auto` tries for op on tensors of device_type, best first."""
    if device_type == "cpu":
        return CPU_ORDER[0]
    return AUTO.get((op, device_type), (("reference",), ""))[0]


def _switch(op: str, backend: str) -> Switch | None:
    return next((s for s in SWITCHES if s.op == op and s.backend == backend), None)


def variant(op: str, backend: str) -> str:
    """The variant the kernel of (op, backend) runs: its switch's environment variable, else the default;
    "" for a backend with one kernel. For triton infonce a forced hopper config reads "hopper:<config>"."""
    switch = _switch(op, backend)
    if switch is None:
        return ""
    name = os.environ.get(switch.env, "").strip() or switch.default
    if name not in switch.names:
        raise ValueError(f"moco_fast: unknown {op} variant {name!r} for backend '{backend}' ({switch.env}); "
                         f"choose one of {switch.names}")
    config = os.environ.get(HOPPER_CONFIG_ENV, "").strip() if (op, backend) == ("infonce", "triton") else ""
    return f"{name}:{config}" if name == "hopper" and config else name


def check(op: str) -> None:
    """Raises ValueError naming the switch when one of op's switches is set to a name that does not exist."""
    for s in SWITCHES:
        if s.op == op:
            variant(op, s.backend)


def key() -> tuple[str, ...]:
    """Every switch as set now: part of the resolution and self-check keys, so a process that switches a
    variant (a benchmark timing old and new side by side) self-checks the new one before it serves."""
    return tuple(os.environ.get(s.env, "") for s in SWITCHES) + (os.environ.get(HOPPER_CONFIG_ENV, ""),)


def defaults_line(op: str, backend: str) -> str:
    """Where a default lives, for messages that recommend changing it."""
    switch = _switch(op, backend)
    return f"moco_fast/ops/variants.py: SWITCHES {op}/{backend} default={switch.default!r}" if switch else ""
