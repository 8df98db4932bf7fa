"""Run-time self-check of the fast kernels on the user's own device.

Nobody can test this project on every GPU its users have. So before a fast backend first serves a key
(op, backend, device, dtypes), it runs once on a small random problem (a few milliseconds) and is compared
with the float64 reference at the tests' tolerances. A backend that fails is never picked by `auto` (the
log names op, backend, device, dtypes and the error; the next backend serves) and raises when asked for
by name. MOCO_FAST_SELF_CHECK=0 turns the check off. It runs outside torch.compile's fake tensors and
refuses to run inside a CUDA-graph capture (one eager call before capturing runs it).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os

import torch
import torch.nn.functional as F

from moco_fast import reference
from moco_fast.ops import variants

ENV = "MOCO_FAST_SELF_CHECK"
F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Result:
    ok: bool
    max_error: float  # the largest absolute error seen (0.0 when bitwise exact)
    detail: str       # what failed, or what was compared


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def error_bound(exact: torch.Tensor, native: torch.Tensor, floor: float) -> float:
    """The tests' tolerance: twice PyTorch's own error in the same dtypes, plus floor * max |exact|."""
    torch_err = (native.double().cpu() - exact).abs().max().item()
    return 2 * torch_err + floor * exact.abs().max().item()


def max_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    err = (ours.double().cpu() - exact).abs().max().item()
    return err if math.isfinite(err) else math.inf  # NaN compares false: make it fail loudly


_RESULTS: dict[tuple, Result] = {}


def run(op: str, backend: str, device: str, variant: tuple[str, ...]) -> Result:
    """The (cached) self-check of one key; variant names the dtypes (and TF32) the call will use."""
    key = (op, backend, device, variant, variants.key())
    if key not in _RESULTS:
        _RESULTS[key] = _run(op, backend, device, variant)
    return _RESULTS[key]


def _run(op: str, backend: str, device: str, variant: tuple[str, ...]) -> Result:
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"moco_fast: the self-check of {op} backend '{backend}' on {device} {variant} would run "
                           "inside a CUDA-graph capture; call the op once eagerly before capturing "
                           f"(or set {ENV}=0)")
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    try:
        with unset_fake_temporarily(), torch.no_grad():  # real tensors, also while torch.compile traces
            return CHECKS[op](backend, torch.device(device), variant)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot even run fails its check
        return Result(False, math.inf, f"{type(err).__name__}: {err}")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _kernel(op: str, backend: str):
    """The kernel the op's custom op calls, looked up at call time (tests swap in wrong ones)."""
    return importlib.import_module(f"moco_fast.ops.{op}").kernel(backend)  # ops.infonce is the function


def _compare(pairs) -> Result:
    """pairs: (what, ours, exact, bound); bound None means bitwise."""
    worst = 0.0
    for what, ours, exact, bound in pairs:
        err = max_error(ours, exact)
        worst = max(worst, err)
        if (bound is None and not torch.equal(ours.cpu().to(exact.dtype), exact)) or (
                bound is not None and not err <= bound):
            limit = "bitwise" if bound is None else f"{bound:.3g}"
            return Result(False, worst, f"{what}: max error {err:.3g} > {limit}")
    return Result(True, worst, "matches the float64 reference")


def check_infonce(backend: str, device: torch.device, variant: tuple[str, ...]) -> Result:
    """N=8, C=64, K=300 (a tail after every block size); variant = (q, k, queue dtypes, 'tf32'|'ieee')."""
    q_dt, k_dt, queue_dt, precision = variant
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(8, 64, generator=g, dtype=F64), dim=1)
    k = F.normalize(q + torch.randn(8, 64, generator=g, dtype=F64), dim=1)
    queue = F.normalize(torch.randn(300, 64, generator=g, dtype=F64), dim=1)
    inv_t, tf32 = 1 / 0.07, precision == "tf32"
    exact = reference.infonce_fwd_ref(q, k, queue, inv_t, False)
    args = q.to(device, _dtype(q_dt)), k.to(device, _dtype(k_dt)), queue.to(device, _dtype(queue_dt))
    native = reference.infonce_fwd_ref(*args, inv_t, tf32)
    ours = _kernel("infonce", backend)(*args, inv_t, tf32, variants.variant("infonce", backend))
    floor = 1e-6 if F64 not in (args[0].dtype, args[2].dtype) else 1e-12
    return _compare([(name, ours[i], exact[i], error_bound(exact[i], native[i], floor))
                     for i, name in ((0, "loss"), (1, "dL/dq"))])


def check_momentum_update(backend: str, device: torch.device, variant: tuple[str, ...]) -> Result:
    """Three tensors per dtype (below one block, just over one, 2-D), m as a float and as a tensor: bitwise."""
    g = torch.Generator().manual_seed(0)
    pk, pq = [], []
    for name in variant:
        for shape in [(5,), (4099,), (3, 7)]:
            pk.append(torch.randn(shape, generator=g).to(device, _dtype(name)))
            pq.append(torch.randn(shape, generator=g).to(device, _dtype(name)))
    expected = [p.clone() for p in pk]
    reference.momentum_update_ref_(expected, pq, 0.99)
    kernel, name = _kernel("momentum_update", backend), variants.variant("momentum_update", backend)
    kernel(pk, pq, None, 0.99, name)
    reference.momentum_update_ref_(expected, pq, 0.5)
    kernel(pk, pq, torch.tensor([0.5], dtype=F64, device=device), 0.0, name)
    return _compare([(f"params_k[{i}]", a, b.cpu(), None) for i, (a, b) in enumerate(zip(pk, expected))])


