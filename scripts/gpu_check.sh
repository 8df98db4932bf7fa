#!/usr/bin/env bash
# The GPU check, as two decisive calls of at most 6 minutes each on a lent GPU machine (16 cores).
#   PART=1: build, the run-time self-check of every kernel, the three ops' GPU tests, the CUDA-graph step
#           test: a verdict on every kernel.
#   PART=2: the op benchmarks (device time and eager host time), the step benchmark, the data benchmark.
# Most valuable first in each; every step runs under its own limit and under the call's budget
# (GPU_CHECK_BUDGET_S, 330 s by default with PART set), so a step cut short leaves the later ones their
# time or is skipped with a log line, and the call ends inside its limit.
#
# How to make the two calls (the device tool's `run`; nothing needs `carry`: the extension is built
# there, for that machine's torch 2.11 and Python 3.12):
#     run(command="PART=1 bash scripts/gpu_check.sh", timeout_s=360)
#     run(command="PART=2 bash scripts/gpu_check.sh", timeout_s=360)   # at once after part 1 returns
# Call part 2 at once: the machine stays warm for 30 s after a call, and only a warm machine keeps the
# ignored paths its last call left in the working tree (moco_fast/_C*.so, build/, .cache/triton,
# .cache/inductor). Then part 2 skips the build (the stamp .cache/build.stamp names the sources and torch
# it was built from) and reuses part 1's Triton and inductor compiles. On a fresh machine part 2
# rebuilds first, and the budget cuts its last steps.
#
# Everything goes to $OUT/log.txt as it happens (tee, Python unbuffered), so a call cut short still
# returns its log; pytest runs verbose (-v -rA, durations) with a junit file per run; each benchmark
# writes its JSON after each case. $OUT is ./gpu_check_out when unset. Other uses:
#     bash scripts/gpu_check.sh                              # both parts, one after the other
#     PARTS="build ops" bash scripts/gpu_check.sh            # only some steps:
#         part 1: build info tests graph    part 2: build timing ops step data
#     DATA_ARGS=--end-to-end PART=2 bash scripts/gpu_check.sh  # also ResNet-50 training fed by each pipeline
#     PARTS="build variants" GPU_CHECK_BUDGET_S=330 bash scripts/gpu_check.sh  # a third call, warm: every kernel
#         variant side by side (bench_ops --variants: InfoNCE at N 32/256 x K 4,096/65,536/1,048,576 x fp32
#         and bf16 queues, each Triton config tuned once: ~200 s; the EMA variants ~50 s; on a fresh
#         machine the build takes 120 s and the budget cuts the EMA variants)
#     GPU_CHECK_PLAN=1 PART=1 bash scripts/gpu_check.sh     # print the steps and limits, as if each ran to
#         its limit, running nothing (tests/benchmarks/test_gpu_check.py); GPU_CHECK_PLAN=warm: as on a
#         warm machine whose build is current (the build skipped)
#
# Limits, from counted compile work (Triton compiles each specialisation once, at first launch: each
# combination of constexprs, pointer dtypes, and int arguments equal to 1 or divisible by 16; a tl.dot
# kernel with software pipelining takes ~1-2 s to compile, a plain one ~0.3-0.5 s; torch.compile of a
# ResNet-50 training step ~60-90 s cold on 16 cores, ~15-25 s when inductor's FX-graph cache has it):
#   build  120 s  7 sources, MAX_JOBS=16: about the slowest file (csrc/cuda/infonce.cu) plus the link.
#   info    40 s  the self-check: each fast backend x op x dtype variant once (4 infonce, 3 EMA,
#                 2 enqueue variants x cuda, triton): ~12 Triton specialisations, ~10 s of compiles.
#   tests  130 s  one pytest run of the three files (counted by enumerating each launch's constexprs,
#                 dtypes and int/alignment specialisations over the tests' GPU parameters, 2026-12-02):
#                 test_infonce.py: ~40 partial (tl.dot) kernels: matches_reference 25 (5 dtype pairs
#                 x 5 shapes), large_queue/deterministic/mutated/saturated 4, the TF32 training shapes
#                 10 (N=256 and N=32 share one; K=65537 is its own), opcheck/compile ~1; ~21 combine and
#                 5 finish kernels; ~70 s of compiles; one torch.compile(fullgraph) per backend, ~10 s.
#                 test_momentum_update.py: HAS_M_TENSOR x n_tensors (1 or not) ~3 specialisations,
#                 opcheck + torch.compile for 2 backends, ~20 s.
#                 test_enqueue.py: 32 row-copy kernels (4 dtype pairs x C = 2, 3, 4, 7, 127 x ints
#                 equal to 1 or divisible by 16) + 5 pointer-advance kernels, all plain, ~15 s;
#                 opcheck + compile ~10 s.
#   graph   40 s  test_cuda_graph.py: a small ResNet, no torch.compile; ~3 new infonce
#                 specialisations (N=8, C=16, K=40), the EMA and enqueue ones, cuDNN set-up.
#   sum 330 s with ~5 s for the machine's line.
# Part 2 (warm machine: the build is a stamp check, ~5 s):
#   timing  30 s  the benchmarks' own GPU tests (graph capture, the _sleep-queued fallbacks): no Triton;
#                 pytest's start (torch, CUDA) is most of it.
#   ops    100 s  bench_ops: infonce 5 cases x (reference, cuda, triton) and one torch.compile of the
#                 reference (first case only, ~30 s); no new infonce specialisation (the same
#                 enumeration: part 1's tests cover all 5 cases), the EMA and enqueue ones cached too;
#                 augment ~5 plain kernels; the timings themselves ~40 s.
#   step   130 s  bench_step r50-bs32 --cuda-graph: torch.compile of ResNet-50 twice (ours, then ours
#                 captured: a second model, so dynamo traces again and inductor's FX cache serves it):
#                 ~80 s cold + ~20 s, plus cuDNN autotuning and 3 x 10 timed steps.
#   data    60 s  bench_data without --end-to-end (1,024 JPEGs written, PIL workers, GPU decode path,
#                 in-memory path): no torch.compile. --end-to-end adds a cold ResNet-50 compile (bs 256).
#   sum 325 s with ~5 s for the build check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
PART=${PART:-}
case "$PART" in
  1) DEFAULT_PARTS="build info tests graph" ;;
  2) DEFAULT_PARTS="build timing ops step data" ;;
  "") DEFAULT_PARTS="build info tests graph timing ops step data" ;;
  *) echo "PART must be 1 or 2 (or unset for both); got '$PART'" >&2; exit 2 ;;
