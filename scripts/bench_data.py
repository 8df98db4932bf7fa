"""Images per second (two augmented views each) of the PIL pipeline and the GPU data path, in one run.

    python scripts/bench_data.py                 # 1,024 JPEGs of 500x375, 224 px views; CIFAR-sized in memory
    python scripts/bench_data.py --end-to-end    # also ResNet-50 MoCo v2 training fed by each pipeline
    python scripts/bench_data.py --quick         # a CPU smoke run of a few seconds
"""
import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moco_fast.bench.data import run  # noqa: E402
from moco_fast.bench.report import Report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also MoCo v2 training (ResNet-50, bs 256) fed by each pipeline from the JPEG folder")
    parser.add_argument("--cuda-graph", action="store_true", help="the end-to-end step replayed as one CUDA graph")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    report = Report(device.type, args.json)
    columns = ["pipeline", "device", "img_per_s", "vs_PIL", "batch", "image_size", "dtype", "workers", "source"]
    done = []

    def on_row(row):  # print and save after each pipeline, so a run cut short still leaves its figures
        done.append(row)
        report.table([row], columns)
        report.save(done)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        rows = run(pathlib.Path(tmp), args.quick, device, args.workers, on_row, args.end_to_end, args.cuda_graph)
    print()
    report.table(rows, columns)


if __name__ == "__main__":
    main()
