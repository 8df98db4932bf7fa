"""Checkpoints: the one atomic writer and the one loader every script goes through.

A checkpoint holds everything a run needs to continue bitwise where it stopped on the CPU: model
(queue and pointer included), optimizer, position, the RNG states of Python, NumPy, torch and
CUDA, and the resolved config. Writing goes to a temp file that is fsynced and read back before it
is renamed over the old one, so a crash, a full disk or an unloadable object never replaces a good
checkpoint. Loading is torch.load(weights_only=True) only: nothing in a file can run code, and
whatever is wrong with a file (missing, empty, truncated, not a checkpoint, unsafe to unpickle,
from another program) is one CheckpointError naming the file and the cause.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import pickle
import random
import re
import tempfile

import numpy as np
import torch

TEMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written; the previous one is untouched and no temp file is left."""


# ------------------------------------------------------------------------------------------ write
@contextlib.contextmanager
def atomic_file(path: str, text: bool = False, shared: bool = False, check=None, keep_previous: str | None = None):
    """The one atomic writer: yields a temp file next to path; when the body returns, the file is
    fsynced, check(temp path) runs (it may raise), the old file moves to keep_previous when given, and
    the temp file is renamed over path (then the directory is fsynced, so the rename survives a power
    cut). On any error path is untouched and no temp file is left. shared: readable by every user
    (mkstemp's 0600 would hide an export or a shared cache)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        if shared:
            os.chmod(tmp, 0o644)
        if keep_previous and os.path.isfile(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_atomic(obj: dict, path: str, keep_previous: str | None = None) -> None:
    """torch.save(obj) through atomic_file: a crash leaves either the old file or the new one.

    The new file is read back (weights_only=True) before it replaces the old one: an object that
    torch.save accepts but a safe load refuses never costs the last good checkpoint. keep_previous:
    the old file is moved there first, so a checkpoint damaged later still leaves one to resume from.
    """
    try:
        with atomic_file(path, check=lambda tmp: _read_back(tmp, path, obj), keep_previous=keep_previous) as f:
            _save(obj, f)
    except CheckpointWriteError:
        raise
    except OSError as err:
        raise CheckpointWriteError(f"cannot write the checkpoint {path}: {_os_cause(err)}; "
                                   "the previous checkpoint is kept") from None
    except RuntimeError as err:  # torch.save reports a failed write of its zip writer this way
        raise CheckpointWriteError(f"cannot write the checkpoint {path}: {_first_line(err)}; "
                                   "the previous checkpoint is kept") from None


def write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path, text=True) as f:
        f.write(text)


class _Recorded:
    """A file that remembers the OSError (ENOSPC, EFBIG) a write raised: torch.save swallows it and
    reports only an offset mismatch of its zip writer."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _save(obj: dict, f) -> None:
    recorded = _Recorded(f)
    try:
        torch.save(obj, recorded)
    except RuntimeError:
        if recorded.error is not None:
            raise recorded.error from None
        raise


def _read_back(tmp: str, path: str, obj: dict) -> None:
    # mmap: the archive's directory and every pickle are read, the tensor bytes only mapped (cheap)
    try:
        back = torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointWriteError(f"the checkpoint written for {path} does not load back: "
                                   f"{describe_load_error(tmp, err)}; it was not kept, the previous "
                                   "checkpoint is untouched") from None
    if not isinstance(back, dict) or back.keys() != obj.keys():
        raise CheckpointWriteError(f"the checkpoint written for {path} reads back other keys than were "
                                   "written; it was not kept, the previous checkpoint is untouched")


def _fsync_dir(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _os_cause(err: OSError) -> str:
    if not err.errno:
        return str(err)
    return f"{err.strerror} ({errno.errorcode.get(err.errno, err.errno)})"  # e.g. No space left on device (ENOSPC)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def remove_stale_temps(directory: str) -> list[str]:
    """Temp files a killed writer (kill -9, power cut) left behind; only this run's writer makes them."""
    stale = glob.glob(os.path.join(glob.escape(directory), TEMP_PREFIX + "*"))
    for path in stale:
        os.unlink(path)
    return stale


# ------------------------------------------------------------------------------------------- read
def load(path: str, map_location="cpu", mmap: bool = False):
    """torch.load(path, weights_only=True); FileNotFoundError when absent, CheckpointError for the rest."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot read {path}: it is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises anything from EOFError to OSError(EINVAL) for a bad file
        raise CheckpointError(f"cannot read {path}: {describe_load_error(path, err)}") from None


def describe_load_error(path: str, err: Exception) -> str:
    """What torch.load's exception says about the file, in one sentence."""
    if isinstance(err, PermissionError):
        return "permission denied"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = os.path.getsize(path)
    except OSError as e:
        return _os_cause(e)
    if size == 0:
        return "the file is empty (0 bytes)"
    unsafe = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(err))
    if unsafe:
        return (f"it holds a Python object ({unsafe.group(1)}) that is unsafe to unpickle; refused by "
                "weights_only=True, nothing in it was run. Only load it if you trust its source, and "
                "convert it to plain tensors")
    if head == b"PK\x03\x04":  # torch.save's zip archive whose end (its directory) is missing or damaged
        return f"it is truncated or damaged ({size} bytes; an incomplete torch.save archive: {_short(err)})"
    if isinstance(err, pickle.UnpicklingError) and head[:1] == b"\x80":
        return ("it is a plain pickle that weights_only=True cannot read safely (not torch.save's format, "
                f"or Python objects beyond tensors: {_short(err)})")
    return f"it is not a torch checkpoint (it starts with the bytes {head!r}: {_short(err)})"


