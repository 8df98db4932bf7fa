"""Without the compiled extension the package still imports and the reference backend runs."""
import pathlib
import shutil
import subprocess
import sys

import pytest

from moco_fast.ops import _backends

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_reference_runs_and_cpu_explains_how_to_build(tmp_path):
    shutil.copytree(ROOT / "moco_fast", tmp_path / "moco_fast", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    script = """
import torch
from moco_fast import ops
q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8)
print("LOSS", float(ops.infonce(q, k, queue, 0.2)), float(ops.infonce(q, k, queue, 0.2, backend="reference")))
print("AVAILABLE", ops.available_backends())
try:
    ops.infonce(q, k, queue, 0.2, backend="cpu")
except RuntimeError as err:
    print("ERROR", err)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    loss_auto, loss_ref = (float(x) for x in out.split("LOSS ")[1].split()[:2])
    assert loss_auto == loss_ref  # auto falls to the reference when nothing else is built
    available = out.split("AVAILABLE ")[1].split("\n")[0]
    assert "'reference'" in available and "'cpu'" not in available and "'cuda'" not in available
    assert "not built" in out and "python setup.py build_ext --inplace" in out


def test_extension_is_built_here():
    """CI builds the extension: its absence must fail the suite, not skip the cpu tests quietly."""
    ext, err = _backends.extension()
    assert ext is not None, err
    assert "cpu" in _backends.available_backends()["infonce"]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_cuda_extension_is_built_on_gpu_machines():
    ext, err = _backends.extension()
    assert ext is not None and ext.with_cuda, err