def check_enqueue(backend: str, device: torch.device, variant: tuple[str, ...]) -> Result:
    """K=10, pointer 7, 5 keys (wraps around), then 13 keys (more than K): bitwise, pointer included."""
    queue_dt, keys_dt = (_dtype(n) for n in variant)
    g = torch.Generator().manual_seed(0)
    queue = torch.randn(10, 4, generator=g).to(device, queue_dt)
    ptr = torch.tensor([7], dtype=torch.int64, device=device)
    expected_queue, expected_ptr = queue.cpu().clone(), ptr.cpu().clone()
    for b in (5, 13):
        keys = torch.randn(b, 4, generator=g).to(device, keys_dt)
        reference.enqueue_ref_(expected_queue, expected_ptr, keys.cpu())
        _kernel("enqueue", backend)(queue, ptr, keys)
    return _compare([("queue", queue, expected_queue, None), ("ptr", ptr, expected_ptr, None)])


def _augment_kernel(op: str, backend: str):
    from moco_fast.ops import augment  # the two augmentation ops share ops/augment.py
    return getattr(augment, f"{op}_kernel")(backend)


def check_crop_resize(backend: str, device: torch.device, variant: tuple[str, ...]) -> Result:
    """Three images (one a single column), crops that shrink, keep and enlarge, 7-pixel outputs: within 1e-5
    of the float64 math (the tests' tolerance for the fp32 kernels)."""
    from moco_fast.ops.augment import taps
    g = torch.Generator().manual_seed(0)
    shapes, size = [(17, 23), (9, 1), (30, 12)], 7
    boxes = torch.tensor([[2, 3, 15, 20], [0, 0, 9, 1], [5, 2, 4, 3]])
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    heights, widths = torch.tensor([h for h, _ in shapes]), torch.tensor([w for _, w in shapes])
    offsets = torch.cumsum(3 * heights * widths, 0) - 3 * heights * widths
    exact = torch.stack([F.interpolate(img[None, :, t:t + h, l:l + w].double(), size=(size, size), mode="bilinear",
                                       align_corners=False, antialias=True)[0] / 255
                         for img, (t, l, h, w) in zip(images, boxes.tolist())])
    args = [t.to(device) for t in (torch.cat([i.flatten() for i in images]), offsets, heights, widths, boxes)]
    ours = _augment_kernel("crop_resize", backend)(*args, size, taps(30, size), taps(23, size))
    return _compare([("crops", ours, exact, 1e-5)])


def check_color_augment(backend: str, device: torch.device, variant: tuple[str, ...]) -> Result:
    """12 samples of 5 x 7 pixels, random orders and factors, every flag on and off, grayscale before and after
    the jitter; variant = (x dtype, out dtype). Within twice PyTorch's own error in x's dtype (at least 1e-5),
    plus one unit in the last place of a 16-bit out dtype."""
    x_dt, out_dt = (_dtype(n) for n in variant)
    g = torch.Generator().manual_seed(0)
    n = 12
    x = torch.rand(n, 3, 5, 7, generator=g, dtype=F64)
    factors = torch.cat([0.6 + 0.8 * torch.rand(n, 3, generator=g, dtype=F64),
                         0.2 * torch.rand(n, 1, generator=g, dtype=F64) - 0.1], 1)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    jitter, gray, flip = (torch.rand(3, n, generator=g) < 0.5).unbind(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    pairs = []
    for gray_first in (True, False):
        params = (order, jitter, gray, flip, mean, std, gray_first)
        exact = reference.color_augment_ref(x, factors, *params)
        native = reference.color_augment_ref(x.to(x_dt), factors.to(x_dt), *params)
        bound = max(1e-5, 2 * (native.double() - exact).abs().max().item())
        if out_dt != torch.float32:  # one unit in the last place of the largest output: rounding to nearest
            # costs half, and the conversion may truncate (the Triton interpreter's does)
            bound += torch.finfo(out_dt).eps * 2.0 ** math.floor(math.log2(exact.abs().max().item()))
        xk = x.to(device, x_dt)
        if backend != "reference":  # what the op hands its fast kernels: fp32, contiguous
            xk = xk.float().contiguous()
        out = torch.empty(x.shape, dtype=out_dt, device=device)
        tensors = [t.to(device) for t in (factors.to(xk.dtype), order, jitter, gray, flip)]
        _augment_kernel("color_augment", backend)(xk, *tensors, mean, std, gray_first, out)
        pairs.append((f"gray_first={gray_first}", out, exact, bound))
    return _compare(pairs)


CHECKS = {"infonce": check_infonce, "momentum_update": check_momentum_update, "enqueue": check_enqueue,
          "crop_resize": check_crop_resize, "color_augment": check_color_augment}
