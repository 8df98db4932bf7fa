"""Pure-PyTorch specification of every op and a device-agnostic port of the official MoCo forward.

This file is the spec: the tests and the benchmarks both import it, so they never drift. Nothing
here is fast, and nothing here names a device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def infonce_ref(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                return_stats: bool = False):
    """Mean InfoNCE loss of q against its positive k and the negatives in the queue, as the official code.

    q: (N, C), k: (N, C), queue: (K, C). Logits row i = [q_i.k_i, q_i.queue_0, ...] / T, label 0.
    Returns the loss as an fp32 scalar (fp64 when the inputs are); gradient flows to q only.
    With return_stats, also {"acc1", "acc5"}: fractions of rows whose positive ranks first / in the top 5.
    """
    dtype = _common_dtype(q, k, queue)
    q, k, queue = q.to(dtype), k.detach().to(dtype), queue.detach().to(dtype)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)           # positive logits: Nx1
    l_neg = torch.einsum("nc,kc->nk", q, queue)                    # negative logits: NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature        # logits: Nx(1+K)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, labels)
    loss = loss.float() if loss.dtype != torch.float64 else loss
    if not return_stats:
        return loss
    with torch.no_grad():
        # rank of the positive = number of negatives scoring strictly above it
        above = (l_neg > l_pos).sum(dim=1)
        stats = {"acc1": (above == 0).float().mean(), "acc5": (above < 5).float().mean()}
    return loss, stats


@torch.no_grad()
def momentum_update_ref_(params_k, params_q, m) -> None:
    """p_k <- m * p_k + (1 - m) * p_q for every pair, in place, math in fp32 (fp64 for fp64 tensors)."""
    m = float(m)
    for p_k, p_q in zip(params_k, params_q, strict=True):
        math = torch.float64 if p_k.dtype == torch.float64 else torch.float32
        p_k.copy_(p_k.to(math) * m + p_q.to(math) * (1.0 - m))


@torch.no_grad()
def enqueue_ref_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """queue: (K, C), ptr: int64 (1,), keys: (B, C). The loop below, then ptr <- (ptr + B) % K."""
    K, B = queue.shape[0], keys.shape[0]
    start = int(ptr[0])
    for i in range(B):
        queue[(start + i) % K] = keys[i].to(queue.dtype)
    ptr[0] = (start + B) % K


# --------------------------------------------------------------------------------------------------
# The official MoCo (facebookresearch/moco, moco/builder.py), ported to run on any device and in one
# process. Same order of operations, queue layout [dim, K], host-side pointer, queue clone.
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def concat_all_gather_ref(tensor: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class MoCoRef(nn.Module):
    """The official MoCo module. Returns (logits, labels) like the original; the loss is the caller's."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather_ref(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity, as the official code
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x):
        """Shuffle BN across processes (identity order in one process, where it is a no-op)."""
        if not (dist.is_available() and dist.is_initialized()):
            return x, None
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather_ref(x)
        num_procs = x_gather.shape[0] // batch_size_this
        idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(num_procs, -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x, idx_unshuffle):
        if idx_unshuffle is None:
            return x
        x_gather = concat_all_gather_ref(x)
        num_procs = x_gather.shape[0] // x.shape[0]
        return x_gather[idx_unshuffle.view(num_procs, -1)[dist.get_rank()]]

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)               # queries: NxC
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)           # keys: NxC
            k = self._batch_unshuffle(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)     # positive logits: Nx1
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # negative logits: NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T         # logits: Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels
