"""ops.crop_resize and ops.color_augment: the reference against torchvision, the kernels against the reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from conftest import fast_backends, poison_allocator
from moco_fast import ops
from moco_fast.ops.augment import taps
from moco_fast.reference import color_augment_ref, crop_resize_ref

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ORDERS = torch.tensor(list(itertools.permutations(range(4))))        # all 24 ColorJitter orders: 24x4
# the C++ CPU kernels, and Triton (interpreted on CPU tensors, compiled on CUDA); no CUDA C++ augment kernel
KERNELS = [p for p in fast_backends("crop_resize") if p.id != "cuda-cuda"]


def packed_images(shapes, device="cpu"):
    """N uint8 CHW images of the given (height, width) packed in one buffer: (data, offsets, heights, widths)."""
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in shapes]
    numel = torch.tensor([im.numel() for im in images])
    data = torch.cat([im.flatten() for im in images]).to(device)
    offsets = torch.cumsum(numel, 0) - numel
    heights, widths = (torch.tensor([s[i] for s in shapes]) for i in (0, 1))
    return images, data, offsets, heights, widths


# images of different sizes; crops that shrink, enlarge, keep one pixel, keep the whole image
SHAPES = [(20, 30), (17, 9), (40, 33), (5, 7), (1, 1), (31, 40)]
BOXES = torch.tensor([[2, 3, 15, 20], [0, 0, 17, 9], [10, 5, 1, 1], [1, 2, 3, 4], [0, 0, 1, 1], [3, 0, 28, 40]])


def color_params(n, device="cpu", dtype=torch.float32):
    """Random ColorJitter draws as MoCo's (0.4, 0.4, 0.4, 0.1) and wider, every order, random flags."""
    factors = torch.stack([torch.empty(n).uniform_(0, 2) for _ in range(3)] + [torch.empty(n).uniform_(-0.5, 0.5)], 1)
    order = ORDERS[torch.randint(0, 24, (n,))]
    flags = [torch.rand(n) < p for p in (0.8, 0.4, 0.5)]
    return [t.to(device) for t in (factors.to(dtype), order, *flags)]


def torchvision_chain(img, f, order, jitter, gray, flip, gray_first):
    """One sample through torchvision's functional transforms: the behaviour the reference specifies."""
    ops_tv = [lambda y: TF.adjust_brightness(y, float(f[0])), lambda y: TF.adjust_contrast(y, float(f[1])),
              lambda y: TF.adjust_saturation(y, float(f[2])), lambda y: TF.adjust_hue(y, float(f[3]))]
    if gray and gray_first:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    for op in (order.tolist() if jitter else []):
        img = ops_tv[op](img)
    if gray and not gray_first:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return TF.normalize(TF.hflip(img) if flip else img, MEAN, STD)


@pytest.mark.parametrize("dtype, atol", [pytest.param(torch.float64, 2e-5, id="f64"),
                                         pytest.param(torch.float32, 2e-5, id="f32")])
@pytest.mark.parametrize("gray_first", [True, False], ids=["gray_first", "gray_last"])
@pytest.mark.parametrize("flags", ["random", "all_on", "jitter_off"])
def test_color_augment_ref_matches_torchvision(dtype, atol, gray_first, flags):
    # torchvision's hue works in fp32 whatever the input dtype, hence the fp32-sized tolerance in fp64
    n = 24
    x = torch.rand(n, 3, 7, 9, dtype=dtype)
    x[0] = 0.5  # a gray image: hue's maxc == minc path
    factors, _, jitter, gray, flip = color_params(n, dtype=torch.float64)
    order = ORDERS  # every order once
    if flags == "all_on":
        jitter, gray, flip = (torch.ones(n, dtype=torch.bool),) * 3
    elif flags == "jitter_off":
        jitter = torch.zeros(n, dtype=torch.bool)
    got = color_augment_ref(x, factors, order, jitter, gray, flip, MEAN, STD, gray_first)
    assert got.dtype == dtype
    for i in range(n):
        want = torchvision_chain(x[i], factors[i], order[i], jitter[i], gray[i], flip[i], gray_first)
        torch.testing.assert_close(got[i], want, atol=atol, rtol=0, msg=lambda m: f"sample {i}: {m}")


