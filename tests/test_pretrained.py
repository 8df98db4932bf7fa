"""moco_fast.pretrained, scripts/export.py and scripts/knn.py on checkpoints the tests write themselves,
in moco_fast's format and in the official facebookresearch/moco one. Nothing is downloaded."""
import importlib.util
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from moco_fast.encoders import get_encoder
from moco_fast.evaluate import backbone_only
from moco_fast.model import MoCo
from moco_fast.pretrained import CheckpointError, backbone_state_dict, load_backbone, to_detectron2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_moco(arch: str, mlp: bool = False, bn_splits: int = 1) -> MoCo:
    """A MoCo whose query encoder differs from its key encoder and whose BatchNorm statistics are not
    the defaults, so that loading the wrong encoder or dropping the statistics changes the features."""
    moco = MoCo(get_encoder(arch), dim=16, K=32, mlp=mlp, bn_splits=bn_splits)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in moco.encoder_q.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return moco


def save_moco_fast(moco: MoCo, path, arch: str, mlp: bool, bn_splits: int = 1, **config):
    cfg = {"arch": arch, "moco_dim": 16, "mlp": mlp, "moco_k": 32, "bn_splits": bn_splits, "data": None,
           "dataset": "auto", "image_size": 24, **config}
    torch.save({"model": moco.state_dict(), "optimizer": {}, "epoch": 1, "config": cfg}, path)
    return str(path)


def official_state(moco: MoCo) -> dict:
    state = {"module." + k: v for k, v in moco.state_dict().items()}
    state["module.queue"] = state["module.queue"].T.contiguous()  # the official queue is (dim, K)
    return state


def save_official(moco: MoCo, path, arch: str | None = "resnet18", drop: str | None = None):
    state = official_state(moco)
    if drop:
        del state[drop]
    ckpt = {"epoch": 200, "state_dict": state, "optimizer": {}}
    if arch:
        ckpt["arch"] = arch
    torch.save(ckpt, path)
    return str(path)


def reference_features(moco: MoCo, x: torch.Tensor) -> torch.Tensor:
    moco.eval()
    with torch.no_grad(), backbone_only(moco.encoder_q) as encoder:
        return encoder(x)


