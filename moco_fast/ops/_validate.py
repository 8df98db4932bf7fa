"""Input checks for the public ops: every message names the argument, what was expected and what came."""
from __future__ import annotations

import itertools
import math
import weakref
from collections import OrderedDict

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fail(op: str, message: str):
    raise ValueError(f"moco_fast.ops.{op}: {message}")


def check_tensor(op: str, name: str, t, *, dim: int | None = None, dtypes=FLOAT_DTYPES, device=None,
                 contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        _fail(op, f"{name} must have {dim} dimensions; got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, f"{name} must have dtype in {[str(d) for d in dtypes]}; got {t.dtype}")
    if device is not None and t.device != device:
        _fail(op, f"{name} must be on {device} like the other inputs; got {t.device}")
    if contiguous and not t.is_contiguous():
        _fail(op, f"{name} must be contiguous; got shape {tuple(t.shape)} with strides {t.stride()}")


def check_infonce(q, k, queue, temperature) -> None:
    check_tensor("infonce", "q", q, dim=2)
    check_tensor("infonce", "k", k, dim=2, device=q.device)
    check_tensor("infonce", "queue", queue, dim=2, device=q.device, contiguous=True)
    N, C = q.shape
    if N < 1 or C < 1:
        _fail("infonce", f"q must be (N, C) with N >= 1 and C >= 1; got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        _fail("infonce", f"k must have the shape of q, {tuple(q.shape)}; got {tuple(k.shape)}")
    if queue.shape[1] != C or queue.shape[0] < 1:
        _fail("infonce", f"queue must be (K, {C}) with K >= 1; got {tuple(queue.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        _fail("infonce", f"temperature must be a positive finite float; got {temperature!r}")


_CHECKED: "OrderedDict[tuple, tuple]" = OrderedDict()  # pairs of lists already checked, LRU
_CHECKED_SIZE = 8


def check_momentum_update(params_k, params_q, m) -> tuple:
    """Checks the pairs (once per list of tensors: the encoder's 161 pairs cost ~0.2-2 ms a call on a CPU
    core, more than the kernel on a GPU) and m (every call). Returns the dtypes of params_k, in order."""
    _check_momentum(m, params_k[0].device if len(params_k) else None)
    key = None if torch.compiler.is_compiling() else _pairs_key(params_k, params_q)
    if key is None:  # traced once per graph, or not plain tensors: check without the cache
        _check_pairs(params_k, params_q)
        return tuple(dict.fromkeys(p.dtype for p in params_k))
    hit = _CHECKED.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], itertools.chain(params_k, params_q))):
        _CHECKED.move_to_end(key)
        return hit[1]
    _check_pairs(params_k, params_q)
    dtypes = tuple(dict.fromkeys(p.dtype for p in params_k))
    _CHECKED[key] = ([weakref.ref(t) for t in itertools.chain(params_k, params_q)], dtypes)
    if len(_CHECKED) > _CHECKED_SIZE:
        _CHECKED.popitem(last=False)
    return dtypes


def _pairs_key(params_k, params_q) -> tuple | None:
    """The storage of every tensor (a parameter whose .data was replaced, e.g. by model.half(), misses); a
    hit is confirmed against weakrefs to the very tensor objects, so new tensors at old addresses miss.
    None for anything but plain tensors (fake tensors, wrong types): the full check explains those."""
    try:
        return len(params_k), tuple(map(torch.Tensor.data_ptr, itertools.chain(params_k, params_q)))
    except (TypeError, RuntimeError):
        return None


def _check_pairs(params_k, params_q) -> None:
    op = "momentum_update_"
    if len(params_k) != len(params_q):
        _fail(op, f"params_k and params_q must have the same length; got {len(params_k)} and {len(params_q)}")
    for i, (pk, pq) in enumerate(zip(params_k, params_q)):
        # the common case in a few C calls (this runs for every tensor of the encoder, every step)
        if (type(pk) is torch.Tensor and type(pq) is torch.Tensor and pk.dtype in FLOAT_DTYPES
                and pq.dtype == pk.dtype and pq.device == pk.device and pk.is_contiguous() and pq.is_contiguous()
                and pk.shape == pq.shape):
            continue
        check_tensor(op, f"params_k[{i}]", pk)
        check_tensor(op, f"params_q[{i}]", pq, dtypes=(pk.dtype,), device=pk.device)
        if pk.shape != pq.shape:
            _fail(op, f"params_k[{i}] has shape {tuple(pk.shape)} but params_q[{i}] has {tuple(pq.shape)}")
        if pk.stride() != pq.stride() or not _dense(pk):
            _fail(op, f"params_k[{i}] and params_q[{i}] must be dense with equal strides; "
                      f"got strides {pk.stride()} and {pq.stride()}")


def _check_momentum(m, device) -> None:
    op = "momentum_update_"
    if isinstance(m, torch.Tensor):
        device = device if device is not None else m.device
        if m.numel() != 1 or m.device != device or not m.is_floating_point():
            _fail(op, f"m as a tensor must be one floating-point element on {device}; "
                      f"got shape {tuple(m.shape)}, {m.dtype} on {m.device}")
    elif not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
        _fail(op, f"m must be a float in [0, 1] or a one-element tensor; got {m!r}")


def _dense(t: torch.Tensor) -> bool:
    return t.numel() == 0 or _non_overlapping_and_dense(t)


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    # dims sorted by stride must tile memory exactly, as torch's own is_non_overlapping_and_dense
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def check_enqueue(queue, ptr, keys) -> None:
    check_tensor("enqueue_", "queue", queue, dim=2, contiguous=True)
    check_tensor("enqueue_", "ptr", ptr, dtypes=(torch.int64,), device=queue.device)
    if tuple(ptr.shape) != (1,):
        _fail("enqueue_", f"ptr must have shape (1,); got {tuple(ptr.shape)}")
    check_tensor("enqueue_", "keys", keys, dim=2, device=queue.device)
    if keys.shape[1] != queue.shape[1]:
        _fail("enqueue_", f"keys must be (B, {queue.shape[1]}) like the queue's rows; got {tuple(keys.shape)}")
    if queue.shape[0] < 1:
        _fail("enqueue_", f"queue must have at least one row; got shape {tuple(queue.shape)}")


INDEX_DTYPES = (torch.int64,)


def _same_device_or_cpu(op: str, name: str, t, device) -> None:
    # index and parameter tensors may stay on the host: the op validates them there for free and copies them
    if t.device != device and t.device.type != "cpu":
        _fail(op, f"{name} must be on {device} or on the cpu; got {t.device}")


def check_crop_resize(data, offsets, heights, widths, boxes, size) -> None:
    op = "crop_resize"
    check_tensor(op, "data", data, dim=1, dtypes=(torch.uint8,), contiguous=True)
    check_tensor(op, "boxes", boxes, dim=2, dtypes=INDEX_DTYPES)
    N = boxes.shape[0]
    if boxes.shape[1] != 4:
        _fail(op, f"boxes must be (N, 4) rows of (top, left, height, width); got shape {tuple(boxes.shape)}")
    for name, t in (("offsets", offsets), ("heights", heights), ("widths", widths)):
        check_tensor(op, name, t, dim=1, dtypes=INDEX_DTYPES)
        if t.shape[0] != N:
            _fail(op, f"{name} must have shape ({N},), one entry per row of boxes; got {tuple(t.shape)}")
    for name, t in (("offsets", offsets), ("heights", heights), ("widths", widths), ("boxes", boxes)):
        _same_device_or_cpu(op, name, t, data.device)
    if not (isinstance(size, int) and size >= 1):
        _fail(op, f"size must be a positive int; got {size!r}")


def check_crop_resize_values(data, offsets, heights, widths, boxes) -> None:
    """Every image inside data and every box inside its image (one host sync for device tensors)."""
    top, left, h, w = boxes.unbind(1)
    offsets, heights, widths = offsets.to(boxes.device), heights.to(boxes.device), widths.to(boxes.device)
    bad_image = (offsets < 0) | (heights < 1) | (widths < 1) | (offsets + 3 * heights * widths > data.numel())
    bad_box = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > heights) | (left + w > widths)
    if not bool((bad_image | bad_box).any()):
        return
    i = int((bad_image | bad_box).nonzero()[0, 0])
    image = f"image {i} (offset {int(offsets[i])}, height {int(heights[i])}, width {int(widths[i])})"
    if bool(bad_image[i]):
        _fail("crop_resize", f"{image} must be a non-empty 3 x height x width image inside data of "
                             f"{data.numel()} elements")
    _fail("crop_resize", f"boxes[{i}] = {tuple(boxes[i].tolist())} (top, left, height, width) must be a non-empty "
                         f"crop inside {image}")


