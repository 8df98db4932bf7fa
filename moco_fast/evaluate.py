"""Weighted kNN classification of frozen features (the official CIFAR demo's monitor: k=200, t=0.1).

The same code serves the trainer's monitor, the demo's baselines and scripts/knn.py.
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
