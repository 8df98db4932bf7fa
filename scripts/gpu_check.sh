#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA kernels, run the GPU-marked tests, then the step,
# data and op benchmarks, in that order (the most wanted figures first), each under its own timeout so
# that the whole fits one 10-minute call (at most 580 s of limits); the benchmarks save their JSON after each case, so a
# part cut short still leaves its figures. Leaves log.txt, build.txt, tests.xml, bench_step.json,
# bench_data.json and bench_ops.json under $OUT (./gpu_check_out when $OUT is unset).
#     bash scripts/gpu_check.sh
#     PARTS="build step" bash scripts/gpu_check.sh     # only some parts (build tests step data ops)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PARTS=${PARTS:-build tests step data ops}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 MOCO_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
step() { echo "== $* ($(date +%T))" | tee -a "$LOG"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
run_part() {  # run_part SECONDS command...: its output to the log, its failure to the status
  local limit=$1; shift
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "(exit $rc; 124 = timed out after ${limit}s)" | tee -a "$LOG"; status=1; }
}

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$LOG"

if want build; then
  step "build"
  rm -f moco_fast/_C*.so
  timeout 180 python setup.py build_ext --inplace >"$OUT/build.txt" 2>&1 || { tail -n 40 "$OUT/build.txt" | tee -a "$LOG"; status=1; }
  tail -n 3 "$OUT/build.txt" | tee -a "$LOG"
fi

if want tests; then
  step "GPU tests"
  run_part 100 python -m pytest -q -m gpu tests --junitxml="$OUT/tests.xml" -p no:cacheprovider
fi

if want step; then
  step "step benchmarks (issue: the whole step as one CUDA graph)"
  run_part 150 python scripts/bench_step.py --cuda-graph --repeats 10 --case r50-bs32 cifar-r18-bs512 r50-bs256 \
    --json "$OUT/bench_step.json"
fi

if want data; then
  step "data benchmarks (issue: the GPU data path)"
  run_part 90 python scripts/bench_data.py --end-to-end --json "$OUT/bench_data.json"
fi

if want ops; then
  step "op benchmarks"
  run_part 60 python scripts/bench_ops.py --json "$OUT/bench_ops.json"
fi

step "done, status $status"
exit $status
