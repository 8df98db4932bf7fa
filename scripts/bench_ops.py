"""Time every provider of the MoCo ops side by side: reference eager and compiled, cpu, cuda, triton.

    python scripts/bench_ops.py                      # all ops, on the GPU when there is one
    python scripts/bench_ops.py --op infonce --json out.json
    python scripts/bench_ops.py --quick              # tiny sizes: a smoke run
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moco_fast.benchmark import machine_header, print_table, write_json  # noqa: E402
from moco_fast.benchmark_ops import BENCHES, run  # noqa: E402

COLUMNS = ["case", "provider", "time_us", "wall_us", "TFLOP/s", "GB/s", "speedup_vs_ref", "x_floor",
           "peak_extra_MiB", "compile_s"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["all", *BENCHES], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    header = machine_header(args.device)
    print(" | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    ops_to_run = list(BENCHES) if args.op == "all" else [args.op]
    copy_gbps, rows = run(ops_to_run, args.device, quick=args.quick)
    print(f"copy bandwidth (floor for memory-bound ops): {copy_gbps:.1f} GB/s")
    for op in ops_to_run:
        print(f"\n== {op} ==")
        print_table([r for r in rows if r["op"] == op], [c for c in COLUMNS if any(c in r for r in rows if r["op"] == op)])
    if args.json:
        write_json(args.json, {"header": header, "copy_GBps": copy_gbps, "rows": rows})


if __name__ == "__main__":
    main()