def test_crop_resize_ref_matches_torchvision():
    images, data, offsets, heights, widths = packed_images(SHAPES)
    for size in (1, 8, 13):
        got = crop_resize_ref(data, offsets, heights, widths, BOXES, size)
        assert got.shape == (len(SHAPES), 3, size, size) and got.dtype == torch.float32
        for i, img in enumerate(images):
            want = TF.resized_crop(img.float() / 255, *BOXES[i].tolist(), [size, size], antialias=True)
            torch.testing.assert_close(got[i], want, atol=1e-6, rtol=0)


def crop_resize_f64(images, boxes, size):
    """The reference's math in fp64: the yardstick for the fp32 kernels."""
    return torch.stack([F.interpolate(img[None, :, t:t + h, l:l + w].double(), size=(size, size), mode="bilinear",
                                      align_corners=False, antialias=True)[0] / 255
                        for img, (t, l, h, w) in zip(images, boxes.tolist())])


@pytest.mark.parametrize("size, samples", [
    pytest.param(1, [1, 3, 4], id="size1-small"),  # a 1-pixel output filters the whole crop: slow interpreted
    pytest.param(7, range(6), id="size7"), pytest.param(24, range(6), id="size24")])
@pytest.mark.parametrize("device, backend", KERNELS)
def test_crop_resize_kernel_matches_reference(device, backend, size, samples):
    shapes, boxes = [SHAPES[i] for i in samples], BOXES[list(samples)]
    images, data, offsets, heights, widths = packed_images(shapes, device)
    want = crop_resize_f64(images, boxes, size)
    poison_allocator(device)
    got = ops.crop_resize(data, offsets, heights, widths, boxes, size, backend=backend)
    assert got.shape == (len(shapes), 3, size, size) and got.dtype == torch.float32 and got.device == data.device
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=0)
    # the same result from device-side index tensors and a loose tap bound from max_crop
    index = [t.to(device) for t in (offsets, heights, widths, boxes)]
    again = ops.crop_resize(data, *index, size, backend=backend, max_crop=int(max(heights.max(), widths.max())))
    torch.testing.assert_close(again, got, atol=1e-6, rtol=0)


def bf16_rounding_error(want: torch.Tensor) -> float:
    return (want.to(torch.bfloat16).double() - want).abs().max().item()


OUTPUTS = [pytest.param(torch.float32, False, id="f32-contiguous"),
           pytest.param(torch.bfloat16, True, id="bf16-channels_last"),
           pytest.param(torch.float32, True, id="f32-channels_last")]


@pytest.mark.parametrize("out_dtype, channels_last", OUTPUTS)
@pytest.mark.parametrize("gray_first", [True, False], ids=["gray_first", "gray_last"])
@pytest.mark.parametrize("device, backend", KERNELS)
def test_color_augment_kernel_matches_reference(device, backend, gray_first, out_dtype, channels_last):
    n, H, W = 24, 5, 7  # every order once; an odd width so the flip's mirror is not trivial
    x = torch.rand(n, 3, H, W, device=device)
    x[0] = 0.3  # a gray image
    factors, _, jitter, gray, flip = color_params(n, device)
    order = ORDERS.to(device)
    for mask in (jitter, gray, flip):
        mask[:4] = True   # every flag on for a few samples whatever the draw
    want = color_augment_ref(x.double(), factors.double(), order, jitter, gray, flip, MEAN, STD, gray_first)
    own_error = (color_augment_ref(x, factors, order, jitter, gray, flip, MEAN, STD, gray_first) - want).abs().max()
    poison_allocator(device)
    got = ops.color_augment(x, factors, order, jitter, gray, flip, MEAN, STD, gray_first, out_dtype=out_dtype,
                            channels_last=channels_last, backend=backend)
    assert got.shape == x.shape and got.dtype == out_dtype
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # fp32: within 1e-5 or twice PyTorch's own fp32 error (hue amplifies rounding near gray pixels)
    atol = max(1e-5, 2 * float(own_error))
    if out_dtype == torch.bfloat16:
        atol = 2 * bf16_rounding_error(want)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("device, backend", KERNELS + [pytest.param("cpu", "reference", id="reference")])
