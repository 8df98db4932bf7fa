"""The per-pixel stages of the MoCo augmentation in Triton: crop-and-resize, then colour and normalise.

crop_resize: one program per (sample, block of output pixels) reads uint8 straight from the packed
buffer of decoded images and applies ATen's antialiased bilinear (PIL's) filter: per axis, taps
[xmin, xmin + xsize) with triangle weights normalised by their sum. Per-sample tap counts differ, so
the loops run to the batch's largest count (max_taps_*, from the host) with per-lane masks.

color_augment: two launches, no atomics, deterministic.
  1. `_contrast_sum_kernel` over (sample, tile): the grayscale sum of the image as it is just
     before contrast in that sample's jitter order (the ops before it are recomputed); tiles are
     summed on the host side of the launch with torch in a fixed order.
  2. `_color_augment_kernel` over (sample, tile): the whole chain with that mean, the flip done by
     reading the mirrored column (every other op is per pixel, and the mean ignores the flip),
     normalisation, and a store cast to out's dtype through out's strides (channels_last bf16 too).
Op codes follow torchvision's ColorJitter fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue.
"""
import torch
import triton
import triton.language as tl

_PIXELS = 256        # output pixels per crop_resize program
_TILE = 1024         # pixels per color_augment program


@triton.jit
def _axis(o, crop, size):
    """ATen's antialiased-bilinear index range of output index o along one axis: (center, xmin, xsize, invscale)."""
    scale = crop.to(tl.float32) / size
    support = tl.where(scale >= 1.0, scale, 1.0)
    invscale = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
    center = scale * (o.to(tl.float32) + 0.5)
    # max(trunc(v), 0) == max(floor(v), 0), and center + support + 0.5 > 0
    xmin = tl.maximum(tl.floor(center - support + 0.5), 0.0).to(tl.int32)
    xsize = tl.minimum(tl.floor(center + support + 0.5).to(tl.int32), crop) - xmin
    return center, xmin, xsize, invscale


@triton.jit
def _taps(crop, size):
    """An upper bound of the tap count of any output index along an axis: ceil(2 * support), within the crop."""
    support = tl.maximum(crop.to(tl.float32) / size, 1.0)
    return tl.minimum(tl.ceil(2.0 * support).to(tl.int32) + 1, crop)


@triton.jit
def _tap(j, xmin, xsize, center, invscale):
    w = tl.maximum(1.0 - tl.abs((j + xmin).to(tl.float32) - center + 0.5) * invscale, 0.0)
    return tl.where(j < xsize, w, 0.0)