esac
PARTS=${PARTS:-$DEFAULT_PARTS}
BUDGET=${GPU_CHECK_BUDGET_S:-$([ -n "$PART" ] && echo 330 || echo 100000)}
mkdir -p "$OUT" .cache
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 MOCO_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
# the compile caches live in the working tree (git-ignored), so a warm machine's next call reuses them
export TRITON_CACHE_DIR=$PWD/.cache/triton TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
unset TRITON_INTERPRET
PLAN=${GPU_CHECK_PLAN:-}
START=$(date +%s)
SPENT=0  # in a plan, the seconds the steps would have taken at their limits
status=0
elapsed() { echo $(( $(date +%s) - START + SPENT )); }
say() { echo "== $* ($(date +%T), $(elapsed) s in)" | tee -a "$LOG"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
run_part() {  # run_part NAME SECONDS command...: output streamed to the log, failure to the status
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then say "$name: skipped, ${left} s of the call's budget left"; status=1; return; fi
  say "$name (limit ${limit} s)"
  if [ -n "$PLAN" ]; then echo "plan: $*" | tee -a "$LOG"; SPENT=$(( SPENT + limit )); return; fi
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "($name: exit $rc; 124 = timed out after ${limit} s)" | tee -a "$LOG"; status=1; }
}
PYTEST=(python -m pytest -v -rA --durations=25 -p no:cacheprovider -m gpu)

say "machine (PART=${PART:-all}: $PARTS; budget ${BUDGET} s)"
[ -n "$PLAN" ] || { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'L2', getattr(torch.cuda.get_device_properties(0), \
'L2_cache_size', 0) >> 20, 'MiB')"
  echo "cores $(nproc), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee -a "$LOG"

if want build; then
  # what the extension is built from; a warm machine's earlier build of the same sources is reused
  stamp=$( { cat setup.py; find csrc -type f | sort | xargs cat; python -c "import torch; print(torch.__version__)"; } \
           | sha256sum | cut -c1-16)
  if [ "$PLAN" = warm ] || { [ -z "$PLAN" ] && [ "$(cat .cache/build.stamp 2>/dev/null)" = "$stamp" ] \
     && ls moco_fast/_C*.so >/dev/null 2>&1 && python -c "import moco_fast._C as c; assert c.with_cuda" 2>/dev/null; }; then
    say "build: moco_fast/_C is built from these sources (stamp $stamp), skipped"
  else
    [ -n "$PLAN" ] || rm -f moco_fast/_C*.so .cache/build.stamp
    run_part build 120 python setup.py build_ext --inplace
    if [ -z "$PLAN" ] && ls moco_fast/_C*.so >/dev/null 2>&1; then echo "$stamp" >.cache/build.stamp; fi
  fi
fi

if want info; then  # the run-time self-check of every kernel (moco_fast/info.py, on main since issue 12)
  if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('moco_fast.info') is None)"; then
    run_part info 40 python -m moco_fast.info
  else
    say "info: moco_fast.info is not in this checkout, skipped"
  fi
fi

if want tests; then
  run_part tests 130 "${PYTEST[@]}" tests/test_infonce.py tests/test_momentum_update.py tests/test_enqueue.py \
    --junitxml="$OUT/tests_ops.xml"
fi

if want graph; then
  run_part graph 40 "${PYTEST[@]}" tests/test_cuda_graph.py --junitxml="$OUT/tests_graph.xml"
fi

if want timing; then
  run_part timing 30 "${PYTEST[@]}" tests/benchmarks/test_timing.py --junitxml="$OUT/tests_timing.xml"
fi

if want ops; then
  run_part ops 100 python scripts/bench_ops.py --json "$OUT/bench_ops.json"
fi

if want variants; then  # not in PART 1 or 2: old and new kernels side by side (issue 14), its own call
  run_part variants 200 python scripts/bench_ops.py --op infonce --variants --json "$OUT/bench_variants_infonce.json"
  run_part variants 50 python scripts/bench_ops.py --op momentum_update --variants --json "$OUT/bench_variants_ema.json"
fi

if want step; then
  run_part step 130 python scripts/bench_step.py --cuda-graph --repeats 10 --case r50-bs32 --json "$OUT/bench_step.json"
fi

if want data; then
  run_part data 60 python scripts/bench_data.py ${DATA_ARGS:-} --json "$OUT/bench_data.json"
fi

say "done, status $status"
exit $status