def run_script(name: str, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def script_main(name: str):
    """A script's main(argv), in this process: the cases beyond the one subprocess run per script
    skip the 4 s of importing torch again."""
    spec = importlib.util.spec_from_file_location(f"script_{name[:-3]}", ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("arch, mlp, bn_splits, size", [
    pytest.param("small_resnet", True, 2, 24, id="small_resnet-mlp-splitbn"),
    pytest.param("resnet18", False, 1, 32, id="resnet18-v1"),
    pytest.param("cifar_resnet18", False, 4, 24, id="cifar_resnet18-splitbn"),
    pytest.param("small_resnet_s2_p2", False, 4, 28, id="demo-arch-2x2-pool"),
])
def test_moco_fast_checkpoint_gives_encoder_q_backbone(tmp_path, arch, mlp, bn_splits, size):
    moco = tiny_moco(arch, mlp, bn_splits)
    path = save_moco_fast(moco, tmp_path / "checkpoint.pth", arch, mlp, bn_splits)
    model, info = load_backbone(path)
    x = torch.randn(3, 3, size, size)
    want = reference_features(moco, x)
    assert not model.training and isinstance(model.fc, nn.Identity)
    assert {k: info[k] for k in ("arch", "feature_dim", "source", "mlp")} == {
        "arch": arch, "feature_dim": want.shape[1], "source": "moco_fast", "mlp": mlp}
    assert info["config"]["bn_splits"] == bn_splits
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("mlp", [pytest.param(False, id="v1-fc"), pytest.param(True, id="v2-mlp")])
def test_official_checkpoint_gives_encoder_q_backbone(tmp_path, mlp):
    moco = tiny_moco("resnet18", mlp)
    assert ("module.encoder_q.fc.0.weight" in official_state(moco)) == mlp  # the official v2 head names
    path = save_official(moco, tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    model, info = load_backbone(path)
    assert {k: info[k] for k in ("arch", "feature_dim", "source", "mlp", "config")} == {
        "arch": "resnet18", "feature_dim": 512, "source": "official", "mlp": mlp, "config": None}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_features(moco, x), rtol=0, atol=0)


def test_arch_is_given_when_the_checkpoint_names_none(tmp_path):
    moco = tiny_moco("resnet18")
    path = save_official(moco, tmp_path / "no_arch.pth.tar", arch=None)
    with pytest.raises(CheckpointError, match="--arch"):
        load_backbone(path)
    assert load_backbone(path, "resnet18")[1]["arch"] == "resnet18"
    assert load_backbone(path, default_arch="resnet18")[1]["arch"] == "resnet18"
    named = save_official(moco, tmp_path / "named.pth.tar", arch="resnet18")
    with pytest.raises(CheckpointError, match="'resnet34' \\(given\\)"):  # the argument overrides
        load_backbone(named, "resnet34", default_arch="resnet18")


def test_weights_that_do_not_fit_the_arch_are_named(tmp_path):
    path = save_official(tiny_moco("resnet18"), tmp_path / "r18.pth.tar", arch="resnet18")
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "resnet34")  # resnet34 has 3 blocks in layer1, resnet18 2
    assert "missing keys" in str(err.value) and "'layer1.2.conv1.weight'" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, "resnet50")  # bottlenecks: conv3 is missing, shapes differ
    assert "'layer1.0.conv3.weight'" in str(err.value) and "shape mismatches" in str(err.value)
    assert "... and" in str(err.value)  # more than 10 missing keys: only 10 are listed
    stem = "0 missing keys [], 0 unexpected keys [], 1 shape mismatches ['conv1.weight: (64, 3, 7, 7) in the checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(stem)):
        load_backbone(path, "cifar_resnet18")  # the same names; only the stem's kernel differs
    r34 = {"module.encoder_q." + k: v for k, v in torchvision.models.resnet34().state_dict().items()}
    torch.save({"state_dict": r34, "arch": "resnet34"}, tmp_path / "r34.pth.tar")
    extra = "0 missing keys [], 96 unexpected keys ['layer1.2.conv1.weight',"
    with pytest.raises(CheckpointError, match=re.escape(extra)):
        load_backbone(str(tmp_path / "r34.pth.tar"), "resnet18")
    with pytest.raises(CheckpointError, match="unknown arch"):
        load_backbone(path, "resnet9000")


def test_checkpoints_in_neither_format_are_refused(tmp_path):
    torch.save({"foo": 1}, tmp_path / "foo.pth")
    with pytest.raises(CheckpointError, match="neither.*'foo'"):
        load_backbone(str(tmp_path / "foo.pth"))
    path = save_official(tiny_moco("resnet18"), tmp_path / "cut.pth.tar", drop="module.encoder_q.layer2.0.bn1.weight")
    with pytest.raises(CheckpointError, match=re.escape("1 missing keys ['layer2.0.bn1.weight']")):
        load_backbone(path)
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, tmp_path / "lincls.pth.tar")
    with pytest.raises(CheckpointError, match="no module.encoder_q"):
        load_backbone(str(tmp_path / "lincls.pth.tar"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_backbone(str(tmp_path / "text.pth"))
    with pytest.raises(FileNotFoundError):
        load_backbone(str(tmp_path / "absent.pth"))


# ------------------------------------------------------------------------------------------- export
def test_backbone_state_dict_loads_into_torchvision(tmp_path):
    """The documented claim: fc = Identity, then strict=True; or strict=False with only fc missing."""
    moco = tiny_moco("resnet18", mlp=True)
    sd = backbone_state_dict(save_moco_fast(moco, tmp_path / "checkpoint.pth", "resnet18", True))
    assert sd.keys() == {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    model = torchvision.models.resnet18()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert (sorted(missing), unexpected) == (["fc.bias", "fc.weight"], [])
    model.fc = nn.Identity()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_features(moco, x), rtol=0, atol=0)


def test_to_detectron2_names():
    sd = torchvision.models.resnet50().state_dict()
    out = to_detectron2(sd)
    assert out["__author__"] == "MOCO" and out["matching_heuristics"] is True
    names = out["model"]
    for name in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var",
                 "res2.0.conv1.weight", "res2.0.conv1.norm.weight", "res2.0.conv3.norm.bias",
                 "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean", "res5.2.conv2.norm.weight"):
        assert name in names, name
    assert not any("fc" in k or "layer" in k or "bn" in k or "downsample" in k for k in names)
    assert len(names) == len(sd) - 2  # every key but fc.weight and fc.bias
    assert names["res3.0.shortcut.norm.running_mean"].shape == (512,)
    assert (names["res4.1.conv2.weight"] == sd["layer3.1.conv2.weight"].numpy()).all()
    with pytest.raises(ValueError, match="layers"):
        to_detectron2(get_encoder("small_resnet")().state_dict())
    with pytest.raises(ValueError, match="7x7"):
        to_detectron2(get_encoder("cifar_resnet18")().state_dict())


def test_export_script_torchvision_and_detectron2(tmp_path, capsys):
    moco = tiny_moco("resnet18")
    ckpt = save_official(moco, tmp_path / "official.pth.tar")
    out = tmp_path / "exports" / "r18.pth"
    result = run_script("export.py", ckpt, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_features(moco, x), rtol=0, atol=0)

    pkl = tmp_path / "r18.pkl"
    assert script_main("export.py")([ckpt, "--out", str(pkl), "--format", "detectron2"]) == 0
    assert f"wrote {pkl}" in capsys.readouterr().out
    with open(pkl, "rb") as f:
        obj = pickle.load(f)
    assert obj["model"].keys() == to_detectron2(model.state_dict())["model"].keys()
    assert (obj["model"]["res3.0.shortcut.weight"] == model.layer2[0].downsample[0].weight.detach().numpy()).all()
    assert sorted(p.name for p in tmp_path.rglob(".tmp-*")) == []  # no temp file left


def test_export_script_bad_checkpoint_exits_2(tmp_path):
    torch.save({"foo": 1}, tmp_path / "foo.pth")
    result = run_script("export.py", tmp_path / "foo.pth", "--out", tmp_path / "out.pth")
    assert result.returncode == 2
    assert "error:" in result.stderr and "'foo'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.pth").exists()


