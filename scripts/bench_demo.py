"""The CPU demo's training throughput, before and after its levers, side by side in one run.

Each configuration is the real trainer (`scripts/pretrain.py --preset demo`, Fashion-MNIST, the whole
step: query encoder, momentum update, key encoder with split BN, fused InfoNCE, enqueue) run for
--steps steps in a fresh process, the configurations interleaved --rounds times so a noisy machine
weighs on all alike. The figure is the trainer's own img/s (data included), median of its logged
windows after the first (warm-up), then the median over rounds.

    python scripts/bench_demo.py                    # before / tensor data path / the demo now
    python scripts/bench_demo.py --steps 60 --rounds 3 --json demo.json
    python scripts/bench_demo.py --levers           # also the compute levers on top of the demo

Each row also gives the process's wall time for its --steps steps (start-up, data loading and, with
--compile, the compilation included), so a lever that is faster per step but slow to start shows it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast.bench.report import Report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name: flags on top of --preset demo
    "before (2026-11-27: small_resnet, PIL workers)": ["-a", "small_resnet", "--gpu-aug", "false", "-j", "1"],
    "tensor data path (small_resnet)": ["-a", "small_resnet", "--gpu-aug", "true"],
    "the demo now (small_resnet_s2_p2, tensor data path)": [],
}
LEVERS = {  # --levers: each on top of the demo now
    "+ torch.compile (--compile)": ["--compile"],
    "+ bf16 autocast (--amp bf16)": ["--amp", "bf16"],
    "+ contiguous, not channels_last": ["--no-channels-last"],
    "+ batch 128": ["-b", "128"],
    "+ global pooling (small_resnet_s2, the demo before)": ["-a", "small_resnet_s2"],
}


def run_once(flags: list[str], steps: int, data: str | None) -> tuple[float, float]:
    """The trainer's median img/s over its logged windows, the first one (warm-up) left out, and the
    process's wall seconds."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "pretrain.py"), *([data] if data else []),
               "--preset", "demo", "--max-steps", str(steps), "--knn-every", "0", "-p", "10",
               "--output-dir", out, *flags]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    speeds = [r["img_per_s"] for r in rows if r.get("kind") == "train"][1:]
    if not speeds:
        raise SystemExit(f"no throughput logged after the warm-up window: raise --steps (got {steps})")
    return statistics.median(speeds), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=None, help="default: the demo's Fashion-MNIST")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (logged every 10)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levers", action="store_true", help="also each compute lever on top of the demo now")
    parser.add_argument("--json")
    args = parser.parse_args()
    report = Report("cpu", args.json)
    configs = {**CONFIGS, **(LEVERS if args.levers else {})}
    runs = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, flags in configs.items():
            runs[name].append(run_once(flags, args.steps, args.data))
            print(f"  {name}: {runs[name][-1][0]:.0f} img/s, {runs[name][-1][1]:.0f} s", flush=True)
    speed = {name: statistics.median(s for s, _ in v) for name, v in runs.items()}
    base, now = speed[next(iter(CONFIGS))], speed[list(CONFIGS)[-1]]
    rows = [{"config": name, "img_per_s": round(speed[name]), "vs_before": round(speed[name] / base, 2),
             "vs_demo": round(speed[name] / now, 2), "wall_s": round(statistics.median(w for _, w in v), 1),
             "runs": [round(s) for s, _ in v]} for name, v in runs.items()]
    report.table(rows, ["config", "img_per_s", "vs_before", "vs_demo", "wall_s", "runs"])
    report.save(rows)


if __name__ == "__main__":
    main()
