"""Linear classification on frozen features: end to end, the sanity check, cached features."""
import json
import os
import signal

import pytest
import torch

from moco_fast import data
from moco_fast.encoders import get_encoder
from moco_fast.config import LinclsConfig
from moco_fast.evaluate import BackboneChanged, sanity_check
from moco_fast.lincls import find_resume, frozen, train_linear
from moco_fast.monitor import RunLog
from moco_fast.preemption import Stopped, StopRequest
from test_distributed import run_script
from test_train import ROOT, make_folder, pretrain

LINCLS = ROOT / "scripts" / "lincls.py"


def lincls(*args, nproc: int = 0):
    return run_script(LINCLS, *args, nproc=nproc)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lincls")
    folder = make_folder(root / "data")
    result = pretrain(str(folder), "-a", "small_resnet", "--moco-dim", "16", "--moco-k", "32", "-b", "16",
                      "--no-compile", "--image-size", "24", "--max-steps", "2", "--output-dir", str(root / "pre"))
    assert result.returncode == 0, result.stderr[-2000:]
    return folder, root / "pre" / "checkpoint.pth"


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached"])
def test_one_linear_epoch_end_to_end(tmp_path, pretrained, cached):
    folder, ckpt = pretrained
    out = tmp_path / "lin"
    result = lincls(str(folder), "--pretrained", str(ckpt), "--epochs", "2", "-b", "8", "-j", "0", "--image-size",
                    "24", "--output-dir", str(out), *(["--cached-features"] if cached else []))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "backbone unchanged" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["acc1"] <= r["acc5"] <= 100 for r in rows)
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 2 and ck["fc"]["weight"].shape == (2, 64)  # small_resnet: 64-d features, 2 classes
    assert (out / "plot.png").exists()


