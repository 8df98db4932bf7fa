"""Evaluation of frozen features: weighted kNN classification (the official CIFAR demo's monitor: k=200,
t=0.1) and the linear head's accuracy and checks (the official main_lincls.py's).

The same kNN code serves the trainer's monitor, the demo's baselines and scripts/knn.py; the linear
head's serves moco_fast.lincls (scripts/lincls.py).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextlib.contextmanager
def backbone_only(encoder: nn.Module):
    """Features before the projection head: the encoder's fc (MoCo's head) becomes the identity."""
    fc = getattr(encoder, "fc", None)
    if fc is None:
        yield encoder
        return
    encoder.fc = nn.Identity()
    try:
        yield encoder
    finally:
        encoder.fc = fc


@torch.no_grad()
def extract_features(encoder, loader, device, pixels: bool = False, normalize: bool = True):
    """Features (L2-normalised unless normalize=False) and labels of a whole loader; pixels=True uses
    the raw pixels instead of the encoder."""
    was_training = encoder.training if encoder is not None else False
    if encoder is not None:
        encoder.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            images, targets = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            if pixels:
                out = images.flatten(1)
            else:
                with backbone_only(encoder):
                    out = encoder(images)
            feats.append(F.normalize(out.float(), dim=1) if normalize else out.float())
            labels.append(torch.as_tensor(targets).to(device))
    finally:
        if encoder is not None:
            encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(features, bank, bank_labels, num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024):
    """Class scores of each row of `features` (M, D) from its k most similar rows of `bank` (B, D),
    each neighbour voting exp(similarity / t) for its label. Returns (M, num_classes)."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, features.shape[0], chunk):
        sim = features[start:start + chunk] @ bank.T                       # chunk x B
        weight, index = sim.topk(k, dim=1)                                  # chunk x k
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weight.dtype)
        votes.scatter_add_(1, bank_labels[index], (weight / t).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 200,
                 t: float = 0.1) -> dict:
    """Top-1 and top-5 accuracy (in %) of the weighted kNN classifier."""
    scores = knn_predict(test_feats, train_feats, train_labels, num_classes, k, t)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels.unsqueeze(1)
    return {"knn_top1": 100.0 * hit[:, 0].float().mean().item(),
            "knn_top5": 100.0 * hit.any(dim=1).float().mean().item()}


def knn_eval(encoder, train_loader, test_loader, num_classes: int, device, k: int = 200, t: float = 0.1,
             pixels: bool = False) -> dict:
    train = extract_features(encoder, train_loader, device, pixels)
    test = extract_features(encoder, test_loader, device, pixels)
    return knn_accuracy(*train, *test, num_classes, k, t)


def knn_monitor(cfg, model, knn, device, log, step: int, baselines: bool) -> dict:
    """The trainer's kNN of the query encoder on knn = (bank loader, test loader, classes), logged."""
    bank, test, classes = knn
    result = knn_eval(model.encoder_q, bank, test, classes, device, cfg.knn_k, cfg.knn_t)
    if baselines:  # what the learned features must beat: raw pixels, and this encoder before training
        result["pixels_top1"] = knn_eval(None, bank, test, classes, device, cfg.knn_k, cfg.knn_t, pixels=True)["knn_top1"]
        result["untrained_top1"] = result["knn_top1"]
    log.record("knn", step, result)
    return result


# ---------------------------------------------------------------------------------- linear head
class BackboneChanged(RuntimeError):
    pass


def new_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """The official initialisation: N(0, 0.01) weights, zero bias."""
    fc = nn.Linear(feature_dim, num_classes)
    fc.weight.data.normal_(mean=0.0, std=0.01)
    fc.bias.data.zero_()
    return fc


@torch.no_grad()
def head_accuracy(backbone, fc, loader, device) -> dict:
    """Acc@1 and Acc@5 (in %) on a loader of images, or of cached features when backbone is None."""
    fc.eval()
    hits1 = hits5 = total = 0
    for batch in loader:
        x, y = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
        feats = x if backbone is None else backbone(x)
        top = fc(feats.float()).topk(min(5, fc.out_features), dim=1).indices
        hits1 += (top[:, 0] == y).sum().item()
        hits5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    fc.train()
    return {"acc1": 100.0 * hits1 / total, "acc5": 100.0 * hits5 / total}


def sanity_check(backbone: nn.Module, reference: dict) -> None:
    """The official check: training the linear head must not have touched any backbone tensor."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k].cpu())]
    if changed:
        raise BackboneChanged(f"the frozen backbone changed during linear training: {changed[:10]}")
