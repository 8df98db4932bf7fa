#!/usr/bin/env bash
# Compile-only check that setup.py builds the extension, C++ and CUDA, against the GPU machine's torch
# (2.11.0+cu130: CUDA 13.0, C++17, Python 3.12) when this machine has another torch. A clean copy of one
# commit is built in a scratch folder by torch 2.11 from its own virtual environment, so the checkout's
# own _C*.so and build/ are never touched; then the built library is loaded and its op schemas listed.
#     bash scripts/check_build_torch211.sh                      # HEAD, MAX_JOBS=1, niced
#     REV=main VENV=/work/venv211 MAX_JOBS=2 bash scripts/check_build_torch211.sh
# Needs nvcc 13.0 (on PATH or CUDA_HOME) and, the first time, PyPI: its torch 2.11.0 Linux wheel is the
# cu130 build (torch/version.py: cuda '13.0'). The venv sees the system's site-packages for setuptools,
# pybind11, ninja and the CUDA 13 runtime wheels (nvidia-*) that `import torch` loads; torch itself
# comes from the venv, which shadows the system's. The venv's Python is this machine's (3.11 here):
# the C++ API and torch's headers are what is checked, not the Python ABI of the GPU machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REV=${REV:-HEAD}
VENV=${VENV:-$HOME/.venv-torch211}
export MAX_JOBS=${MAX_JOBS:-1} MOCO_FAST_CUDA=${MOCO_FAST_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install --no-deps torch==2.11.0
fi
"$VENV/bin/python" -c "import torch; v = torch.__version__; assert v.startswith('2.11.'), v; \
print('torch', v, 'cuda', torch.version.cuda, 'from', torch.__file__)"
SCRATCH=$(mktemp -d /tmp/moco_fast_torch211.XXXXXX)
git -C "$ROOT" archive "$REV" | tar -x -C "$SCRATCH"
echo "building $(git -C "$ROOT" rev-parse --short "$REV") in $SCRATCH (MAX_JOBS=$MAX_JOBS)"
cd "$SCRATCH"
start=$(date +%s)
nice -n 5 "$VENV/bin/python" setup.py build_ext --inplace >build.log 2>&1 || {
  grep -nE "error|Error" build.log | head -n 40; echo "BUILD FAILED: full log $SCRATCH/build.log"; exit 1; }
echo "C++ standard: $(grep -o -- '-std=c++[0-9]*' build.log | sort | uniq -c | tr -s ' ' | paste -sd,);" \
  "warnings in the log: $(grep -ciE warning build.log || true)"
echo "built in $(( $(date +%s) - start )) s: $(ls moco_fast/_C*.so)"
# the op registrations and their kernels must load against torch 2.11's libraries (undefined symbols show here)
"$VENV/bin/python" - <<'EOF'
import glob, torch
torch.ops.load_library(glob.glob("moco_fast/_C*.so")[0])
for name in ("infonce_fwd", "momentum_update_kernel_", "enqueue_kernel_"):
    op = getattr(torch.ops.moco_fast, name)
    kernels = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), k)]
    print("loaded", op.default._schema, "kernels:", kernels)
q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8)  # the CPU kernel runs under 2.11 too
loss, grad_q, stats = torch.ops.moco_fast.infonce_fwd(q, k, queue, 5.0, False)
logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) * 5.0
want = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
assert torch.allclose(loss, want, rtol=1e-5), (float(loss), float(want))
print(f"cpu infonce_fwd under torch {torch.__version__}: loss {float(loss):.6f} (reference {float(want):.6f})")
EOF
echo "OK: torch 2.11 build of $REV (log: $SCRATCH/build.log)"
