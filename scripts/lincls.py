"""Linear classification of a pretrained MoCo encoder (the official main_lincls.py recipe).

    python scripts/lincls.py --pretrained runs/moco/checkpoint.pth            # the demo's checkpoint
    python scripts/lincls.py /data/imagenet --pretrained moco_v2_800ep_pretrain.pth.tar
    python scripts/lincls.py /data/cifar --pretrained runs/cifar/checkpoint.pth --cached-features
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moco_fast.data import DataError  # noqa: E402
from moco_fast.lincls import BackboneChanged, parse_args, run_lincls  # noqa: E402
from moco_fast.pretrained import CheckpointError, load_backbone  # noqa: E402


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        backbone, info = load_backbone(cfg.pretrained, cfg.arch)
        print(f"pretrained: {cfg.pretrained} ({info['source']} format, {info['arch']}, "
              f"{info['feature_dim']}-d features)", flush=True)
        run_lincls(cfg, backbone, info["feature_dim"], device)
    except (ValueError, DataError, CheckpointError, FileNotFoundError, BackboneChanged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
