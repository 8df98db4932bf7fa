"""MoCo (He et al. 2019; v2: Chen et al. 2020), following the official moco/builder.py.

Beyond the official: the queue is stored (K, C) with its pointer on the device, any K, an optional
bf16 queue, no host synchronisation in the step, shuffle BN in one process through split
BatchNorm (bn_splits, as in the official CIFAR demo), an optional symmetric loss, a momentum kept
as a device tensor (schedules need no recompilation), and it runs on the CPU too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco_fast import ops
from moco_fast.distributed import concat_all_gather, get_rank, is_distributed


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm over num_splits groups of the batch (sample n in group n % num_splits) while training.

    Simulates the per-GPU BatchNorm of multi-GPU training in one process, as the official CIFAR demo.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or not self.track_running_stats) or self.num_splits == 1:
            return super().forward(x)
        N, C, H, W = x.shape
        S = self.num_splits
        if N % S:
            raise ValueError(f"SplitBatchNorm: batch size {N} is not a multiple of bn_splits={S}")
        mean_split, var_split = self.running_mean.repeat(S), self.running_var.repeat(S)
        out = F.batch_norm(x.reshape(N // S, C * S, H, W), mean_split, var_split, self.weight.repeat(S),
                           self.bias.repeat(S), True, self.momentum, self.eps).reshape(N, C, H, W)
        self.running_mean.copy_(mean_split.view(S, C).mean(dim=0))
        self.running_var.copy_(var_split.view(S, C).mean(dim=0))
        return out


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` by a SplitBatchNorm holding the same parameters and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            convert_split_bn(child, num_splits)
    return module


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of K negative keys.

    base_encoder(num_classes=dim) builds each encoder (torchvision ResNets fit). mlp=True is MoCo v2's
    projection head. forward(im_q, im_k) returns (loss, {"acc1", "acc5"}) and updates the queue.
    bn_splits > 1: split BatchNorm plus a key shuffle in one process; under DDP the shuffle crosses processes.
    symmetric: the loss of (im_q, im_k) plus the loss of (im_k, im_q), both key batches enqueued.
    ema_buffers: also average floating-point buffers (BatchNorm statistics) into the key encoder.
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, *, bn_splits: int = 1,
                 symmetric: bool = False, queue_dtype: torch.dtype = torch.float32, ema_buffers: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if K < 1 or dim < 1 or not 0.0 <= m <= 1.0 or T <= 0:
            raise ValueError(f"MoCo: need K >= 1, dim >= 1, 0 <= m <= 1, T > 0; got K={K}, dim={dim}, m={m}, T={T}")
        self.K, self.m, self.T = K, m, T
        self.bn_splits, self.symmetric, self.ema_buffers, self.backend = bn_splits, symmetric, ema_buffers, backend
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:  # MoCo v2: a hidden fc layer with ReLU before the projection
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)
        if bn_splits > 1:
            convert_split_bn(self.encoder_q, bn_splits)
            convert_split_bn(self.encoder_k, bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # initialise
            param_k.requires_grad = False      # not updated by gradient
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1).to(queue_dtype))  # KxC
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # float64 so the kernels see exactly the Python float the official code uses
        self.register_buffer("momentum", torch.tensor([float(m)], dtype=torch.float64), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # .to(dtype)/.half() convert floating buffers; the momentum stays the exact float64 of self.m
        self.momentum = torch.tensor([self.m], dtype=torch.float64, device=self.momentum.device)
        return self

    def set_momentum(self, m: float) -> None:
        """Change the EMA momentum (a schedule): the device tensor is written, nothing recompiles."""
        self.m = float(m)
        self.momentum.fill_(self.m)

    def _ema_pairs(self):
        pairs = list(zip(self.encoder_k.parameters(), self.encoder_q.parameters()))
        if self.ema_buffers:
            pairs += [(b_k, b_q) for b_k, b_q in zip(self.encoder_k.buffers(), self.encoder_q.buffers())
                      if b_k.is_floating_point()]
        return [p for p, _ in pairs], [p for _, p in pairs]

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        params_k, params_q = self._ema_pairs()
        ops.momentum_update_(params_k, params_q, self.momentum, backend=self.backend)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        ops.enqueue_(self.queue, self.queue_ptr, concat_all_gather(keys), backend=self.backend)

    @torch.no_grad()
    def _shuffle(self, x: torch.Tensor):
        """Shuffle the batch for the key encoder's BatchNorm: across processes under DDP, else across splits."""
        if is_distributed():
            x_gather = concat_all_gather(x)
            idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
            dist.broadcast(idx_shuffle, src=0)
            idx_this = idx_shuffle.view(-1, x.shape[0])[get_rank()]
            return x_gather[idx_this], torch.argsort(idx_shuffle)
        if self.bn_splits > 1:
            idx_shuffle = torch.randperm(x.shape[0], device=x.device)
            return x[idx_shuffle], torch.argsort(idx_shuffle)
        return x, None

    @torch.no_grad()
    def _unshuffle(self, x: torch.Tensor, idx_unshuffle):
        if idx_unshuffle is None:
            return x
        if is_distributed():
            return concat_all_gather(x)[idx_unshuffle.view(-1, x.shape[0])[get_rank()]]
        return x[idx_unshuffle]

    @torch.no_grad()
    def _key_features(self, im_k: torch.Tensor) -> torch.Tensor:
        im_k, idx_unshuffle = self._shuffle(im_k)
        k = F.normalize(self.encoder_k(im_k), dim=1)               # keys: NxC
        return self._unshuffle(k, idx_unshuffle)

    def _contrastive(self, q: torch.Tensor, k: torch.Tensor):
        return ops.infonce(q, k, self.queue, self.T, backend=self.backend, return_stats=True)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor):
        q = F.normalize(self.encoder_q(im_q), dim=1)               # queries: NxC
        if self.symmetric:
            q2 = F.normalize(self.encoder_q(im_k), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._key_features(im_k)
            k2 = self._key_features(im_q) if self.symmetric else None
        loss, stats = self._contrastive(q, k)
        if self.symmetric:
            loss_21, stats_21 = self._contrastive(q2, k2)
            loss = loss + loss_21
            stats = {name: (value + stats_21[name]) / 2 for name, value in stats.items()}
            k = torch.cat([k2, k], dim=0)
        self._dequeue_and_enqueue(k)
        return loss, stats

    def load_official_state_dict(self, state_dict: dict) -> None:
        """Load a facebookresearch/moco checkpoint's state_dict (module.* keys, queue [dim, K])."""
        state = {key.removeprefix("module."): value for key, value in state_dict.items()}
        if "queue" in state and state["queue"].shape == self.queue.shape[::-1]:
            state["queue"] = state["queue"].T.contiguous()
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(f"MoCo.load_official_state_dict: missing keys {missing}, unexpected keys {unexpected}")
