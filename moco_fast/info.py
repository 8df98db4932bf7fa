"""What each op's backends can do on this machine: `python -m moco_fast.info` (cf. `python -m xformers.info`).

For each device present (the CPU and every visible GPU), each op, the dtypes training uses and each backend:
whether it is built, whether it can run on that device, its run-time self-check (max error against the
float64 reference) and which backend `auto` picks. The self-check is the one `auto` runs before first
using a fast backend (moco_fast/ops/_self_check.py); a failing one is never picked.
"""
from __future__ import annotations

import argparse
import logging

import torch

from moco_fast.ops import _backends, _self_check, variants

# (op, variant) pairs worth a row: what the trainer and the benchmarks use; "tf32" only means something on a GPU
VARIANTS = {
    "infonce": [("float32", "float32", "float32", "ieee"), ("float32", "float32", "float32", "tf32"),
                ("float32", "float32", "bfloat16", "tf32"), ("bfloat16", "bfloat16", "bfloat16", "tf32")],
    "momentum_update": [("float32",), ("bfloat16",), ("float32", "float16")],
    "enqueue": [("float32", "float32"), ("bfloat16", "float32")],
    "crop_resize": [("uint8",)],
    "color_augment": [("float32", "float32"), ("float32", "bfloat16")],
}


def devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def rows(device: str) -> list[dict]:
    """One row per op, variant and backend on `device`."""
    kind = device.split(":")[0]
    out = []
    for op, dtype_sets in VARIANTS.items():
        for variant in dtype_sets:
            if kind == "cpu" and "tf32" in variant:
                continue
            pick = _backends.resolve(op, "auto", device, variant)
            for backend in _backends.BACKENDS:
                reason = _backends.unusable_reason(op, backend, kind)
                check = "-"
                if reason is None and backend != "reference":
                    result = _self_check.run(op, backend, device, variant)
                    check = f"{'pass' if result.ok else 'FAIL'} (max error {result.max_error:.2g})"
                    if not result.ok:
                        check += f": {result.detail}"
                out.append(dict(device=device, op=op, dtypes="/".join(variant), backend=backend,
                                usable="yes" if reason is None else f"no: {reason}", self_check=check,
                                auto="<- auto" if backend == pick else ""))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moco_fast.info", description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append", help="only these devices (cpu, cuda:0, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the table says what the log would
    ext, err = _backends.extension()
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); moco_fast._C: "
          f"{'built' + (' with CUDA kernels' if ext.with_cuda else ' (CPU kernels only)') if ext else 'not built: ' + err}")
    print(f"self-check: {'on' if _self_check.enabled() else 'off'} ({_self_check.ENV}); Triton interpreter: "
          f"{'on' if _backends.triton_interpreted() else 'off'}")
    print("kernel variants (moco_fast/ops/variants.py): " + ", ".join(
        f"{s.op}/{s.backend}={variants.variant(s.op, s.backend)} ({s.env})" for s in variants.SWITCHES))
    for device in args.device or devices():
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
        print(f"\n== {device}: {name}")
        for r in rows(device):
            print(f"{r['op']:<16} {r['dtypes']:<32} {r['backend']:<10} {r['usable'][:60]:<60} "
                  f"{r['self_check']:<28} {r['auto']}")


if __name__ == "__main__":
    main()