@triton.jit
def _crop_resize_kernel(data_ptr, offsets_ptr, heights_ptr, widths_ptr, boxes_ptr, out_ptr, size,
                        max_taps_y, max_taps_x, PIXELS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * PIXELS + tl.arange(0, PIXELS)
    valid = p < size * size
    oy, ox = p // size, p % size
    base = tl.load(offsets_ptr + n)
    width = tl.load(widths_ptr + n)
    plane = tl.load(heights_ptr + n) * width                        # elements per channel, int64
    top = tl.load(boxes_ptr + 4 * n).to(tl.int32)
    left = tl.load(boxes_ptr + 4 * n + 1).to(tl.int32)
    crop_h = tl.load(boxes_ptr + 4 * n + 2).to(tl.int32)
    crop_w = tl.load(boxes_ptr + 4 * n + 3).to(tl.int32)
    cy, ymin, ysize, inv_y = _axis(oy, crop_h, size)
    cx, xmin, xsize, inv_x = _axis(ox, crop_w, size)
    # This sample's own tap bound (floor(a + 2s) - floor(a) <= ceil(2s)): one large image in the batch
    # must not make every program loop over its taps.
    max_taps_y = tl.minimum(_taps(crop_h, size), max_taps_y)
    max_taps_x = tl.minimum(_taps(crop_w, size), max_taps_x)
    sum_y = tl.zeros([PIXELS], tl.float32)
    for j in range(0, max_taps_y):
        sum_y += _tap(j, ymin, ysize, cy, inv_y)
    sum_x = tl.zeros([PIXELS], tl.float32)
    for j in range(0, max_taps_x):
        sum_x += _tap(j, xmin, xsize, cx, inv_x)
    # lanes past the last pixel may have no taps: keep them finite (they are not stored)
    sum_y = tl.where(valid, sum_y, 1.0)
    sum_x = tl.where(valid, sum_x, 1.0)
    acc_r = tl.zeros([PIXELS], tl.float32)
    acc_g = tl.zeros([PIXELS], tl.float32)
    acc_b = tl.zeros([PIXELS], tl.float32)
    for ty in range(0, max_taps_y):
        wy = _tap(ty, ymin, ysize, cy, inv_y) / sum_y               # weights normalised first, as ATen
        row = base + (top + ymin + ty).to(tl.int64) * width + left + xmin
        # a row of taps along x first, then weighted by wy: ATen's horizontal-then-vertical order
        row_r = tl.zeros([PIXELS], tl.float32)
        row_g = tl.zeros([PIXELS], tl.float32)
        row_b = tl.zeros([PIXELS], tl.float32)
        for tx in range(0, max_taps_x):
            wx = _tap(tx, xmin, xsize, cx, inv_x) / sum_x
            m = valid & (ty < ysize) & (tx < xsize)
            src = data_ptr + row + tx
            row_r += wx * tl.load(src, mask=m, other=0).to(tl.float32)
            row_g += wx * tl.load(src + plane, mask=m, other=0).to(tl.float32)
            row_b += wx * tl.load(src + 2 * plane, mask=m, other=0).to(tl.float32)
        acc_r += wy * row_r
        acc_g += wy * row_g
        acc_b += wy * row_b
    dst = out_ptr + n * 3 * size * size + p
    tl.store(dst, acc_r / 255.0, mask=valid)
    tl.store(dst + size * size, acc_g / 255.0, mask=valid)
    tl.store(dst + 2 * size * size, acc_b / 255.0, mask=valid)


def crop_resize(data, offsets, heights, widths, boxes, size: int, max_taps_y: int, max_taps_x: int):
    """data: (total,) uint8 of CHW images at offsets (N,) int64 with heights, widths (N,) int64; boxes (N, 4)
    int64 (top, left, height, width) inside each image, all on one device; max_taps_*: at least the largest
    tap count per axis in the batch (moco_fast.ops.augment.taps gives a bound).
    Returns (N, 3, size, size) fp32 in [0, 1]. moco_fast.ops.crop_resize checks all of it but the layout."""
    # the kernel indexes the per-sample tensors with unit strides (a view such as boxes[:, 2] has others)
    offsets, heights, widths, boxes = (t.contiguous() for t in (offsets, heights, widths, boxes))
    n = boxes.shape[0]
    out = torch.empty((n, 3, size, size), dtype=torch.float32, device=data.device)
    if n == 0:
        return out
    grid = (n, triton.cdiv(size * size, _PIXELS))
    with torch.cuda.device(data.device if data.is_cuda else -1):  # launch on the tensors' GPU
        _crop_resize_kernel[grid](data, offsets, heights, widths, boxes, out, size, max_taps_y, max_taps_x,
                                  PIXELS=_PIXELS, num_warps=4)
    return out


@triton.jit
def _gray(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _grayscale_if(r, g, b, on):
    """RandomGrayscale: 3 equal channels of the gray when `on` (uniform per program: a branch)."""
    if on:
        r = _gray(r, g, b)
        g = r
        b = r
    return r, g, b


@triton.jit
def _hue(r, g, b, shift):
    """torchvision's _rgb2hsv, h <- (h + shift) floor-mod 1, _hsv2rgb, lane by lane."""
    maxc = tl.maximum(r, tl.maximum(g, b))
    minc = tl.minimum(r, tl.minimum(g, b))
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    cr_div = tl.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    h = tl.where(maxc == r, bc - gc, 0.0)
    h += tl.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    h += tl.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = h / 6.0 + 1.0
    h = h - tl.floor(h)        # torch.fmod(h, 1) for h > 0 (h >= 5/6 here), exact
    h = h + shift
    h = h - tl.floor(h)        # torch's floor-mod by 1 (Triton's float % is C fmod)
    i6 = tl.floor(h * 6.0)
    f = h * 6.0 - i6
    i = i6.to(tl.int32) % 6
    v = maxc
    p = tl.minimum(tl.maximum(v * (1.0 - s), 0.0), 1.0)
    q = tl.minimum(tl.maximum(v * (1.0 - s * f), 0.0), 1.0)
    t = tl.minimum(tl.maximum(v * (1.0 - s * (1.0 - f)), 0.0), 1.0)
    r2 = tl.where((i == 0) | (i == 5), v, tl.where(i == 1, q, tl.where(i == 4, t, p)))
    g2 = tl.where((i == 1) | (i == 2), v, tl.where(i == 0, t, tl.where(i == 3, q, p)))
    b2 = tl.where((i == 3) | (i == 4), v, tl.where(i == 2, t, tl.where(i == 5, q, p)))
    return r2, g2, b2


@triton.jit
def _blend(x, other, f):
    return tl.minimum(tl.maximum(f * x + (1.0 - f) * other, 0.0), 1.0)


@triton.jit
def _chain(r, g, b, n, factors_ptr, order_ptr, jitter_ptr, gray_ptr, mean,
           GRAY_FIRST: tl.constexpr, STOP_AT_CONTRAST: tl.constexpr):
    """(gray if GRAY_FIRST), the jitter ops in the sample's order, (gray if not GRAY_FIRST); with
    STOP_AT_CONTRAST, only the jitter ops before contrast (the image whose mean contrast needs)."""
    to_gray = tl.load(gray_ptr + n) != 0
    if GRAY_FIRST:
        r, g, b = _grayscale_if(r, g, b, to_gray)
    active = tl.load(jitter_ptr + n) != 0
    for pos in tl.static_range(4):
        op = tl.load(order_ptr + 4 * n + pos)
        if STOP_AT_CONTRAST:
            active = active & (op != 1)
        if active:   # uniform per program: a branch, not a select
            f = tl.load(factors_ptr + 4 * n + op)
            if op == 0:
                r = tl.minimum(tl.maximum(f * r, 0.0), 1.0)
                g = tl.minimum(tl.maximum(f * g, 0.0), 1.0)
                b = tl.minimum(tl.maximum(f * b, 0.0), 1.0)
            elif op == 3:
                r, g, b = _hue(r, g, b, f)
            else:
                other = tl.where(op == 1, mean, _gray(r, g, b))     # contrast: the mean; saturation: gray
                r, g, b = _blend(r, other, f), _blend(g, other, f), _blend(b, other, f)
    if not GRAY_FIRST and not STOP_AT_CONTRAST:   # grayscale after jitter comes after contrast too
        r, g, b = _grayscale_if(r, g, b, to_gray)
    return r, g, b


@triton.jit
def _contrast_sum_kernel(x_ptr, factors_ptr, order_ptr, jitter_ptr, gray_ptr, partial_ptr, HW,
                         GRAY_FIRST: tl.constexpr, TILE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * TILE + tl.arange(0, TILE)
    valid = p < HW
    src = x_ptr + n * 3 * HW + p
    r = tl.load(src, mask=valid, other=0.0)
    g = tl.load(src + HW, mask=valid, other=0.0)
    b = tl.load(src + 2 * HW, mask=valid, other=0.0)
    r, g, b = _chain(r, g, b, n, factors_ptr, order_ptr, jitter_ptr, gray_ptr, 0.0,
                     GRAY_FIRST=GRAY_FIRST, STOP_AT_CONTRAST=True)
    total = tl.sum(tl.where(valid, _gray(r, g, b), 0.0), axis=0)
    tl.store(partial_ptr + n * tl.num_programs(1) + tl.program_id(1), total)


@triton.jit
def _color_augment_kernel(x_ptr, factors_ptr, order_ptr, jitter_ptr, gray_ptr, flip_ptr, mean_ptr, out_ptr,
                          H, W, s_n, s_c, s_h, s_w, m0, m1, m2, d0, d1, d2,
                          GRAY_FIRST: tl.constexpr, TILE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * TILE + tl.arange(0, TILE)
    HW = H * W
    valid = p < HW
    y, x = p // W, p % W
    flip = tl.load(flip_ptr + n) != 0
    col = tl.where(flip, W - 1 - x, x)
    src = x_ptr + n * 3 * HW + y * W + col
    r = tl.load(src, mask=valid, other=0.0)
    g = tl.load(src + HW, mask=valid, other=0.0)
    b = tl.load(src + 2 * HW, mask=valid, other=0.0)
    mean = tl.load(mean_ptr + n)
    r, g, b = _chain(r, g, b, n, factors_ptr, order_ptr, jitter_ptr, gray_ptr, mean,
                     GRAY_FIRST=GRAY_FIRST, STOP_AT_CONTRAST=False)
    dst = out_ptr + n * s_n + y.to(tl.int64) * s_h + x.to(tl.int64) * s_w
    ty = out_ptr.dtype.element_ty
    tl.store(dst, ((r - m0) / d0).to(ty), mask=valid)
    tl.store(dst + s_c, ((g - m1) / d1).to(ty), mask=valid)
    tl.store(dst + 2 * s_c, ((b - m2) / d2).to(ty), mask=valid)


def color_augment_(x, factors, order, jitter, gray, flip, mean, std, gray_first: bool, out) -> None:
    """Writes into out (N, 3, H, W), any float dtype and strides, the colour chain of contiguous fp32
    x (N, 3, H, W): factors (N, 4) fp32 contiguous, order (N, 4) int64 contiguous, jitter/gray/flip
    (N,) bool, mean/std 3 floats, all on one device. See moco_fast.reference.color_augment_ref;
    moco_fast.ops.color_augment checks the shapes, dtypes and values."""
    jitter, gray, flip = jitter.contiguous(), gray.contiguous(), flip.contiguous()  # indexed with unit strides
    if not (x.is_contiguous() and x.dtype == torch.float32 and factors.dtype == torch.float32
            and factors.is_contiguous() and order.dtype == torch.int64 and order.is_contiguous()):
        raise ValueError("color_augment: x and factors must be contiguous fp32, order contiguous int64; got "
                         f"{x.dtype} {x.stride()}, {factors.dtype} {factors.stride()}, {order.dtype} {order.stride()}")
    N, _, H, W = x.shape
    if N == 0 or H * W == 0:
        return
    tiles = triton.cdiv(H * W, _TILE)
    partial = torch.empty((N, tiles), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device if x.is_cuda else -1):  # launch on the tensors' GPU
        _contrast_sum_kernel[(N, tiles)](x, factors, order, jitter, gray, partial, H * W,
                                         GRAY_FIRST=gray_first, TILE=_TILE, num_warps=4)
        means = partial.sum(1) / (H * W)   # fixed reduction order: deterministic
        _color_augment_kernel[(N, tiles)](x, factors, order, jitter, gray, flip, means, out, H, W, *out.stride(),
                                          *(float(v) for v in mean), *(float(v) for v in std),
                                          GRAY_FIRST=gray_first, TILE=_TILE, num_warps=4)

