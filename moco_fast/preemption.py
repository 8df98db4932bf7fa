"""Stopping on request: SIGTERM (SLURM, Kubernetes, torchrun passing one on) or SIGINT (Ctrl-C).

The first signal only sets a flag; the loop asks `should_stop()` once per step, finishes that step,
writes a checkpoint and exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT: "not
finished", so a scheduler does not take the run for done). Later signals are ignored: the step and
the checkpoint always complete (kill -9 still ends a process at once, keeping the previous checkpoint).

Under a process group the signal may reach one rank only, or the ranks at different steps, and a rank
that stops alone leaves the others waiting in a collective. So the ranks agree: each step every rank
adds its flag to an all-reduce (MAX) on a gloo group of host tensors, started asynchronously at the end
of step i and read at the end of step i + 1, and all of them stop after the step at which the result
says so. On a GPU this costs no host synchronisation with the device and nothing inside a captured
CUDA graph: the all-reduce is CPU work between the processes, hidden behind the next step (a stop
therefore lands one step after the signal). One process needs no collective: the flag is read directly.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from moco_fast.distributed import host_group, is_distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint; exit with `exit_code`."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.should_stop(): ...` once per step, on every rank."""

    def __init__(self):
        self.received = 0           # the signal this process got (0: none)
        self.agreed = 0             # the signal every process acts on (0: none yet)
        self._previous, self._pending = {}, None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._pending is not None and exc[0] is None:
            self._pending[0].wait()  # every rank started as many all-reduces: each waits for its last one
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        # A Python handler runs between bytecodes of the main thread: nothing here may block.
        if not self.received:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name if self.agreed else ""

    def should_stop(self) -> bool:
        """Whether to stop after the step just finished; the same answer on every rank for the same step."""
        if self.agreed:
            return True
        if not is_distributed():
            self.agreed = self.received
            return bool(self.agreed)
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            self.agreed = int(flag)
        flag = torch.tensor([self.received], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group(), async_op=True), flag)
        return bool(self.agreed)


def exit_code(body, bad_input: tuple) -> int:
    """How a script's run ends, the same for every script: 0 done; 2 bad input (bad_input: a data set,
    a checkpoint, a flag that does not fit; one message on stderr); 143 / 130 stopped by SIGTERM /
    SIGINT after its checkpoint; 1 a failed write (a full disk, an unwritable --output-dir: the message
    names the path) or a lost peer process (torchrun --max-restarts and --resume auto continue)."""
    peer = (dist.DistError,) if hasattr(dist, "DistError") else ()
    try:
        body()
    except bad_input as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except peer as err:
        print(f"error: a peer process failed ({str(err).splitlines()[0][:200]}); the last checkpoint is kept: "
              "torchrun --max-restarts=N ... --resume auto continues from it", file=sys.stderr)
        return 1
    return 0
