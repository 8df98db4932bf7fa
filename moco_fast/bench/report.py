"""The report of every benchmark script: a header naming the machine, the versions and the commit (so a
table can be read on its own), aligned tables, and a JSON of the same figures."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch

from moco_fast.checkpoint import write_text_atomic


def machine_header(device: str) -> dict:
    """What the figures were measured on."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu: {cpu}",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns), flush=True)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_json(path: str, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1))


class Report:
    """What every bench script prints and saves: the machine header first, then tables, and (with a
    JSON path) the header and the figures so far rewritten after each table, so a run cut short still
    leaves what it measured."""

    def __init__(self, device: str, json_path: str | None = None, **extra):
        self.header, self.json_path, self.extra = machine_header(device), json_path, extra
        print(" | ".join(f"{k}: {v}" for k, v in self.header.items()), flush=True)

    def table(self, rows: list[dict], columns: list[str]) -> None:
        print_table(rows, [c for c in columns if any(c in r for r in rows)])

    def save(self, rows: list[dict], **more) -> None:
        if self.json_path:
            write_json(self.json_path, {"header": self.header, **self.extra, **more, "rows": rows})
