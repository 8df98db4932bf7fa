"""Linear classification of a pretrained MoCo encoder (the official main_lincls.py recipe).

    python scripts/lincls.py --pretrained runs/moco/checkpoint.pth            # the demo's checkpoint
    python scripts/lincls.py /data/imagenet --pretrained moco_v2_800ep_pretrain.pth.tar
    python scripts/lincls.py /data/cifar --pretrained runs/cifar/checkpoint.pth --cached-features
    torchrun --nproc_per_node=8 scripts/lincls.py /data/imagenet --pretrained runs/v2/checkpoint.pth
    python scripts/lincls.py --baseline pixels                                  # what features must beat
    python scripts/lincls.py --pretrained runs/moco/checkpoint.pth -e --resume auto  # evaluate the head only

Exit codes: 0 done, 2 a bad argument, data set or checkpoint (one message on stderr), 1 a failed
write, 143 / 130 stopped by SIGTERM / SIGINT after writing the checkpoint (--resume auto continues).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast.distributed import cleanup_distributed, setup_distributed  # noqa: E402
from moco_fast.data import DataError, locate  # noqa: E402
from moco_fast.config import parse_lincls_config  # noqa: E402
from moco_fast.evaluate import BackboneChanged  # noqa: E402
from moco_fast.lincls import baseline_backbone, run_lincls  # noqa: E402
from moco_fast.preemption import exit_code  # noqa: E402
from moco_fast.pretrained import CheckpointError, load_backbone  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_lincls_config(argv)  # a bad flag: argparse's usage and error, exit 2, before any work

    def body():
        try:
            process = setup_distributed(None if cfg.device == "auto" else cfg.device)  # torchrun's, if any
            source = locate(cfg.data, cfg.dataset)  # the one search of the disk for this run
            if cfg.baseline:
                backbone, dim = baseline_backbone(cfg, source)
                print(f"baseline: {cfg.baseline} ({dim}-d features)", flush=True)
            else:
                backbone, info = load_backbone(cfg.pretrained, cfg.arch)
                dim = info["feature_dim"]
                print(f"pretrained: {cfg.pretrained} ({info['source']} format, {info['arch']}, {dim}-d features)",
                      flush=True)
            run_lincls(cfg, backbone, dim, process.device, process.rank, process.world_size, source)
        finally:
            cleanup_distributed()
    return exit_code(body, bad_input=(ValueError, DataError, CheckpointError, FileNotFoundError, BackboneChanged))


if __name__ == "__main__":
    sys.exit(main())
