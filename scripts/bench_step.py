"""Whole training steps per second and peak memory, official-style MoCo against moco_fast, in one run.

    python scripts/bench_step.py                         # on a GPU: ResNet-50 bs 256 and 32, CIFAR R18 bs 512
    python scripts/bench_step.py --cuda-graph            # also ours replayed as one CUDA graph
    python scripts/bench_step.py --case quick            # a CPU smoke run
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moco_fast.bench.report import Report  # noqa: E402
from moco_fast.bench.step import CASES, bench_case  # noqa: E402
from moco_fast.step import fast_cuda_settings  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="*", choices=list(CASES), help="default: all but quick on a GPU, quick on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true", help="also time our step replayed as one CUDA graph")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device")
    cases = args.case or ([c for c in CASES if c != "quick"] if device.type == "cuda" else ["quick"])
    if device.type == "cuda":
        fast_cuda_settings()
    report = Report(device.type, args.json)
    rows = []
    for case in cases:
        case_rows = bench_case(case, device, args.repeats, compile_model=not args.no_compile,
                               cuda_graph=args.cuda_graph)
        rows += case_rows
        report.table(case_rows, ["case", "provider", "img_per_s", "step_ms", "speedup", "peak_MiB", "first_step_s"])
        report.save(rows)  # after each case, so a run cut short still leaves its figures


if __name__ == "__main__":
    main()
