"""The public ops. The model calls only these.

    loss = ops.infonce(q, k, queue, temperature, backend="auto")
    loss, stats = ops.infonce(q, k, queue, temperature, return_stats=True)
    ops.momentum_update_(params_k, params_q, m, backend="auto")
    ops.enqueue_(queue, ptr, keys, backend="auto")
    images = ops.crop_resize(data, offsets, heights, widths, boxes, size, backend="auto")
    x = ops.color_augment(images, factors, order, jitter, gray, flip, mean, std, gray_first, backend="auto")
    ops.available_backends()

One file per op (infonce.py, momentum_update.py, enqueue.py, augment.py), each with the same layers: input
checks, the torch.library custom op moco_fast::<op> with its fake (and autograd), the backend table, the
public function. _backends.py resolves backends and imports the kernels; _self_check.py checks them.

Backends: "reference" (pure PyTorch), "cpu" (C++), "cuda" (C++/CUDA), "triton", and "auto", which takes
the best usable one for the tensors' device and logs its choice once. A backend that cannot run raises
a RuntimeError saying what is missing; nothing falls back silently.
"""
from __future__ import annotations

from moco_fast.ops._backends import BACKENDS, OPS, available_backends, resolve
# the import order is the order of OPS (and of available_backends())
from moco_fast.ops.infonce import infonce
from moco_fast.ops.momentum_update import momentum_update_
from moco_fast.ops.enqueue import enqueue_
from moco_fast.ops.augment import color_augment, crop_resize

__all__ = ["infonce", "momentum_update_", "enqueue_", "crop_resize", "color_augment", "available_backends",
           "BACKENDS", "OPS", "resolve"]
