import os
import random

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in the interpreter, which must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moco_fast.ops import _backends  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run by scripts/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the 2-core CPU")


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    torch.manual_seed(0)


def fast_backends(op: str):
    """pytest.params of (device, backend) for every fast backend, skipped where it cannot run."""
    params = []
    for device, backend, reason in _backends.fast_backends(op):
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(device, backend, marks=marks, id=f"{backend}-{device}"))
    return params


def poison_allocator(device: str, nbytes: int = 64 << 20) -> None:
    """Leave NaN in memory the allocator hands out next, so a kernel that skips a write is caught."""
    torch.full((nbytes // 4,), float("nan"), device=device)


def unresolved_fixtures(item) -> list[str]:
    """Fixture names a test asks for that neither a fixture nor its parametrisation provides."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a Python test function
        return []
    params = set(getattr(getattr(item, "callspec", None), "params", {}))
    return [name for name in info.names_closure
            if name not in info.name2fixturedefs and name not in params and name != "request"]


def pytest_collection_modifyitems(config, items):
    # A test skipped here (the gpu-marked ones on a CPU machine) would otherwise hide a fixture that does
    # not exist until the first GPU run errors at setup: fail the collection on every machine instead.
    broken = [f"{item.nodeid} asks for {', '.join(names)}" for item in items
              if (names := unresolved_fixtures(item))]
    if broken:
        raise pytest.UsageError("tests ask for fixtures that do not exist:\n  " + "\n  ".join(broken))