def test_wrong_checkpoint_is_a_clear_error(tmp_path, pretrained):
    folder, _ = pretrained
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    result = lincls(str(folder), "--pretrained", str(bad), "--output-dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "error:" in result.stderr and "foo" in result.stderr, result.stderr[-2000:]


def test_sanity_check_catches_a_changed_backbone():
    backbone, reference = frozen(get_encoder("small_resnet")(num_classes=4))
    sanity_check(backbone, reference)  # untouched: passes
    with torch.no_grad():
        backbone.bn1.running_mean.add_(1e-3)  # even a BatchNorm statistic counts
    with pytest.raises(BackboneChanged, match="bn1.running_mean"):
        sanity_check(backbone, reference)


def test_cached_features_match_the_direct_path_without_augmentation(tmp_path, pretrained):
    folder, _ = pretrained
    backbone = get_encoder("small_resnet")(num_classes=4)
    backbone.fc = torch.nn.Identity()
    backbone, _ = frozen(backbone)
    spec = {**data.DATASETS["imagefolder"]._asdict(), "image_size": 24}
    plain = data.eval_transform(**spec)
    train = data.build_dataset(str(folder), "train", plain)
    val = data.build_dataset(str(folder), "val", plain)
    direct = [data.make_loader(ds, 8, 0, shuffle=False, drop_last=False) for ds in (train, val)]
    with torch.no_grad():
        feats = [[(backbone(x), y) for x, y, _ in loader] for loader in direct]
    cached = [[(f, y) for f, y in batches] for batches in feats]  # the same batches, features computed once
    results = []
    for loaders, is_cached in ((direct, False), (cached, True)):
        torch.manual_seed(0)
        cfg = LinclsConfig(epochs=2, lr=1.0, output_dir=str(tmp_path / f"run{is_cached}"))
        log = RunLog(cfg.output_dir, True)
        results.append(train_linear(cfg, backbone, 64, loaders[0], loaders[1], 2, "cpu", log, cached=is_cached))
        log.close()
    assert results[0]["last"] == results[1]["last"]


def test_two_processes_under_torchrun(tmp_path, pretrained):
    folder, ckpt = pretrained
    out = tmp_path / "ddp"
    result = lincls(str(folder), "--pretrained", str(ckpt), "--epochs", "2", "-b", "8", "-j", "0", "--image-size", "24",
                    "--output-dir", str(out), nproc=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert [r["epoch"] for r in _rows(out, "lincls")] == [1, 2]  # rank 0 alone writes
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2


def _rows(out, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_resume_continues_where_it_stopped(tmp_path, pretrained):
    folder, ckpt = pretrained
    out = tmp_path / "res"
    common = [str(folder), "--pretrained", str(ckpt), "-b", "8", "-j", "0", "--image-size", "24", "--cached-features",
              "--output-dir", str(out)]
    whole = lincls(*common[:-1], str(tmp_path / "whole"), "--epochs", "3")
    first = lincls(*common, "--epochs", "1")
    second = lincls(*common, "--epochs", "3", "--resume", "auto")
    assert whole.returncode == first.returncode == second.returncode == 0, second.stderr[-2000:]
    assert "resumed at epoch 1" in second.stdout
    rows, ref = _rows(out, "lincls"), _rows(tmp_path / "whole", "lincls")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [(r["loss"], r["acc1"]) for r in rows] == [(r["loss"], r["acc1"]) for r in ref]  # bitwise
    train, train_ref = _rows(out, "train"), _rows(tmp_path / "whole", "train")  # every -p steps
    assert train and [(r["step"], r["loss"]) for r in train] == [(r["step"], r["loss"]) for r in train_ref]


def test_max_steps_print_freq_and_evaluate_only(tmp_path, pretrained):
    """The common flags of both scripts: --max-steps ends the run mid-epoch with a checkpoint of that
    step, -p logs a train row every p steps, and -e evaluates the saved head without training or writing."""
    folder, ckpt = pretrained
    out = tmp_path / "short"
    common = [str(folder), "--pretrained", str(ckpt), "-b", "8", "-j", "0", "--image-size", "24", "--cached-features",
              "--output-dir", str(out)]
    short = lincls(*common, "--epochs", "3", "--max-steps", "5", "-p", "2")
    assert short.returncode == 0, short.stderr[-2000:]
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    steps_per_epoch = len(list((folder / "train").rglob("*.*"))) // 8 + bool(len(list((folder / "train").rglob("*.*"))) % 8)
    assert steps_per_epoch < 5 and ck["epoch"] * steps_per_epoch + ck["step_in_epoch"] == 5  # mid-epoch 2
    assert 0 < ck["step_in_epoch"] < steps_per_epoch
    assert [r["step"] for r in _rows(out, "train")] == [2, 4]
    assert [r["epoch"] for r in _rows(out, "lincls")] == [1, 1 + ck["step_in_epoch"] / steps_per_epoch]
    metrics = (out / "metrics.jsonl").read_text()
    evaluated = lincls(*common, "-e", "--resume", "auto")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "evaluated" in evaluated.stdout and "top-1" in evaluated.stdout
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing written
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step_in_epoch"] == ck["step_in_epoch"]
    missing = lincls(*common[:-1], str(tmp_path / "empty"), "-e")
    assert missing.returncode == 2 and "-e/--evaluate needs --resume" in missing.stderr


class _SignalAt:
    """Batches of features that send this process SIGTERM while yielding batch `at` (a cluster's stop)."""

    def __init__(self, batches, at: int):
        self.batches, self.at = batches, at

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def test_sigterm_mid_epoch_saves_that_step_and_resume_repeats_the_whole_run(tmp_path):
    """A stop request during linear training: the step finishes, its checkpoint is written, Stopped is
    raised (exit 143 in the script); --resume from it ends bitwise where the uninterrupted run ends."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loaders = lambda: (data.TensorBatches(x, y, 8, shuffle=True), data.TensorBatches(x, y, 8, shuffle=False))  # noqa: E731
    whole_cfg = LinclsConfig(epochs=2, lr=1.0, batch_size=8, output_dir=str(tmp_path / "whole"))
    whole = train_linear(whole_cfg, None, 8, *loaders(), 2, "cpu", RunLog(whole_cfg.output_dir, False), cached=True)
    cfg = LinclsConfig(epochs=2, lr=1.0, batch_size=8, output_dir=str(tmp_path / "stopped"), resume="auto")
    train, val = loaders()
    with StopRequest() as stop, pytest.raises(Stopped) as stopped:
        train_linear(cfg, None, 8, _SignalAt(train, at=2), val, 2, "cpu", RunLog(cfg.output_dir, False),
                     cached=True, stop=stop)
    assert stopped.value.exit_code == 143 and "batch 3" in str(stopped.value)
    ck = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"]) == (0, 3)
    resumed = train_linear(cfg, None, 8, *loaders(), 2, "cpu", RunLog(cfg.output_dir, False), cached=True,
                           resume=find_resume(cfg))
    assert resumed == whole
