#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA kernels, run the GPU-marked tests and the op
# and step benchmarks. Sized for one call of under 8 minutes. Leaves log.txt, build.txt, tests.xml,
# bench_ops.json and bench_step.json
# under $OUT (./gpu_check_out when $OUT is unset).
#     bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 MOCO_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

step "build"
rm -f moco_fast/_C*.so
timeout 300 python setup.py build_ext --inplace >"$OUT/build.txt" 2>&1 || { tail -n 40 "$OUT/build.txt" | tee -a "$LOG"; status=1; }
tail -n 3 "$OUT/build.txt" | tee -a "$LOG"

step "GPU tests"
timeout 200 python -m pytest -q -m gpu tests --junitxml="$OUT/tests.xml" 2>&1 | tail -n 40 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "op benchmarks"
timeout 240 python scripts/bench_ops.py --json "$OUT/bench_ops.json" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "step benchmarks"
timeout 150 python scripts/bench_step.py --repeats 10 --json "$OUT/bench_step.json" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "done, status $status"
exit $status
