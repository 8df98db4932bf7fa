"""Export the query encoder's backbone from a MoCo checkpoint (moco_fast's or the official release's).

    python scripts/export.py runs/v2/checkpoint.pth --out r50.pth                      # torchvision
    python scripts/export.py moco_v2_800ep_pretrain.pth.tar --out r50.pkl --format detectron2

torchvision: a plain state_dict (torch.save) with torchvision's key names and no fc.* keys:
    model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load("r50.pth", weights_only=True), strict=True)
(for small_resnet and cifar_* archs, moco_fast.encoders.get_encoder(arch)() in place of torchvision's).
detectron2: a pickle of {"model": numpy arrays under detectron2's names, "__author__": "MOCO",
"matching_heuristics": True}, as the official detection/convert-pretrain-to-detectron2.py writes.
The file is written atomically (temp file, then rename). Errors: a message on stderr, exit code 2.
"""
import argparse
import os
import pickle
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco_fast.checkpoint import atomic_file  # noqa: E402
from moco_fast.encoders import ARCHS  # noqa: E402
from moco_fast.pretrained import CheckpointError, load_backbone, to_detectron2  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export a MoCo checkpoint's backbone (torchvision or detectron2)")
    p.add_argument("checkpoint", help="a scripts/pretrain.py checkpoint or an official MoCo one")
    p.add_argument("--out", required=True, help="the file to write (.pth for torchvision, .pkl for detectron2)")
    p.add_argument("-a", "--arch", choices=sorted(ARCHS), metavar="ARCH",
                   help=f"the architecture, when the checkpoint names none (or to override it): one of {', '.join(sorted(ARCHS))}")
    p.add_argument("--format", choices=["torchvision", "detectron2"], default="torchvision")
    args = p.parse_args(argv)
    try:
        model, info = load_backbone(args.checkpoint, args.arch)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if args.format == "detectron2":
            obj = to_detectron2(state)
            with atomic_file(args.out, shared=True) as f:
                pickle.dump(obj, f)
            what = f"{len(obj['model'])} numpy arrays under detectron2's names"
        else:
            with atomic_file(args.out, shared=True) as f:
                torch.save(state, f)
            what = f"{len(state)} tensors under torchvision's names, no fc"
    except (CheckpointError, ValueError, OSError) as err:  # FileNotFoundError is an OSError
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var",
                                                                         "num_batches_tracked")))
    print(f"wrote {args.out}: the {info['arch']} backbone ({params / 1e6:.2f}M parameters, {info['feature_dim']}-d "
          f"features) of {args.checkpoint} ({info['source']} checkpoint, mlp={info['mlp']}) as {args.format}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
