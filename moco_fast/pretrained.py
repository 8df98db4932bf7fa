"""Pretrained backbones out of MoCo checkpoints: for kNN and linear evaluation, and for export.

Two checkpoint formats are read (with torch.load(weights_only=True)):
  moco_fast  what scripts/pretrain.py writes: {"model": MoCo.state_dict(), "config": {"arch", "mlp", ...}}
  official   facebookresearch/moco's main_moco.py: {"state_dict": {"module.encoder_q.*", ...}, "arch", ...}
             (v1: fc.weight (dim, 2048); v2: the MLP head fc.0 / fc.2)
Only the query encoder's backbone is kept: its fc (MoCo's projection head) is dropped. Split
BatchNorm (bn_splits > 1) saves the same keys as BatchNorm2d, so plain BatchNorm2d loads it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moco_fast import checkpoint
from moco_fast.checkpoint import CheckpointError
from moco_fast.encoders import get_encoder

_SHOW = 10  # keys named per kind of problem in an error


def _first(keys, n: int = _SHOW) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def _read(path: str) -> dict:
    """The checkpoint's dict; FileNotFoundError when absent, CheckpointError when it is not a usable file."""
    ckpt = checkpoint.load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _encoder_q(path: str, ckpt: dict) -> tuple[dict, str, str | None, dict | None]:
    """(encoder_q's state_dict with its own key names, source, arch in the checkpoint or None, config or None)."""
    if "model" in ckpt and "config" in ckpt:
        state, source, config = ckpt["model"], "moco_fast", ckpt["config"]
        arch = config.get("arch") if isinstance(config, dict) else None
        prefix = "encoder_q."
    elif "state_dict" in ckpt:
        state, source, config, arch = ckpt["state_dict"], "official", None, ckpt.get("arch")
        prefix = "module.encoder_q."
    else:
        raise CheckpointError(
            f"{path} is neither a moco_fast checkpoint (keys 'model' and 'config') nor an official "
            f"facebookresearch/moco one (key 'state_dict' with module.encoder_q.* weights): "
            f"its top-level keys are {_first(ckpt)}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the {source} checkpoint's weights are a {type(state).__name__}, not a dict")
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise CheckpointError(f"{path}: no {prefix}* keys among the {source} checkpoint's weights "
                              f"(the query encoder); found {_first(state)}")
    return encoder, source, arch, config


def load_backbone(path: str, arch: str | None = None, *, default_arch: str | None = None
                  ) -> tuple[nn.Module, dict]:
    """The query encoder's backbone from a moco_fast or official MoCo checkpoint, in eval mode.

    The model is get_encoder(arch)() with `fc = nn.Identity()`, so it returns (N, feature_dim)
    features. `arch` overrides the checkpoint's; `default_arch` is used only when the checkpoint
    names none. Returns (model, info) with info = {arch, feature_dim, source: "moco_fast" |
    "official", mlp, config (the moco_fast run's config dict, None for official checkpoints)}.
    Raises CheckpointError when the file is in neither format, names no arch and none is given,
    or holds weights that do not fit the arch (naming up to 10 missing, unexpected and
    mis-shaped keys).
    """
    ckpt = _read(path)
    encoder, source, ckpt_arch, config = _encoder_q(path, ckpt)
    chosen = arch or ckpt_arch or default_arch
    if chosen is None:
        raise CheckpointError(f"{path} ({source}) does not name its architecture: pass it with --arch "
                              "(arch='resnet50' from Python)")
    try:
        model = get_encoder(chosen)(num_classes=1)  # fc is dropped: its size does not matter
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    backbone = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in backbone]  # in the model's order: the first one tells most
    unexpected = [k for k in backbone if k not in expected]
    mis_shaped = [f"{k}: {tuple(backbone[k].shape)} in the checkpoint, {tuple(expected[k].shape)} in {chosen}"
                  for k in expected if k in backbone and backbone[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        origin = "given" if arch else "named by the checkpoint" if ckpt_arch else "the default given"
        raise CheckpointError(
            f"the query encoder in {path} ({source}) does not fit arch {chosen!r} ({origin}): "
            f"{len(missing)} missing keys {_first(missing)}, {len(unexpected)} unexpected keys "
            f"{_first(unexpected)}, {len(mis_shaped)} shape mismatches {_first(mis_shaped)}; "
            "pass the architecture it was trained with (--arch)")
    model.load_state_dict(backbone, strict=True)
    mlp = "fc.0.weight" in encoder  # the weights, not a config, say which head was trained
    info = {"arch": chosen, "feature_dim": feature_dim, "source": source, "mlp": mlp, "config": config}
    return model.eval(), info


def backbone_state_dict(path: str, arch: str | None = None, *, default_arch: str | None = None) -> dict:
    """The backbone's weights under the encoder's own (torchvision) key names, without fc.* keys.

    For a torchvision arch: `m = torchvision.models.<arch>(); m.fc = nn.Identity();
    m.load_state_dict(sd, strict=True)` works, and so does `torchvision.models.<arch>().load_state_dict(sd,
    strict=False)` with only fc.weight and fc.bias missing. For any arch, get_encoder(arch)() in place
    of torchvision.models.<arch>().
    """
    model, _ = load_backbone(path, arch, default_arch=default_arch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


_RESNET_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def to_detectron2(state_dict: dict) -> dict:
    """torchvision ResNet weights under detectron2's names, as the official
    detection/convert-pretrain-to-detectron2.py writes them: {"model": {name: numpy array},
    "__author__": "MOCO", "matching_heuristics": True}, to be pickled. fc.* keys are dropped.

    Raises ValueError for weights that are not a torchvision ResNet with its 7x7 stem (small_resnet,
    the cifar_* archs), which detectron2's ResNet cannot hold.
    """
    keys = [k for k in state_dict if not k.startswith("fc.")]
    foreign = [k for k in keys if not k.startswith(_RESNET_PREFIXES)]
    if foreign or "conv1.weight" not in state_dict:
        raise ValueError(f"to_detectron2: not torchvision ResNet weights (keys conv1.*, bn1.*, layer1-4.*): "
                         f"unexpected keys {_first(foreign)}")
    if tuple(state_dict["conv1.weight"].shape[-2:]) != (7, 7):
        raise ValueError(f"to_detectron2: the stem conv is {tuple(state_dict['conv1.weight'].shape[-2:])}, "
                         "not detectron2's 7x7 (a CIFAR-stem ResNet has no detectron2 equivalent)")
    model = {}
    for old in keys:
        k = old if "layer" in old else "stem." + old
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        model[k] = state_dict[old].detach().cpu().numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}
