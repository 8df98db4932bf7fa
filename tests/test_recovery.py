"""What a user or a cluster can do to a run, on real processes, signals and files: bad checkpoints, a
preemption signal (one process, and one rank under torchrun), a rank killed with kill -9 under
torchrun --max-restarts, a full disk, configuration errors. None of it loses work or ends in a traceback."""
import contextlib
import json
import os
import pathlib
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from moco_fast import checkpoint
from moco_fast.monitor import RunLog, plot_run, read_metrics
from test_distributed import ROOT, free_port
from test_train import FAST, make_folder, pretrain, train_rows

STEPS = 8  # 2 steps per epoch (32 images, batch 16): the runs cross epoch boundaries
RUN = [*FAST, "--epochs", "5", "-j", "0", "--checkpoint-minutes", "0"]  # a checkpoint after every step


@contextlib.contextmanager
def launch(*args, nproc: int = 0, **popen):
    """scripts/pretrain.py as a running process (under torchrun when nproc), stdout and stderr together;
    in its own session, which is killed on the way out, so a test that fails leaves no process behind."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}", *popen.pop("torchrun_args", [])]
    proc = subprocess.Popen([*launcher, str(ROOT / "scripts" / "pretrain.py"), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def wait_for_step(out: pathlib.Path, step: int, proc, timeout: float = 300) -> None:
    """Until metrics.jsonl shows `step` (the run is then past it, mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in read_metrics(out)):
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise TimeoutError(f"step {step} never came")


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of this rank: a child of the agent with RANK=<rank> in its environment."""
    for entry in pathlib.Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise LookupError(f"no rank {rank} under {agent_pid}")


def losses(out: pathlib.Path) -> list:
    return [(r["step"], r["loss"]) for r in train_rows(out)]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(data, output dir) of one uninterrupted run of STEPS steps: what an interrupted run must repeat."""
    root = tmp_path_factory.mktemp("recovery")
    data, out = make_folder(root / "data"), root / "whole"
    result = pretrain(str(data), *RUN, "--max-steps", str(STEPS), "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return data, out


def script_main(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"recovery_{name[:-3]}", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------- bad checkpoints
class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_files(folder: pathlib.Path, good: pathlib.Path) -> dict:
    """Each kind of file that is not a usable checkpoint, and a word its error must contain."""
    raw = good.read_bytes()
    files = {"truncated": (raw[: len(raw) - 100], "truncated"), "cut_in_half": (raw[: len(raw) // 2], "truncated"),
             "empty": (b"", "empty"), "garbage": (b"garbage " * 512, "not a torch checkpoint"),
             "unsafe_pickle": (pickle.dumps(RunsCode(folder / "PWNED")), "pickle")}
    paths = {}
    for name, (content, word) in files.items():
        (folder / f"{name}.pth").write_bytes(content)
        paths[name] = (folder / f"{name}.pth", word)
    torch.save({"x": RunsCode(folder / "PWNED")}, folder / "unsafe_object.pth")
    paths["unsafe_object"] = (folder / "unsafe_object.pth", "unsafe to unpickle")
    torch.save({"state": torch.zeros(2), "step": 3}, folder / "foreign.pth")
    paths["foreign"] = (folder / "foreign.pth", "another program")
    return paths


def test_every_script_turns_a_bad_checkpoint_into_one_clear_error(tmp_path, whole, capsys):
    data, out = whole
    paths = bad_files(tmp_path, out / "checkpoint.pth")
    runs = {"pretrain.py": lambda p: [str(data), *RUN, "--resume", str(p), "--output-dir", str(tmp_path / "r")],
            "knn.py": lambda p: [str(data), "--pretrained", str(p), "-a", "small_resnet", "-j", "0"],
            "export.py": lambda p: [str(p), "--out", str(tmp_path / "x.pth"), "-a", "small_resnet"],
            "lincls.py": lambda p: [str(data), "--pretrained", str(out / "checkpoint.pth"), "--resume", str(p),
                                    "-j", "0", "--image-size", "24", "--output-dir", str(tmp_path / "l")]}
    for script, argv in runs.items():
        main = script_main(script)
        for name, (path, word) in paths.items():
            if script != "pretrain.py" and script != "lincls.py" and name == "foreign":
                word = "neither"  # knn and export read pretraining checkpoints of two formats
            assert main(argv(path)) == 2, (script, name)
            err = capsys.readouterr().err
            assert err.startswith("error: ") and str(path) in err and word in err, (script, name, err)
    assert not (tmp_path / "PWNED").exists()  # the unsafe pickles were refused, never run
    # the case of the issue, as a user meets it: a truncated checkpoint under --resume auto, no traceback
    auto = tmp_path / "auto"
    auto.mkdir()
    shutil.copy(paths["truncated"][0], auto / "checkpoint.pth")
    result = pretrain(str(data), *RUN, "--resume", "auto", "--output-dir", str(auto))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "skipped cannot read" in result.stdout and "none of the 1 checkpoints" in result.stderr


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_good_one(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"w": torch.ones(3)}, str(path))
    good = path.read_bytes()
    with pytest.raises(checkpoint.CheckpointWriteError, match="does not load back.*unsafe to unpickle"):
        checkpoint.save_atomic({"w": torch.ones(3), "cfg": RunsCode(tmp_path / "x")}, str(path))  # torch.save takes it
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pth"]


# ------------------------------------------------------------------------------------ preemption
def test_ctrl_c_finishes_the_step_and_the_resumed_run_is_bitwise(tmp_path, whole):
    data, ref = whole
    out = tmp_path / "run"
    # Ctrl-C reaches the whole process group: the trainer and its two loader workers
    with launch(str(data), *RUN, "-j", "2", "--max-steps", str(STEPS), "--output-dir", str(out)) as proc:
        wait_for_step(out, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in log, log[-3000:]
    stopped = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert 2 <= stopped < STEPS and f"stopped by SIGINT after step {stopped}" in log
    assert [s for s, _ in losses(out)] == list(range(1, stopped + 1))  # the stop step is logged too
    resumed = pretrain(str(data), *RUN, "--max-steps", str(STEPS), "--resume", "auto", "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {stopped}" in resumed.stdout
    assert losses(out) == losses(ref)  # bitwise, every step once
    assert not list(out.glob(".tmp-*"))


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, whole):
    data, _ = whole
    out = tmp_path / "ddp"
    with launch(str(data), *RUN, "--max-steps", "40", "--epochs", "20", "--output-dir", str(out), nproc=2) as proc:
        wait_for_step(out, 2, proc)
        os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it from the all-reduce
        log = proc.communicate(timeout=300)[0]
    stopped = torch.load(out / "checkpoint.pth", weights_only=True)["global_step"]
    assert f"stopped by SIGTERM after step {stopped}" in log and "all 2 process(es) at the same step" in log, log[-4000:]
    assert "peer process failed" not in log and stopped < 40
    assert [r["step"] for r in train_rows(out)] == list(range(1, stopped + 1))


# ------------------------------------------------------------------------------------ dead worker
def test_torchrun_restarts_after_kill_9_and_the_log_has_every_step_once(tmp_path, whole):
    data, _ = whole
    out = tmp_path / "restart"
    with launch(str(data), *RUN, "--max-steps", str(STEPS), "--resume", "auto", "--output-dir", str(out),
                nproc=2, torchrun_args=["--max-restarts=1"]) as proc:
        wait_for_step(out, 3, proc)
        os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
        log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-4000:]
    assert "resumed from" in log  # the restarted group continued from the last checkpoint
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") and json.loads(line) for line in lines)  # no half-written line
    assert [r["step"] for r in train_rows(out)] == list(range(1, STEPS + 1))  # none twice, none missing
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == STEPS
    assert not list(out.glob(".tmp-*"))


# ------------------------------------------------------------------------------------- full disk
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, whole):
    """The latest checkpoint is damaged; --resume auto falls back to the one before it and says why; the next
    write hits a file-size limit (as a full disk): the run stops naming the path and the cause, the
    checkpoints are untouched, no temp file is left."""
    data, ref = whole
    out = tmp_path / "full"
    shutil.copytree(ref, out)
    raw = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(raw[: len(raw) // 3])
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint*.pth")}
    limit = len(raw) // 2  # room for the logs, not for a checkpoint
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pretrain.py"), str(data), *RUN, "--max-steps", str(STEPS + 2),
         "--epochs", "6", "--resume", "auto", "--output-dir", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"skipped cannot read {out / 'checkpoint.pth'}: it is truncated" in result.stdout
    assert f"resumed from {out / 'checkpoint_prev.pth'}" in result.stdout
    assert f"cannot write the checkpoint {out / 'checkpoint.pth'}: File too large (EFBIG)" in result.stderr
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint*.pth")} == before
    assert not list(out.glob(".tmp-*"))


def test_unwritable_output_dir_is_one_message(tmp_path, whole, capsys):
    data, _ = whole
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "run"  # under a regular file: not creatable, even by root
    assert script_main("pretrain.py")([str(data), *RUN, "--output-dir", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(target) in err and "Not a directory" in err


# ------------------------------------------------------------------------------------- metrics
def test_readers_skip_a_half_written_line_and_a_resume_drops_the_steps_after_it(tmp_path):
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"kind": "train", "step": 6, "lo')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert plot_run(str(tmp_path)) is not None
    RunLog(str(tmp_path), True, resume_step=3).close()  # continue from a checkpoint at step 3
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])


# --------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("flags, message", [
    (["-a", "nosucharch"], "invalid choice: 'nosucharch' (choose from 'cifar_resnet18'"),
    (["--queue-dtype", "float16"], "invalid choice: 'float16' (choose from 'float32', 'bfloat16')"),
    (["--amp", "fp16"], "invalid choice: 'fp16' (choose from 'auto', 'bf16', 'off')"),
    (["-b", "6", "--bn-splits", "4"], "--bn-splits 4 does not divide the batch of 6"),
    (["--image-size", "2"], "--image-size must be >= 8"),
    (["-b", "64"], "has 32 training images, fewer than one batch of --batch-size 64"),
], ids=["arch", "queue-dtype", "amp", "bn-splits", "image-size", "data-too-small"])
def test_configuration_errors_come_first_as_argument_errors(tmp_path, whole, capsys, flags, message):
    data, _ = whole
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        script_main("pretrain.py")([str(data), *RUN, *flags, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: ") and message in err, err
    assert not (out / "checkpoint.pth").exists()