def test_augment_opcheck_and_compile(device, backend):
    images, data, offsets, heights, widths = packed_images(SHAPES[:3], device)
    index = [t.to(device) for t in (offsets, heights, widths, BOXES[:3])]
    max_taps = (taps(int(BOXES[:3, 2].max()), 6), taps(int(BOXES[:3, 3].max()), 6))
    torch.library.opcheck(torch.ops.moco_fast.crop_resize, (data, *index, 6, *max_taps, backend))
    x = torch.rand(4, 3, 5, 6, device=device)
    factors, order, jitter, gray, flip = color_params(4, device)
    for out_dtype, channels_last in [(torch.float32, True), (torch.float32, False)]:
        torch.library.opcheck(torch.ops.moco_fast.color_augment, (x, factors, order, jitter, gray, flip, list(MEAN),
                                                                  list(STD), False, out_dtype, channels_last, backend))

    def pipeline(data, offsets, heights, widths, boxes, factors, order, jitter, gray, flip):
        crops = ops.crop_resize(data, offsets, heights, widths, boxes, 6, backend=backend, max_crop=40)
        return ops.color_augment(crops, factors[:3], order[:3], jitter[:3], gray[:3], flip[:3], MEAN, STD, True,
                                 backend=backend)
    args = (data, *index, factors, order, jitter, gray, flip)
    torch.testing.assert_close(torch.compile(pipeline, fullgraph=True)(*args), pipeline(*args), atol=1e-6, rtol=0)


def test_augment_auto_and_errors():
    images, data, offsets, heights, widths = packed_images(SHAPES[:2])
    boxes = BOXES[:2]
    for op in ("crop_resize", "color_augment"):
        assert op in ops.OPS and ops.available_backends()[op][0] == "reference"
    message = r"backend 'cuda' has no kernel for crop_resize; use 'triton' \(CUDA tensors\), 'cpu' or 'reference'"
    with pytest.raises(RuntimeError, match=message):
        ops.crop_resize(data, offsets, heights, widths, boxes, 4, backend="cuda")
    with pytest.raises(ValueError, match=r"data must have dtype in \['torch.uint8'\]; got torch.float32"):
        ops.crop_resize(data.float(), offsets, heights, widths, boxes, 4)
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\) rows of .*; got shape \(2, 3\)"):
        ops.crop_resize(data, offsets, heights, widths, boxes[:, :3], 4)
    with pytest.raises(ValueError, match=r"widths must have shape \(2,\), one entry per row of boxes; got \(3,\)"):
        ops.crop_resize(data, offsets, heights, torch.tensor([30, 9, 1]), boxes, 4)
    with pytest.raises(ValueError, match=r"heights must have dtype in \['torch.int64'\]; got torch.int32"):
        ops.crop_resize(data, offsets, heights.int(), widths, boxes, 4)
    outside = torch.tensor([[2, 3, 15, 20], [10, 0, 8, 9]])  # 10 + 8 > 17 rows
    with pytest.raises(ValueError, match=r"boxes\[1\] = \(10, 0, 8, 9\) \(top, left, height, width\) must be a "
                                         r"non-empty crop inside image 1 \(offset 1800, height 17, width 9\)"):
        ops.crop_resize(data, offsets, heights, widths, outside, 4)
    with pytest.raises(ValueError, match=r"image 1 .* must be a non-empty 3 x height x width image "
                                         r"inside data of 2059 elements"):
        ops.crop_resize(data[:-200], offsets, heights, widths, boxes, 4)
    x = torch.rand(2, 3, 4, 4)
    factors, order, jitter, gray, flip = color_params(2)
    args = (factors, order, jitter, gray, flip, MEAN, STD, True)
    with pytest.raises(RuntimeError, match="backend 'cuda' has no kernel for color_augment"):
        ops.color_augment(x, *args, backend="cuda")
    with pytest.raises(ValueError, match=r"x must be \(N, 3, H, W\); got shape \(2, 4, 4, 4\)"):
        ops.color_augment(torch.rand(2, 4, 4, 4), *args)
    with pytest.raises(ValueError, match=r"x must have dtype in .*; got torch.uint8"):
        ops.color_augment(x.to(torch.uint8), *args)
    with pytest.raises(ValueError, match=r"order must have shape \(2, 4\); got \(2, 3\)"):
        ops.color_augment(x, factors, order[:, :3], *args[2:])
    with pytest.raises(ValueError, match=r"flip must have dtype in \['torch.bool'\]; got torch.int64"):
        ops.color_augment(x, *args[:4], flip.long(), *args[5:])
    with pytest.raises(ValueError, match=r"order\[1\] must be a permutation of 0..3; got \[0, 0, 1, 2\]"):
        ops.color_augment(x, factors, torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]]), *args[2:])
    with pytest.raises(ValueError, match=r"factors\[0\] must be .* hue in \[-0.5, 0.5\]\); got \[1.0, 1.0, 1.0, 0.75"):
        ops.color_augment(x, torch.tensor([[1.0, 1, 1, 0.75], [1, 1, 1, 0]]), *args[1:])
    with pytest.raises(ValueError, match=r"mean must hold 3 floats, one per channel; got 2"):
        ops.color_augment(x, *args[:5], MEAN[:2], STD, True)
    # mean and std may come as tensors (the data pipeline keeps them so)
    torch.testing.assert_close(ops.color_augment(x, *args[:5], torch.tensor(MEAN), torch.tensor(STD), True),
                               ops.color_augment(x, *args))


