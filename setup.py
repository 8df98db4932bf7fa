"""Build `moco_fast._C`: the C++ CPU kernels always, the CUDA kernels when they can be built.

    python setup.py build_ext --inplace         # from a checkout
    pip install --no-build-isolation -e .       # editable install

MOCO_FAST_CUDA=1 forces the CUDA sources in (the build fails if nvcc is missing), MOCO_FAST_CUDA=0
leaves them out; unset, they are built whenever nvcc and a CUDA build of torch are both present.
TORCH_CUDA_ARCH_LIST is honoured; with no GPU visible it defaults to "9.0" (H100/H200).
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The folder holding bin/nvcc and include/cuda_runtime.h (the nvcc on PATH may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script: look for the real toolkit path it names
            head = f.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _want_cuda():
    flag = os.environ.get("MOCO_FAST_CUDA", "").strip().lower()
    home = _find_cuda_home()
    if flag in ("0", "off", "false", "no"):
        return None
    if torch.version.cuda is None or home is None:
        if flag in ("1", "on", "true", "yes"):
            raise RuntimeError(
                f"MOCO_FAST_CUDA=1 but the CUDA build is impossible: torch.version.cuda={torch.version.cuda}, "
                f"CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found at: {home}. Set CUDA_HOME."
            )
        return None
    return home


def _extension():
    sources = ["csrc/moco_fast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"]
    cuda_home = _want_cuda()
    if cuda_home is None:
        print("moco_fast: building the C++ CPU kernels only")
        return cpp_extension.CppExtension(
            "moco_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch computed its guess at import; use the toolkit we found
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    print(f"moco_fast: building C++ CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "moco_fast._C",
        sources,
        define_macros=[("MOCO_FAST_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="moco-fast",
    version="0.1.0",
    description="Fast MoCo v1/v2: fused InfoNCE, multi-tensor EMA and device-side queue kernels",
    python_requires=">=3.10",
    # kernels/ is a top-level folder of the checkout; installed it lives inside moco_fast, since the
    # top-level name `kernels` belongs to another PyPI package.
    packages=["moco_fast", "moco_fast.ops", "moco_fast.kernels"],
    package_dir={"moco_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "torchvision", "triton", "tqdm", "numpy"],
)
