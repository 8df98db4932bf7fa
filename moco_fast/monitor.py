"""What a run shows and leaves behind: progress on rank 0, metrics.jsonl, TensorBoard, plot.png; and the
per-step metrics kept on the device between two logged steps (Meter)."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from moco_fast.checkpoint import write_text_atomic


class NonFiniteLoss(RuntimeError):
    pass


class Meter:
    """Per-step metrics kept on the device; read (one host sync) every --print-freq steps."""

    def __init__(self):
        self.rows = []
        self.first_step, self.wait, self.start = None, 0.0, time.perf_counter()

    def add(self, step: int, metrics: torch.Tensor, wait: float) -> None:
        """metrics: a device tensor [loss, acc1, acc5] of one step (TrainStep's result)."""
        self.first_step = step if self.first_step is None else self.first_step
        self.rows.append(metrics)
        self.wait += wait

    def flush(self, images_per_step: int) -> dict | None:
        """Means since the last flush; raises NonFiniteLoss naming the first step whose loss is NaN or inf."""
        if not self.rows:
            return None
        rows = torch.stack(self.rows).float().cpu()
        losses = rows[:, 0]
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = self.first_step + int(bad[0])
            raise NonFiniteLoss(f"the loss is {losses[int(bad[0])].item()} at step {step}: stopping; "
                                "the last checkpoint, written before that step, is kept")
        elapsed = time.perf_counter() - self.start
        out = {"loss": losses.mean().item(), "acc1": 100 * rows[:, 1].mean().item(),
               "acc5": 100 * rows[:, 2].mean().item(),
               "img_per_s": images_per_step * len(losses) / elapsed, "data_wait": self.wait / elapsed}
        self.__init__()
        return out


class RunLog:
    """Rank 0 writes; the other ranks' calls do nothing. Every record goes to stdout, metrics.jsonl and
    TensorBoard; the progress bar is tqdm on a terminal and plain lines elsewhere."""

    def __init__(self, output_dir: str, enabled: bool, resume_step: int | None = None):
        """resume_step: the step the run continues from; the log keeps what came before it only."""
        self.enabled, self.output_dir = enabled, output_dir
        self._bar, self._writer, self._file = None, None, None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None:
            truncate_metrics(path, resume_step)
        self._file = open(path, "a" if resume_step is not None else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard drops the events past the checkpoint that a crash left behind
            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge)
        except ImportError:  # tensorboard is optional: metrics.jsonl has everything
            self.info("tensorboard is not installed: writing metrics.jsonl only (pip install tensorboard)")

    def info(self, message: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(message)
            sys.stdout.flush()

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def record(self, kind: str, step: int, values: dict, show: bool = True) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": time.time(), **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch",):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "acc1", "img_per_s")})
        if show and (self._bar is None or kind != "train"):
            self.info(f"[{kind}] step {step} " + " ".join(_fmt(k, v) for k, v in values.items()))

    def close(self) -> None:
        self.end_epoch()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()


def _fmt(key, value) -> str:
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


def _parse(lines) -> list[dict]:
    """The complete rows; a line a killed process left half-written (no newline, no valid JSON) is skipped."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return _parse(f)


def truncate_metrics(path: str, step: int) -> None:
    """Keep the rows up to `step` (the checkpoint a run resumes from): the steps after it are run and
    logged again, and a row cut short by a kill is dropped, so no step appears twice or half."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [r for r in _parse(f) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_run(output_dir: str) -> str | None:
    """plot.png: the training loss (and Acc@1 against the queue), and the kNN accuracy when measured."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(output_dir)
    train = [r for r in rows if r["kind"] == "train"] or [r for r in rows if r["kind"] == "lincls"]
    knn = [r for r in rows if r["kind"] == "knn"]
    fig, axes = plt.subplots(1, 2 if knn else 1, figsize=(11 if knn else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="InfoNCE loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    if knn:
        ax = axes[0][1]
        ax.plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], "o-", label="learned features")
        for key, name in (("pixels_top1", "raw pixels"), ("untrained_top1", "untrained encoder")):
            base = [r[key] for r in knn if key in r]
            if base:
                ax.axhline(base[-1], linestyle="--", color="gray" if key == "pixels_top1" else "red", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title("kNN monitor")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, "plot.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
