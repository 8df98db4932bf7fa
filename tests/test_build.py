"""Without the compiled extension the package still imports and the reference backend runs."""
import os
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


def test_a_skipped_test_asking_for_a_missing_fixture_fails_the_collection(tmp_path):
    """tests/conftest.py checks every collected test's fixtures, so a gpu-marked test (skipped here) that asks
    for a fixture nobody defines fails CI on the CPU instead of erroring at setup on the first GPU run."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\n@pytest.mark.skip(reason='no GPU here')\ndef test_missing(mark):\n    pass\n\n"
        "@pytest.mark.parametrize('a', [1])\ndef test_fine(a, tmp_path, request):\n    pass\n")
    broken = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert broken.returncode != 0
    assert "test_x.py::test_missing asks for mark" in broken.stdout + broken.stderr
    assert "test_fine asks" not in broken.stdout + broken.stderr
