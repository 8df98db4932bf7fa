"""The checks every op's input checks are made of: each message names the argument, what was expected and
what came. Each op's own checks live in ops/<op>.py; the launchers in kernels/ check only what their
kernels assume beyond the public contract."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64,)


def fail(op: str, message: str):
    raise ValueError(f"moco_fast.ops.{op}: {message}")


def check_tensor(op: str, name: str, t, *, dim: int | None = None, dtypes=FLOAT_DTYPES, device=None,
                 contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        fail(op, f"{name} must have {dim} dimensions; got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"{name} must have dtype in {[str(d) for d in dtypes]}; got {t.dtype}")
    if device is not None and t.device != device:
        fail(op, f"{name} must be on {device} like the other inputs; got {t.device}")
    if contiguous and not t.is_contiguous():
        fail(op, f"{name} must be contiguous; got shape {tuple(t.shape)} with strides {t.stride()}")


def same_device_or_cpu(op: str, name: str, t, device) -> None:
    # index and parameter tensors may stay on the host: the op validates them there for free and copies them
    if t.device != device and t.device.type != "cpu":
        fail(op, f"{name} must be on {device} or on the cpu; got {t.device}")


def dense(t: torch.Tensor) -> bool:
    """Elements fill numel() consecutive slots from data_ptr() in some order (any permutation of the dims),
    as torch's own is_non_overlapping_and_dense."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