# ---------------------------------------------------------------------------------------------- kNN
def make_folder(root: pathlib.Path, splits=("train", "val"), per_class: int = 8, size: int = 24):
    """Two classes that kNN can tell apart: dark and bright noise images."""
    generator = torch.Generator().manual_seed(0)
    for split in splits:
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=generator) * 128 + 127 * c).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def test_knn_script_end_to_end(tmp_path, capsys):
    """A query encoder that maps every image to 0 cannot tell the classes apart (every test image gets
    the same vote: 50% on 2 balanced classes), where raw pixels and the random key encoder can: so the
    printed accuracy is that of the checkpoint's query encoder."""
    data = make_folder(tmp_path / "data")
    moco = tiny_moco("small_resnet", bn_splits=2)
    with torch.no_grad():
        for name, t in moco.encoder_q.state_dict().items():
            t.fill_(1.0 if name.endswith("running_var") else 0.0)
    ckpt = save_moco_fast(moco, tmp_path / "checkpoint.pth", "small_resnet", False, 2)
    result = run_script("knn.py", data, "--pretrained", ckpt, "--image-size", "24", "--knn-k", "5", "-j", "0",
                        "-b", "8", "--json", tmp_path / "knn.json")
    assert result.returncode == 0, result.stderr[-3000:]
    top1 = float(re.search(r"top-1 ([\d.]+)%", result.stdout).group(1))
    assert 0 <= top1 <= 100 and top1 == 50.0
    r = json.loads((tmp_path / "knn.json").read_text())
    assert r["knn_top1"] == pytest.approx(top1, abs=0.01)
    assert (r["arch"], r["bank_size"], r["test_size"], r["classes"], r["image_size"]) == ("small_resnet", 16, 16, 2, 24)

    assert script_main("knn.py")([str(data), "--pixels", "--image-size", "24", "--knn-k", "5", "-j", "0"]) == 0
    assert "top-1 100.00%" in capsys.readouterr().out  # dark and bright images: raw pixels separate them


def test_knn_script_needs_a_held_out_split(tmp_path, capsys):
    data = make_folder(tmp_path / "data", splits=("train",))
    assert script_main("knn.py")([str(data), "--pixels", "-j", "0"]) == 2
    assert "no labelled held-out split" in capsys.readouterr().err
