"""Time every provider of the MoCo ops side by side: reference eager and compiled, cpu, cuda, triton.

    python scripts/bench_ops.py                      # all ops, on the GPU when there is one
    python scripts/bench_ops.py --op infonce --json out.json
    python scripts/bench_ops.py --quick              # tiny sizes: a smoke run
    python scripts/bench_ops.py --host-only          # eager host time per call of the three ops, small sizes
    python scripts/bench_ops.py --op infonce --variants  # old and new kernels side by side: triton[v1],
                                                     # triton[hopper], cuda[v1], cuda[v2] at N 32/256 x
                                                     # K 4,096/65,536/1,048,576 x fp32 (TF32)/bf16 queue
    python scripts/bench_ops.py --op momentum_update --variants   # triton[v1] and triton[v2]

Two figures per provider: device_us (on CUDA a CUDA-graph replay where the provider can be captured,
else eager calls queued behind torch.cuda._sleep; L2 flushed before each call) and host_us (wall time
per call of back-to-back eager calls). On the CPU the two are one measurement. The method of each is
in device_method / host_method; the legend is printed at the end and saved in the JSON.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moco_fast.bench.ops import BENCHES, bench_host, run  # noqa: E402
from moco_fast.bench.report import Report  # noqa: E402
from moco_fast.bench.timing import METHODS  # noqa: E402

COLUMNS = ["case", "provider", "device_us", "host_us", "TFLOP/s", "GB/s", "speedup_vs_ref", "x_floor",
           "peak_extra_MiB", "compile_s", "device_method", "host_method"]
HOST_COLUMNS = ["op", "case", "provider", "host_us", "host_spread", "host_method"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["all", *BENCHES], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--variants", action="store_true",
                        help="each Triton and CUDA kernel variant as its own provider, infonce over the variants' grid "
                             "(compile_s of a triton[...] row: its first call, compile and autotune)")
    parser.add_argument("--host-only", action="store_true",
                        help="only the eager host time per call of infonce, momentum_update and enqueue at "
                             "small sizes (before/after a change to the ops' Python dispatch or checks)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's; 1 with --host-only on the CPU, where "
                             "OpenMP teams at tiny sizes only add noise on a shared machine)")
    parser.add_argument("--json", help="also write every figure to this JSON file (after each op)")
    args = parser.parse_args()
    threads = args.threads or (1 if args.host_only and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    report = Report(args.device, args.json, methods=METHODS)
    if args.host_only:
        rows = bench_host(args.device, quick=args.quick)
        report.table(rows, HOST_COLUMNS)
        report.save(rows)
        return
    ops_to_run = list(BENCHES) if args.op == "all" else [args.op]

    def on_rows(rows):  # print and save after each op, so a run cut short still leaves its figures
        op = rows[-1]["op"]
        print(f"\n== {op} ==")
        report.table([r for r in rows if r["op"] == op], COLUMNS)
        report.save(rows)
    copy_gbps, rows = run(ops_to_run, args.device, quick=args.quick, on_rows=on_rows, variants=args.variants)
    print(f"\ncopy bandwidth (floor for memory-bound ops): {copy_gbps:.1f} GB/s")
    print("methods:\n" + "\n".join(f"  {k}: {v}" for k, v in METHODS.items()))
    report.save(rows, copy_GBps=copy_gbps)


if __name__ == "__main__":
    main()
