"""Whole MoCo training steps on synthetic data: the official-style step and ours, side by side.

Official style: facebookresearch/moco's module (reference.MoCoRef), fp32 eager, cross-entropy over the
materialised logits, SGD. Ours: moco_fast.model.MoCo with the fused ops, bf16 autocast on the GPU,
channels_last, torch.compile, fused SGD. Figures: images per second (median step time) and peak memory.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from moco_fast.bench.timing import median_seconds, peak_extra_mib
from moco_fast.config import Config
from moco_fast.encoders import get_encoder
from moco_fast.reference import MoCoRef
from moco_fast.step import TrainStep
from moco_fast.train import build_model, make_optimizer

# (name, arch, batch size, image size, K, MoCo v2 head)
CASES = {
    "r50-bs256": ("resnet50", 256, 224, 65536, True),
    "r50-bs32": ("resnet50", 32, 224, 65536, True),
    "cifar-r18-bs512": ("cifar_resnet18", 512, 32, 4096, False),
    "quick": ("cifar_resnet18", 16, 32, 256, False),  # a smoke run on the CPU
}


def _official_step(arch, K, mlp, device):
    model = MoCoRef(get_encoder(arch), dim=128, K=K, m=0.999, T=0.2, mlp=mlp).to(device)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)

    def step(im_q, im_k):
        logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def _our_step(arch, K, mlp, device, compile_model: bool, bf16: bool, cuda_graph: bool = False):
    """The trainer's own model and optimizer (train.build_model, train.make_optimizer) for this case."""
    cfg = Config(arch=arch, moco_k=K, moco_t=0.2, mlp=mlp, lr=0.03, channels_last=True)
    model = build_model(cfg, device)
    forward = torch.compile(model) if compile_model else model
    return TrainStep(forward, make_optimizer(cfg, model, device), device, bf16, cuda_graph=cuda_graph, warmup=3)


def bench_case(name: str, device: torch.device, repeats: int = 20, compile_model: bool = True,
               cuda_graph: bool = False) -> list[dict]:
    """Rows for the official-style step, ours, and (cuda_graph) ours replayed as one CUDA graph."""
    arch, batch, size, K, mlp = CASES[name]
    im_q = torch.randn(batch, 3, size, size, device=device)
    im_k = torch.randn(batch, 3, size, size, device=device)
    last = im_q.contiguous(memory_format=torch.channels_last), im_k.contiguous(memory_format=torch.channels_last)
    bf16 = device.type == "cuda"
    providers = {"official-style fp32 eager": (_official_step(arch, K, mlp, device), (im_q, im_k))}
    ours = "moco_fast " + ("bf16 " if bf16 else "") + ("compiled" if compile_model else "eager")
    providers[ours] = (_our_step(arch, K, mlp, device, compile_model, bf16), last)
    if cuda_graph:  # its first 4 calls (warm-up 3, capture 1) fall in the first call and median_seconds' warm-up
        providers[ours + " + CUDA graph"] = (_our_step(arch, K, mlp, device, compile_model, bf16, True), last)
    rows, base = [], None
    for provider, (step, inputs) in providers.items():
        t0 = time.perf_counter()
        step(*inputs)  # first call: compilation, cuDNN autotuning
        first_s = time.perf_counter() - t0
        seconds = median_seconds(lambda: step(*inputs), device.type, repeats=repeats, warmup=3, budget_s=60)
        base = base or seconds
        rows.append({"case": f"{name} ({arch}, bs {batch}, {size}px, K {K})", "provider": provider,
                     "img_per_s": batch / seconds, "step_ms": seconds * 1e3, "speedup": base / seconds,
                     "peak_MiB": peak_extra_mib(lambda: step(*inputs), device.type), "first_step_s": first_s})
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
