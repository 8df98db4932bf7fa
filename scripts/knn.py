"""Weighted kNN accuracy of a pretrained backbone's features (the official CIFAR demo's monitor).

    python scripts/knn.py --pretrained runs/demo/checkpoint.pth             # the demo data (Fashion-MNIST)
    python scripts/knn.py /data/imagenet --pretrained moco_v2_800ep_pretrain.pth.tar
    python scripts/knn.py /data/cifar --pixels                              # raw pixels, no checkpoint

The held-out split (val / test) is classified against the train split as the bank, each test image
by its k most similar bank images voting exp(similarity / t). Features are the query encoder's
backbone (before the projection head), L2-normalised. The images go through the data set's
evaluation transform (data.eval_transform) at its own size unless --image-size is given.
Errors: a message on stderr, exit code 2.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast import data  # noqa: E402
from moco_fast.checkpoint import write_text_atomic  # noqa: E402
from moco_fast.config import PRESETS  # noqa: E402
from moco_fast.evaluate import knn_eval  # noqa: E402
from moco_fast.encoders import ARCHS  # noqa: E402
from moco_fast.pretrained import CheckpointError, load_backbone  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Weighted kNN evaluation of a MoCo checkpoint's backbone features")
    p.add_argument("data", nargs="?", default=None, help="data path; omitted: the Fashion-MNIST demo")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pretrained", metavar="CKPT", help="a scripts/pretrain.py checkpoint or an official one")
    what.add_argument("--pixels", action="store_true", help="evaluate the raw pixels instead (the baseline)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="its arch is used when the checkpoint names none")
    p.add_argument("-a", "--arch", choices=sorted(ARCHS), metavar="ARCH",
                   help=f"the architecture (overrides the checkpoint's): one of {', '.join(sorted(ARCHS))}")
    p.add_argument("--dataset", default="auto", choices=["auto", *data.DATASETS])
    p.add_argument("--image-size", type=int, help="evaluation size (default: the data set's own, 224 for folders)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("-b", "--batch-size", type=int, default=512)
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--max-bad-images", type=int, default=100)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    return p


def evaluate(args) -> dict:
    source = data.locate(args.data, args.dataset)
    bank_loader, test_loader, classes = data.eval_loaders(source, args.batch_size, args.workers, args.max_bad_images,
                                                          image_size=args.image_size)
    spec = source.spec(args.image_size)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    encoder, info = None, {"arch": None, "feature_dim": None, "source": None}
    if not args.pixels:
        default_arch = PRESETS[args.preset].get("arch") if args.preset else None
        encoder, info = load_backbone(args.pretrained, args.arch, default_arch=default_arch)
        encoder = encoder.to(device)
    result = knn_eval(encoder, bank_loader, test_loader, classes, device, args.knn_k, args.knn_t, pixels=args.pixels)
    return {**result, "features": "pixels" if args.pixels else "backbone", "checkpoint": args.pretrained,
            "arch": info["arch"], "feature_dim": info["feature_dim"], "source": info["source"],
            "data": args.data, "dataset": source.kind, "image_size": spec["image_size"], "small": spec["small"],
            "bank_size": len(bank_loader.dataset), "test_size": len(test_loader.dataset), "classes": classes,
            "knn_k": args.knn_k, "knn_t": args.knn_t}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        r = evaluate(args)
        if args.json:
            write_text_atomic(args.json, json.dumps(r, indent=1))
    except (CheckpointError, data.DataError, OSError) as err:  # FileNotFoundError is an OSError
        print(f"error: {err}", file=sys.stderr)
        return 2
    features = "raw pixels" if args.pixels else f"{r['arch']} backbone ({r['feature_dim']}-d) of {r['checkpoint']}"
    size = "whole images" if r["small"] else f"{r['image_size']}px center crops"
    print(f"kNN (k={r['knn_k']}, t={r['knn_t']}) on {r['dataset']} ({size}), {r['test_size']} held-out images "
          f"against {r['bank_size']} train images, {r['classes']} classes, features: {features}")
    print(f"top-1 {r['knn_top1']:.2f}%  top-5 {r['knn_top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