def check_color_augment(x, factors, order, jitter, gray, flip, mean, std, out_dtype) -> None:
    op = "color_augment"
    check_tensor(op, "x", x, dim=4)
    N = x.shape[0]
    if x.shape[1] != 3:
        _fail(op, f"x must be (N, 3, H, W); got shape {tuple(x.shape)}")
    check_tensor(op, "factors", factors)
    check_tensor(op, "order", order, dtypes=INDEX_DTYPES)
    for name, t in (("factors", factors), ("order", order)):
        if tuple(t.shape) != (N, 4):
            _fail(op, f"{name} must have shape ({N}, 4); got {tuple(t.shape)}")
    for name, t in (("jitter", jitter), ("gray", gray), ("flip", flip)):
        check_tensor(op, name, t, dtypes=(torch.bool,))
        if tuple(t.shape) != (N,):
            _fail(op, f"{name} must have shape ({N},); got {tuple(t.shape)}")
    for name, t in (("factors", factors), ("order", order), ("jitter", jitter), ("gray", gray), ("flip", flip)):
        _same_device_or_cpu(op, name, t, x.device)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3:
            _fail(op, f"{name} must hold 3 floats, one per channel; got {len(v)}")
    if any(float(s) == 0 for s in std):
        _fail(op, f"std must not contain 0; got {tuple(std)}")
    if out_dtype not in FLOAT_DTYPES:
        _fail(op, f"out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}; got {out_dtype}")


def check_color_augment_values(factors, order) -> None:
    """Each order row a permutation of 0..3, factors in ColorJitter's ranges (one host sync on the GPU)."""
    bad_order = (order.sort(dim=1).values != torch.arange(4, device=order.device)).any(1)
    bad_factor = (factors[:, :3] < 0).any(1) | (factors[:, 3].abs() > 0.5) | ~factors.isfinite().all(1)
    if not bool((bad_order | bad_factor).any()):
        return
    i = int((bad_order | bad_factor).nonzero()[0, 0])
    if bool(bad_order[i]):
        _fail("color_augment", f"order[{i}] must be a permutation of 0..3; got {order[i].tolist()}")
    _fail("color_augment", f"factors[{i}] must be (brightness >= 0, contrast >= 0, saturation >= 0, hue in "
                           f"[-0.5, 0.5]); got {factors[i].tolist()}")
