"""MoCo pretraining.

    python scripts/pretrain.py                                   # the demo: Fashion-MNIST on the CPU
    torchrun --nproc_per_node=8 scripts/pretrain.py /data/imagenet --preset moco_v2 --output-dir runs/v2
    python scripts/pretrain.py /data/cifar --preset cifar        # the official CIFAR demo's recipe
    ... --resume auto                                            # continue from the latest checkpoint

The flags keep the official main_moco.py names; see --help. Exit codes: 0 done, 2 a bad argument,
data set or checkpoint (one message on stderr), 1 a failed write or a lost peer process, 143 / 130
stopped by SIGTERM / SIGINT after writing the checkpoint.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast.checkpoint import CheckpointError  # noqa: E402
from moco_fast.config import ConfigError, build_parser, parse_config  # noqa: E402
from moco_fast.data import DataError  # noqa: E402
from moco_fast.preemption import exit_code  # noqa: E402
from moco_fast.monitor import NonFiniteLoss  # noqa: E402
from moco_fast.train import run  # noqa: E402


def main(argv=None) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # which op backends were picked
    cfg = parse_config(argv)  # a bad flag: argparse's usage and error, exit 2, before any work

    def body():
        try:
            run(cfg)
        except ConfigError as err:  # found once the data set is known (it does not fit the config)
            build_parser().error(str(err))
    return exit_code(body, bad_input=(DataError, CheckpointError, FileNotFoundError, NonFiniteLoss))


if __name__ == "__main__":
    sys.exit(main())
