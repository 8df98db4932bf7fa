"""MoCo pretraining.

    python scripts/pretrain.py                                   # the demo: Fashion-MNIST on the CPU
    torchrun --nproc_per_node=8 scripts/pretrain.py /data/imagenet --preset moco_v2 --output-dir runs/v2
    python scripts/pretrain.py /data/cifar --preset cifar        # the official CIFAR demo's recipe
    ... --resume auto                                            # continue from the latest checkpoint

The flags keep the official main_moco.py names; see --help.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast.config import ConfigError, parse_config  # noqa: E402
from moco_fast.data import DataError  # noqa: E402
from moco_fast.train import NonFiniteLoss, run  # noqa: E402


def main(argv=None) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # which op backends were picked
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, DataError, FileNotFoundError, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
