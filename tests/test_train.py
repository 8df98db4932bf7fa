"""The pretraining trainer end to end on a small image folder the tests make: one process, two processes
under torchrun, stop and resume, bad data, a corrupt image, a non-finite loss, --max-steps, the outputs."""
import json
import pathlib

import pytest
import torch
from PIL import Image

from test_distributed import run_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "scripts" / "pretrain.py"
FAST = ["-a", "small_resnet", "--moco-dim", "16", "--moco-k", "40", "-b", "16", "--epochs", "3", "--lr", "0.05",
        "--no-compile", "--print-freq", "1", "--image-size", "24", "--seed", "3", "--bn-splits", "2"]


def make_folder(root: pathlib.Path, per_class: int = 16, classes: int = 2, val: bool = True, corrupt: int = 0,
                ext: str = "png"):
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val") if val else ("train",):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = (torch.rand(28, 28, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
    for i in range(corrupt):
        (root / "train" / "class0" / f"broken{i}.jpg").write_bytes(b"not an image at all" * 10)
    return root


def pretrain(*args, nproc: int = 0, timeout: int = 600):
    return run_script(PRETRAIN, *args, nproc=nproc, timeout=timeout)


def train_rows(out: pathlib.Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_one_process_end_to_end_and_outputs(tmp_path):
    data, out = make_folder(tmp_path / "data"), tmp_path / "run"
    result = pretrain(str(data), *FAST, "--max-steps", "5", "--knn-every", "1", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert '"moco_k": 40' in result.stdout  # the resolved config is printed
    assert json.loads((out / "config.json").read_text())["batch_size"] == 16
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # --max-steps honoured, one row per step
    for r in rows:
        assert all(key in r for key in ("loss", "acc1", "acc5", "lr", "moco_m", "img_per_s", "data_wait"))
        assert r["loss"] > 0 and 0 <= r["acc1"] <= r["acc5"] <= 100
    knn = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"knn"' in line]
    assert knn and all(0 <= r["knn_top1"] <= 100 for r in knn)
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["global_step"] == 5 and ck["epoch"] == 2 and ck["step_in_epoch"] == 1  # 2 steps per epoch
    assert ck["model"]["queue"].shape == (40, 16) and ck["config"]["moco_k"] == 40
    assert (out / "plot.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    assert not list(out.glob(".tmp-*"))  # no half-written files left behind


@pytest.mark.parametrize("gpu_aug", ["false", "true"], ids=["cpu-workers", "gpu-aug-on-cpu"])
def test_stop_and_resume_is_exact(tmp_path, gpu_aug):
    data = make_folder(tmp_path / "data", ext="jpg")
    whole, part = tmp_path / "whole", tmp_path / "part"
    args = (str(data), *FAST, "--gpu-aug", gpu_aug)
    assert pretrain(*args, "--max-steps", "5", "-j", "2", "--output-dir", str(whole)).returncode == 0
    first = pretrain(*args, "--max-steps", "3", "-j", "2", "--output-dir", str(part))
    assert first.returncode == 0, first.stderr[-3000:]
    second = pretrain(*args, "--max-steps", "5", "-j", "0", "--resume", "auto", "--output-dir", str(part))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    # any number of workers, across an epoch boundary (step 3 is mid-epoch 1): bitwise the same losses
    assert [r["loss"] for r in train_rows(part)] == [r["loss"] for r in train_rows(whole)]
    a, b = (torch.load(d / "checkpoint.pth", weights_only=True)["model"] for d in (whole, part))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("gpu_aug", ["false", "true"], ids=["cpu-workers", "gpu-aug-on-cpu"])
def test_two_processes_under_torchrun(tmp_path, gpu_aug):
    data, out = make_folder(tmp_path / "data", ext="jpg"), tmp_path / "run"
    result = pretrain(str(data), *FAST, "--gpu-aug", gpu_aug, "--max-steps", "3", "--output-dir", str(out), nproc=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert [r["step"] for r in train_rows(out)] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty" / "train").mkdir(parents=True) or p / "empty", "no class folders"),
])
def test_bad_data_path_fails_before_any_work(tmp_path, make, message):
    result = pretrain(str(make(tmp_path)), *FAST, "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_corrupt_image_is_skipped_then_stops_past_threshold(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8, val=False, corrupt=1)  # 17 files: every epoch meets it
    ok = pretrain(str(data), *FAST, "--max-steps", "2", "--output-dir", str(tmp_path / "a"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert train_rows(tmp_path / "a")[-1]["skipped_images"] >= 1
    stop = pretrain(str(data), *FAST, "--max-steps", "2", "--max-bad-images", "0", "--output-dir", str(tmp_path / "b"))
    assert stop.returncode == 2 and "broken0.jpg" in stop.stderr, stop.stderr[-2000:]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    data, out = make_folder(tmp_path / "data"), tmp_path / "run"
    assert pretrain(str(data), *FAST, "--max-steps", "2", "--output-dir", str(out)).returncode == 0
    good = (out / "checkpoint.pth").read_bytes()
    result = pretrain(str(data), *FAST, "--lr", "1e38", "--max-steps", "6", "--resume", "auto",
                      "--output-dir", str(out))
    assert result.returncode == 2 and "at step" in result.stderr, result.stderr[-2000:]
    assert "the loss is nan" in result.stderr or "the loss is inf" in result.stderr
    assert (out / "checkpoint.pth").read_bytes() == good


@pytest.mark.skipif(not pathlib.Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_demo_runs_with_no_data_argument(tmp_path):
    result = pretrain("--max-steps", "2", "--knn-every", "0", "--output-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"preset": "demo"' in result.stdout and '"arch": "small_resnet_s2_p2"' in result.stdout
    assert '"gpu_aug": true' in result.stdout and '"crop_scale": 0.3' in result.stdout  # tensors, no PIL workers
    assert [r["step"] for r in train_rows(tmp_path / "demo")] == [2]  # print-freq 20: the last step is logged



def test_gpu_data_path_on_the_cpu_counts_cpu_decodes_and_skips(tmp_path):
    """--gpu-aug on CPU tensors: the same path as on a GPU. PNGs are decoded by PIL and counted, a corrupt
    file is replaced and reported; the batches reach the model."""
    data = make_folder(tmp_path / "data", per_class=8, val=False, corrupt=1, ext="jpg")
    for i in range(3):
        Image.new("RGB", (30, 20), (i * 60, 10, 200)).save(data / "train" / "class1" / f"extra{i}.png")
    out = tmp_path / "run"
    result = pretrain(str(data), *FAST, "--gpu-aug", "true", "--epochs", "5", "--max-steps", "4", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["skipped_images"] >= 1 and rows[-1]["cpu_decodes"] >= 1  # 20 files: 4 steps of 16 meet both
    assert all(r["loss"] > 0 for r in rows)


def test_gpu_data_path_keeps_a_small_set_in_memory(tmp_path):
    from test_data import write_mnist_like
    write_mnist_like(tmp_path / "data", n_train=40, compress=True)  # the demo's 4 .gz files, tiny
    out = tmp_path / "run"
    result = pretrain(str(tmp_path / "data"), *FAST, "--gpu-aug", "true", "--max-steps", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert '"gpu_aug": true' in result.stdout
    assert [r["step"] for r in train_rows(out)] == [1, 2]