def _short(err: Exception) -> str:
    text = str(err)
    m = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    line = m.group(1).strip().splitlines()[0] if m else _first_line(err)
    return line.split(". This is an internal miniz error")[0] if line else type(err).__name__


def load_checkpoint(path: str, required: tuple, what: str, mmap: bool = False) -> dict:
    """load(path), then CheckpointError unless it is a dict with every key in `required` (`what` names
    the program that writes such checkpoints, for the message)."""
    ck = load(path, mmap=mmap)
    if not isinstance(ck, dict):
        raise CheckpointError(f"cannot use {path}: it holds a {type(ck).__name__}, not {what}")
    missing = [k for k in required if k not in ck]
    if missing:
        raise CheckpointError(f"cannot use {path}: it is not {what} (it lacks {missing}; its keys are "
                              f"{sorted(ck)[:10]}); a file from another program?")
    return ck


def newest_loadable(paths: list[str], required: tuple, what: str, position) -> tuple[str | None, dict | None, list]:
    """Among paths (those that exist), the checkpoint furthest along (position(ck), then the newest
    file) that loads; returns (path, checkpoint, [(skipped path, why)]). Candidates are read with
    mmap, so looking at every one of them costs little; the winner is read in full."""
    found, skipped = [], []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            ck = load_checkpoint(path, required, what, mmap=True)
            found.append(((position(ck), os.path.getmtime(path)), path))
        except CheckpointError as err:
            skipped.append((path, str(err)))
    if not found:
        return None, None, skipped
    _, best = max(found)
    return best, load_checkpoint(best, required, what), skipped


def find_resume(resume: str, candidates: list[str], required: tuple, what: str, position,
                say=print) -> tuple[str | None, dict | None]:
    """(path, checkpoint) to continue from, or (None, None) for a fresh run. --resume PATH must load;
    --resume auto takes the checkpoint furthest along (position) among candidates that loads, and says
    which it skipped and why; when none of them loads it is an error, not a silent fresh start."""
    if not resume:
        return None, None
    if resume != "auto":
        return resume, load_checkpoint(resume, required, what)
    path, ck, skipped = newest_loadable(candidates, required, what, position)
    for _, why in skipped:
        say(f"--resume auto: skipped {why}")
    if path is None and skipped:
        where = os.path.dirname(candidates[0]) or "."
        raise CheckpointError(f"--resume auto: none of the {len(skipped)} checkpoints in {where} loads (above); "
                              "move them away to start afresh there, or pass --resume PATH")
    return path, ck


def candidates(output_dir: str, per_epoch: bool = False) -> list[str]:
    """What --resume auto looks at: the latest checkpoint, the one it replaced, the per-epoch ones."""
    join = lambda name: os.path.join(output_dir, name)  # noqa: E731
    epochs = sorted(glob.glob(join("checkpoint_epoch*.pth"))) if per_epoch else []
    return [join("checkpoint.pth"), join("checkpoint_prev.pth"), *epochs]


# ------------------------------------------------------------------------------- pretraining's
PRETRAIN_KEYS = ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng", "config")
PRETRAIN_WHAT = "a checkpoint of scripts/pretrain.py"


def save_pretrain(cfg, model, opt_state: dict, pos: dict, skipped: int, name: str = "checkpoint.pth") -> str:
    """The latest checkpoint.pth replaces the one before it only once it reads back; that one is kept
    as checkpoint_prev.pth, for --resume auto to fall back on."""
    path = os.path.join(cfg.output_dir, name)
    previous = os.path.join(cfg.output_dir, "checkpoint_prev.pth") if name == "checkpoint.pth" else None
    save_atomic({"model": model.state_dict(), "optimizer": opt_state, **pos, "rng": rng_state(),
                 "config": cfg.to_dict(), "skipped_images": skipped}, path, keep_previous=previous)
    return path


def restore_pretrain(model, opt, path: str, ck: dict) -> dict:
    """Load a pretraining checkpoint into the model, the optimizer and the RNGs; returns the position."""
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        raise CheckpointError(f"cannot resume from {path}: it does not fit this run's model or optimizer "
                              f"(another --arch, --moco-dim, --moco-k, --mlp?): {text[:400]}") from None
    set_rng_state(ck["rng"])
    return {key: ck[key] for key in ("epoch", "step_in_epoch", "global_step")}


# -------------------------------------------------------------------------------------------- rng
def rng_state() -> dict:
    """Every random number generator a step touches, in types weights_only loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    # random.setstate wants tuples; a round trip through some serialisers turns them into lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