@pytest.mark.parametrize("op, variant", [("crop_resize", ("uint8",)), ("color_augment", ("float32", "float32"))])
@pytest.mark.parametrize("device, backend", KERNELS)
def test_augment_self_check_passes_the_kernels_and_catches_a_wrong_one(device, backend, op, variant, monkeypatch,
                                                                       caplog):
    """Each augmentation op is self-checked like the others: its real kernel passes; one 0.1% off fails, `auto`
    then serves the reference and says why, and asking for it by name raises."""
    from moco_fast.ops import _backends, _self_check, augment
    monkeypatch.delenv(_self_check.ENV, raising=False)
    _backends.clear_caches()
    assert _self_check.run(op, backend, device, variant).ok
    real = getattr(augment, f"{op}_kernel")

    def kernel(b):
        fn = real(b)
        if b != backend:
            return fn
        if op == "crop_resize":
            return lambda *args: fn(*args) * 1.001
        return lambda *args: (fn(*args), args[-1].mul_(1.001))[0]
    monkeypatch.setattr(augment, f"{op}_kernel", kernel)
    _backends.clear_caches()
    result = _self_check.run(op, backend, device, variant)
    assert not result.ok and "max error" in result.detail, result
    if backend == "cpu":  # auto's first choice on CPU tensors
        with caplog.at_level("WARNING", logger="moco_fast"):
            assert _backends.resolve(op, "auto", device, variant) == "reference"
        assert f"{op} backend 'cpu' failed its self-check" in caplog.text
    with pytest.raises(RuntimeError, match=f"backend '{backend}' failed its run-time self-check"):
        _backends.resolve(op, backend, device, variant)
    _backends.clear_caches()


def test_crop_resize_cpu_kernel_refuses_a_tap_bound_that_is_too_small():
    """The bound sizes the Triton kernel's loops (a short one would truncate its filter), so the C++ kernel,
    which sizes each crop's filter itself, refuses it as well: both kernels take and honour the same arguments."""
    from moco_fast.ops import _backends
    if _backends.unusable_reason("crop_resize", "cpu", "cpu") is not None:
        pytest.skip("the C++ extension is not built")
    images, data, offsets, heights, widths = packed_images(SHAPES[:2])
    boxes = BOXES[:2]
    bound = (taps(int(boxes[:, 2].max()), 4), taps(int(boxes[:, 3].max()), 4))
    torch.ops.moco_fast.crop_resize_kernel(data, offsets, heights, widths, boxes, 4, *bound)
    with pytest.raises(RuntimeError, match=r"box \d needs \d+ x \d+ filter taps; max_taps_y, max_taps_x = "):
        torch.ops.moco_fast.crop_resize_kernel(data, offsets, heights, widths, boxes, 4, bound[0] - 1, bound[1])
