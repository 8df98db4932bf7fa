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


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype InfoNCE's loss and dL/dq come in: fp64 when an input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def infonce_fwd_ref(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, inv_temperature: float,
                    allow_tf32: bool = False):
    """What the fast kernels' one pass returns: (loss, dL/dq for an upstream gradient of 1, [acc1, acc5]).

    q: (N, C), k: (N, C), queue: (K, C). loss: 0-dim and dL/dq: (N, C), both in accum_dtype; stats: (2,) fp32.
    dL/dq is written out, (softmax - onehot) @ [k; queue] / (T N): the kernels run below autograd.
    allow_tf32 is the kernels' flag; here matmuls follow torch's own precision setting.
    """
    acc = accum_dtype(q, k, queue)
    loss, stats = infonce_ref(q, k, queue, 1.0 / inv_temperature, return_stats=True)
    dtype = _common_dtype(q, k, queue)
    q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) * inv_temperature  # Nx(1+K)
    p = torch.softmax(logits.to(acc), dim=1)
    grad_q = (p[:, :1] * k.to(acc) + p[:, 1:] @ queue.to(acc) - k.to(acc)) * (inv_temperature / q.shape[0])
    return loss.to(acc), grad_q, torch.stack([stats["acc1"], stats["acc5"]])


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
# augment: the per-pixel stages of the MoCo data augmentation (torchvision's math on float tensors).
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def crop_resize_ref(data: torch.Tensor, offsets: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                    boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear crop-and-resize of N packed uint8 images (torchvision's resized_crop, PIL-like).

    data: (total,) uint8, image i is CHW with C=3 at data[offsets[i]:]; offsets, heights, widths: (N,) int64;
    boxes: (N, 4) int64 (top, left, height, width) inside each image. Returns (N, 3, size, size) fp32 in [0, 1].
    """
    out = []
    for i in range(boxes.shape[0]):
        start, h, w = int(offsets[i]), int(heights[i]), int(widths[i])
        top, left, ch, cw = (int(v) for v in boxes[i])
        img = data[start:start + 3 * h * w].view(3, h, w)
        crop = img[None, :, top:top + ch, left:left + cw].float()           # 1x3xchxcw
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0] / 255)
    return torch.stack(out) if out else torch.empty(0, 3, size, size, device=data.device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale weights: (N, 3, H, W) -> (N, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb2hsv, h <- (h + shift) mod 1 (floor-mod), _hsv2rgb, for a per-sample shift (N, 1, 1, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift[:, 0], 1.0)
    i6 = torch.floor(h * 6.0)
    f = h * 6.0 - i6
    i = i6.to(torch.int32) % 6
    p = (maxc * (1.0 - s)).clamp(0, 1)
    q = (maxc * (1.0 - s * f)).clamp(0, 1)
    t = (maxc * (1.0 - s * (1.0 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(row, 1) for row in
                         [(maxc, q, p, p, t, maxc), (t, maxc, maxc, q, p, p), (p, p, t, maxc, maxc, q)]], 1)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1).long()).squeeze(2)  # N x 3 x H x W


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """ColorJitter's op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) with factors f (N, 1, 1, 1)."""
    if op == 0:
        return (f * x).clamp(0, 1)
    if op == 1:
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:
        return _blend(x, _gray(x), f)
    return _hue(x, f)


@torch.no_grad()
def color_augment_ref(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, jitter: torch.Tensor,
                      gray: torch.Tensor, flip: torch.Tensor, mean, std, gray_first: bool) -> torch.Tensor:
    """Per sample: (grayscale if gray_first), ColorJitter in `order`, (grayscale if not gray_first), hflip,
    normalise; the math of torchvision.transforms.functional on float tensors, in x's dtype.

    x: (N, 3, H, W) in [0, 1]; factors: (N, 4) (brightness, contrast, saturation, hue shift); order: (N, 4)
    int64, a permutation of 0..3 per sample (ColorJitter's fn_idx); jitter, gray, flip: (N,) bool;
    mean, std: 3 floats. gray_first is MoCo v1's order (RandomGrayscale before ColorJitter).
    """
    def bcast(mask):
        return mask.to(x.device).view(-1, 1, 1, 1)

    factors, order = factors.to(x), order.to(x.device)
    gray_m = bcast(gray)
    if gray_first:
        x = torch.where(gray_m, _gray(x).expand_as(x), x)
    for pos in range(4):
        for op in range(4):
            chosen = bcast(jitter) & bcast(order[:, pos] == op)
            if chosen.any():
                x = torch.where(chosen, _jitter_op(x, op, factors[:, op].view(-1, 1, 1, 1)), x)
    if not gray_first:
        x = torch.where(gray_m, _gray(x).expand_as(x), x)
    x = torch.where(bcast(flip), x.flip(3), x)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


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
