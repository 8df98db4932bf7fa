"""Linear classification of a pretrained MoCo encoder (the official main_lincls.py recipe).

    python scripts/lincls.py --pretrained runs/moco/checkpoint.pth            # the demo's checkpoint
    python scripts/lincls.py /data/imagenet --pretrained moco_v2_800ep_pretrain.pth.tar
    python scripts/lincls.py /data/cifar --pretrained runs/cifar/checkpoint.pth --cached-features
    torchrun --nproc_per_node=8 scripts/lincls.py /data/imagenet --pretrained runs/v2/checkpoint.pth
    python scripts/lincls.py --baseline pixels                                  # what features must beat
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast.distributed import cleanup_distributed, setup_distributed  # noqa: E402
from moco_fast.data import DataError  # noqa: E402
from moco_fast.lincls import BackboneChanged, baseline_backbone, parse_args, run_lincls  # noqa: E402
from moco_fast.pretrained import CheckpointError, load_backbone  # noqa: E402


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        process = setup_distributed(None if cfg.device == "auto" else cfg.device)  # torchrun's environment, if any
        if cfg.baseline:
            backbone, dim = baseline_backbone(cfg)
            print(f"baseline: {cfg.baseline} ({dim}-d features)", flush=True)
        else:
            backbone, info = load_backbone(cfg.pretrained, cfg.arch)
            dim = info["feature_dim"]
            print(f"pretrained: {cfg.pretrained} ({info['source']} format, {info['arch']}, {dim}-d features)",
                  flush=True)
        run_lincls(cfg, backbone, dim, process.device, process.rank, process.world_size)
    except (ValueError, DataError, CheckpointError, FileNotFoundError, BackboneChanged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
