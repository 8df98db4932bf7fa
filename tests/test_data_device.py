"""moco_fast.data's device pipeline (decode, batch_augment, device) against torchvision's official pipeline.

Runs on CPU tensors (the CPU fallback); on a GPU the same tests run on CUDA tensors where marked.
Distributions are compared with two-sample Kolmogorov-Smirnov tests at alpha = 0.001 and binomial
checks at 5 sigma, with fixed seeds, so they are deterministic.
"""
import io
import itertools
import math
import subprocess
import sys
import pathlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from moco_fast import data as D
from moco_fast.data import batch_augment as GA
from moco_fast.data import decode as GD
from moco_fast.data import BatchAugment, EpochSampler, Packed, device_loader
from test_data import trust_files, write_cifar10

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 3000  # samples per distribution test


def ks_rejects(a, b, alpha: float = 1e-3) -> bool:
    """Two-sample Kolmogorov-Smirnov: whether D = sup |F_a - F_b| exceeds the critical value at alpha."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    n, m = len(a), len(b)
    return d > math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def box_stats(boxes, H, W):
    top, left, h, w = (np.asarray(c, np.float64) for c in zip(*boxes))
    return {"area": h * w / (H * W), "ratio": w / h, "top": top, "left": left}


def torchvision_boxes(H, W, scale, n=N):
    torch.manual_seed(1)
    img = torch.empty(3, H, W)
    return [T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]


def our_boxes(H, W, scale, n=N):
    gen = torch.Generator().manual_seed(2)
    return GA.crop_boxes(torch.full((n,), H), torch.full((n,), W), gen, scale).tolist()


# ------------------------------------------------------------------------------------------------
# parameter distributions

@pytest.mark.parametrize("recipe", ["v1", "small"])
@pytest.mark.parametrize("H,W", [(375, 500), (7, 40), (32, 32), (600, 90)], ids=str)
def test_crop_boxes_match_torchvision(recipe, H, W):
    scale = D.RECIPES[recipe].scale
    ours, ref = box_stats(our_boxes(H, W, scale), H, W), box_stats(torchvision_boxes(H, W, scale), H, W)
    for name in ours:
        assert not ks_rejects(ours[name], ref[name]), name
    b = np.array(our_boxes(H, W, scale))
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] >= 1).all() and (b[:, 3] >= 1).all()
    assert (b[:, 0] + b[:, 2] <= H).all() and (b[:, 1] + b[:, 3] <= W).all()


def test_fallback_crop_is_torchvision_central_crop():
    # 2x100: no attempt fits a ratio in [3/4, 4/3], so every box is the central fallback
    ref = torchvision_boxes(2, 100, (0.2, 1.0), n=5)
    assert our_boxes(2, 100, (0.2, 1.0), n=5) == [list(b) for b in ref]


def test_ks_detects_a_wrong_scale():
    """The check above can fail: the default scale (0.08, 1) against the MoCo's (0.2, 1)."""
    ours = box_stats(our_boxes(375, 500, (0.08, 1.0)), 375, 500)
    ref = box_stats(torchvision_boxes(375, 500, (0.2, 1.0)), 375, 500)
    assert ks_rejects(ours["area"], ref["area"])


@pytest.mark.parametrize("recipe", ["v1", "v2", "small"])
def test_color_params_match_torchvision(recipe):
    rc = D.RECIPES[recipe]
    p = GA.sample_params(recipe, torch.full((N,), 64), torch.full((N,), 64), torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    hue = rc.jitter[3]
    ref = [T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], [-hue, hue]) for _ in range(N)]
    for j in range(4):
        assert not ks_rejects(p.factors[:, j].numpy(), [r[j + 1] for r in ref]), j
    assert not ks_rejects(p.factors[:, 0].numpy(), np.random.default_rng(0).uniform(0.6, 1.4, N))
    assert ks_rejects(p.factors[:, 3].numpy(), np.random.default_rng(0).uniform(-0.2, 0.2, N))  # can fail
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in p.order.tolist():
        counts[tuple(row)] += 1
    assert all(binomial_ok(c, N, 1 / 24) for c in counts.values()), counts
    if rc.p_blur:
        assert not ks_rejects(p.sigma[p.sigma > 0].numpy(), np.random.default_rng(0).uniform(0.1, 2.0, N))
    official = {"v1": (1.0, 0.2, 0.0), "v2": (0.8, 0.2, 0.5), "small": (0.8, 0.2, 0.0)}[recipe]
    n = 20_000  # 5 sigma of a binomial is then below 0.02 of a probability
    p = GA.sample_params(recipe, torch.full((n,), 64), torch.full((n,), 64), torch.Generator().manual_seed(4))
    for coin, prob in zip([p.jitter, p.gray, p.sigma > 0], official):
        assert binomial_ok(int(coin.sum()), n, prob)
    assert binomial_ok(int(p.flip.sum()), n, 0.5)
    assert not binomial_ok(int(p.gray.sum()), n, 0.22)  # the check can fail


def test_params_depend_on_the_generator_only():
    hw = torch.tensor([40, 300, 7]), torch.tensor([50, 200, 40])
    a = GA.sample_params("v2", *hw, torch.Generator().manual_seed(5))
    b = GA.sample_params("v2", *hw, torch.Generator().manual_seed(5))
    c = GA.sample_params("v2", *hw, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.boxes, c.boxes)


# ------------------------------------------------------------------------------------------------
# pixels: the whole view against torchvision's functional ops in the official order

def _packed(images):
    flat = [im.reshape(-1) for im in images]
    sizes = torch.tensor([f.numel() for f in flat])
    return Packed(torch.cat(flat), torch.cumsum(sizes, 0) - sizes,
                     torch.tensor([im.shape[1] for im in images]), torch.tensor([im.shape[2] for im in images]))


def official_view(img, p, i, recipe, size, mean, std):
    """torchvision.transforms.functional in data.moco_augmentation's order, on a float image."""
    top, left, h, w = p.boxes[i].tolist()
    x = TF.resized_crop(img.float() / 255, top, left, h, w, [size, size], antialias=True)
    gray = lambda t: TF.rgb_to_grayscale(t, num_output_channels=3)  # noqa: E731
    gray_first = recipe == "v1"  # the official v1 puts RandomGrayscale before ColorJitter
    if gray_first and p.gray[i]:
        x = gray(x)
    if p.jitter[i]:
        b, c, s, hue = p.factors[i].tolist()
        ops = [lambda t: TF.adjust_brightness(t, b), lambda t: TF.adjust_contrast(t, c),
               lambda t: TF.adjust_saturation(t, s), lambda t: TF.adjust_hue(t, hue)]
        for j in p.order[i].tolist():
            x = ops[j](x)
    if not gray_first and p.gray[i]:
        x = gray(x)
    if p.sigma[i] > 0:
        x = TF.gaussian_blur(x, [13, 13], [float(p.sigma[i])] * 2)
    if p.flip[i]:
        x = TF.hflip(x)
    return TF.normalize(x, mean, std)


@pytest.mark.parametrize("recipe", ["v1", "v2", "small"])
@pytest.mark.parametrize("dtype,atol", [pytest.param(torch.float32, 2e-3, id="fp32"),
                                         pytest.param(torch.bfloat16, 6e-2, id="bf16")])
def test_view_equals_official_ops(recipe, dtype, atol):
    gen = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
              for h, w in [(40, 50), (23, 31), (64, 17), (7, 40), (32, 32), (50, 45), (33, 61), (30, 30)]]
    packed, size = _packed(images), 24
    aug = BatchAugment(recipe, size, D.IMAGENET_MEAN, D.IMAGENET_STD, out_dtype=dtype)
    p = aug.params(packed, gen)
    n = len(images)
    # every branch at least once: alternate the coins
    p = p._replace(gray=torch.arange(n) % 3 == 0, flip=torch.arange(n) % 2 == 0,
                   jitter=p.jitter | (torch.arange(n) % 4 != 3),
                   sigma=torch.where(torch.arange(n) % 2 == 1, 0.1 + 1.9 * torch.rand(n, generator=gen), 0.0)
                   if D.RECIPES[recipe].p_blur else p.sigma)
    out = aug.apply(packed, p)
    assert out.shape == (n, 3, size, size) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    for i, img in enumerate(images):
        expected = official_view(img, p, i, recipe, size, D.IMAGENET_MEAN, D.IMAGENET_STD)
        torch.testing.assert_close(out[i].float(), expected, atol=atol, rtol=0, msg=f"sample {i}")


def test_blur_equals_torchvision_and_commutes():
    x = torch.rand(4, 3, 20, 26)
    sigma = torch.tensor([0.0, 0.1, 1.3, 2.0])
    out = GA.gaussian_blur(x.contiguous(memory_format=torch.channels_last), sigma)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out[0], x[0], atol=0, rtol=0)
    for i in range(1, 4):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2), atol=1e-5, rtol=0)
    # after hflip and normalise, as BatchAugment applies it, equals the official blur-then-flip-then-normalise
    mean, std = D.IMAGENET_MEAN, D.IMAGENET_STD
    official = TF.normalize(TF.hflip(TF.gaussian_blur(x, [13, 13], [1.3, 1.3])), mean, std)
    fused = GA.gaussian_blur(TF.normalize(TF.hflip(x), mean, std), torch.full((4,), 1.3))
    torch.testing.assert_close(fused, official, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# decoding

def _encode(img: Image.Image, fmt: str, **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_fallbacks(device):
    """The contract on every device: PNG and CMYK go to PIL; a truncated JPEG (no end-of-image marker, which
    nvjpeg might decode anyway) and junk are unreadable: skipped, replaced by the next readable image, counted."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    smooth = Image.fromarray(np.repeat(np.linspace(0, 255, 50, dtype=np.uint8)[None, :, None], 20, 0).repeat(3, 2))
    jpeg, png = _encode(smooth, "JPEG", quality=95), _encode(rgb, "PNG")
    cmyk = _encode(rgb.convert("CMYK"), "JPEG")
    truncated = jpeg[:len(jpeg) // 2].clone()
    junk = torch.frombuffer(bytearray(b"\xff\xd8\xff" + rng.bytes(300)), dtype=torch.uint8)
    paths = ["a.jpg", "b.png", "c.jpg", "d.jpg", "e.jpg"]
    stats = GD.DecodeStats()
    packed, skipped, source = GD.decode_batch([jpeg, png, cmyk, truncated, junk], device, paths, stats)
    assert packed.data.device.type == device
    assert skipped == ["d.jpg", "e.jpg"]
    assert source.tolist() == [0, 1, 2, 0, 0]
    assert (stats.device_decodes, stats.cpu_decodes, stats.unreadable) == (1, 2, 2)
    assert packed.heights.tolist() == [20, 30, 30, 20, 20] and packed.widths.tolist() == [50, 40, 40, 50, 50]
    image = lambda i: packed.data[packed.offsets[i]:].narrow(0, 0, 3 * packed.heights[i] * packed.widths[i]).view(  # noqa: E731
        3, packed.heights[i], packed.widths[i]).cpu()
    pil = lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1)  # noqa: E731
    assert torch.equal(image(1), pil(rgb))
    assert torch.equal(image(2), pil(Image.open(io.BytesIO(cmyk.numpy().tobytes())).convert("RGB")))
    assert (image(0).float() - pil(smooth).float()).abs().mean() < 2
    assert torch.equal(image(3), image(0))
    with pytest.raises(D.DataError, match="no readable image"):
        GD.decode_batch([junk], "cpu", ["e.jpg"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_jpeg_with_bytes_after_its_end_marker_is_decoded(device):
    """Bytes after the end marker (some cameras and tools write them) only send the file to PIL."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8))
    jpeg = _encode(img, "JPEG", quality=95)
    padded = torch.cat([jpeg, torch.zeros(100, dtype=torch.uint8)])
    stats = GD.DecodeStats()
    packed, skipped, _ = GD.decode_batch([jpeg, padded], device, ["a.jpg", "b.jpg"], stats)
    assert skipped == [] and (stats.device_decodes, stats.cpu_decodes, stats.unreadable) == (1, 1, 0)
    assert packed.heights.tolist() == [24, 24] and packed.widths.tolist() == [36, 36]
    n = 3 * 24 * 36
    assert (packed.data[n:2 * n].float() - packed.data[:n].float()).abs().mean().item() < 2


# ------------------------------------------------------------------------------------------------
# loaders

def _sampler(dataset, batch_size, seed=0):
    return EpochSampler(dataset, batch_size, seed)


def _loader(dataset, sampler, workers, device, recipe, size, mean, std, out_dtype=torch.float32):
    return device_loader(dataset, sampler, workers, device, BatchAugment(recipe, size, mean, std, out_dtype))


def _jpeg_folder(root, n=12):
    rng = np.random.default_rng(1)
    for i in range(n):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        path = root / f"c{i % 2}" / f"{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "c0" / "png.png")
    (root / "c1" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff" + rng.bytes(100))
    return root


def _batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip_batches=skip)
    return [(q.clone(), k.clone(), t.clone(), s) for (q, k), t, s in loader]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_folder_loader(tmp_path, dtype, device):
    dataset = D.build_dataset(_jpeg_folder(tmp_path), "train", None)
    sampler = _sampler(dataset, 7, seed=3)
    loader = _loader(dataset, sampler, 0, device, "v2", 32, D.IMAGENET_MEAN, D.IMAGENET_STD,
                                      out_dtype=dtype)
    assert len(loader) == 2
    batches = _batches(loader, 0)
    assert len(batches) == 2
    for q, k, targets, skipped in batches:
        for view in (q, k):
            assert view.shape == (7, 3, 32, 32) and view.dtype == dtype and torch.isfinite(view.float()).all()
            assert view.device.type == device
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert targets.shape == (7,) and not torch.equal(q, k)
    skipped = [p for b in batches for p in b[3]]
    assert [pathlib.Path(p).name for p in skipped] == ["zz_bad.jpg"]
    assert loader.cpu_decodes == 1  # the PNG


def test_folder_loader_workers_same_batches(tmp_path):
    dataset = D.build_dataset(_jpeg_folder(tmp_path), "train", None)
    make = lambda w: _loader(dataset, _sampler(dataset, 4, seed=1), w, "cpu", "v1", 16,  # noqa: E731
                                              D.IMAGENET_MEAN, D.IMAGENET_STD)
    for a, b in zip(_batches(make(0), 1), _batches(make(2), 1)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    from torchvision import datasets
    folder = write_cifar10(tmp_path, n_train=8, n_test=2)
    trust_files(monkeypatch, datasets.CIFAR10, folder)
    return D.build_dataset(tmp_path, "train", None)


@pytest.mark.parametrize("device", DEVICES)
def test_in_memory_loader(cifar, device):
    loader = _loader(cifar, _sampler(cifar, 16), 0, device, "small", 32, D.CIFAR10_MEAN,
                                      D.CIFAR10_STD, out_dtype=torch.bfloat16)
    images, targets = D.in_memory_images(cifar.base)
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[5].permute(1, 2, 0), torch.from_numpy(cifar.base.data[5]))
    assert targets.tolist() == list(cifar.base.targets)
    batches = _batches(loader, 0)
    assert len(batches) == len(loader) == 2
    for q, k, t, skipped in batches:
        assert q.shape == k.shape == (16, 3, 32, 32) and q.dtype == torch.bfloat16 and skipped == []
        assert q.is_contiguous(memory_format=torch.channels_last) and q.device.type == device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batches_made_on_the_side_stream_match_the_cpu_path(cifar):
    """On CUDA each batch is made on a side stream one ahead of the consumer: the same pixels as the CPU
    path (Triton against the reference ops), so nothing is read before it is written or after it is reused."""
    make = lambda dev: _loader(cifar, _sampler(cifar, 8, seed=5), 0, dev, "small", 32,  # noqa: E731
                                                D.CIFAR10_MEAN, D.CIFAR10_STD)
    cpu, cuda = _batches(make("cpu"), 2), _batches(make("cuda"), 2)
    assert len(cpu) == len(cuda) == 5
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b[0].cpu(), a[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(b[1].cpu(), a[1], atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_overlapped_jpeg_loader_keeps_its_pixels_while_the_main_stream_is_busy(tmp_path):
    """nvjpeg writes on its own stream into memory the allocator hands out: a batch's decoded images must stay
    allocated until the side-stream work that reads them has run (decode.KeptUntilDone). With the main
    stream held up by a long kernel before each batch is read, the pixels equal the synchronised path's."""
    dataset = D.build_dataset(_jpeg_folder(tmp_path, n=96), "train", None)
    make = lambda: _loader(dataset, _sampler(dataset, 8, seed=2), 0, "cuda", "v2", 32,  # noqa: E731
                                            D.IMAGENET_MEAN, D.IMAGENET_STD)
    calm = make()
    calm.sampler.set_epoch(0)
    expected = []
    for (q, k), _, _ in calm:
        torch.cuda.synchronize()
        expected.append((q.cpu(), k.cpu()))
    busy = make()
    busy.sampler.set_epoch(0)
    got = []
    for (q, k), _, _ in busy:
        torch.cuda._sleep(20_000_000)  # ~10 ms of spinning on the main stream before it reads the batch
        got.append((q.clone(), k.clone()))
    torch.cuda.synchronize()
    assert len(got) == len(expected) >= 10
    for (eq, ek), (gq, gk) in zip(expected, got):
        assert torch.equal(gq.cpu(), eq) and torch.equal(gk.cpu(), ek)


def test_gray_in_memory_set_repeats_channels(tmp_path):
    from torchvision import datasets
    from test_data import write_mnist_like
    write_mnist_like(tmp_path / "MNIST" / "raw", n_train=4)
    base = datasets.MNIST(str(tmp_path), train=True, download=False)
    images, targets = D.in_memory_images(base)
    assert images.shape == (4, 3, 28, 28) and torch.equal(images[:, 0], base.data) and torch.equal(images[:, 2], base.data)


def test_same_key_same_batch_and_resume(cifar):
    make = lambda: _loader(cifar, _sampler(cifar, 8, seed=5), 0, "cpu", "small", 32,  # noqa: E731
                                            D.CIFAR10_MEAN, D.CIFAR10_STD)
    full, again = _batches(make(), 2), _batches(make(), 2)
    resumed = _batches(make(), 2, skip=3)
    other_epoch = _batches(make(), 3)
    assert len(full) == 5 and len(resumed) == 2
    for a, b in zip(full, again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(full[0][0], other_epoch[0][0])
    assert not torch.equal(full[0][0], full[1][0])


def test_bench_data_quick(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_data.py"), "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {r["pipeline"] for r in rows} >= {"PIL workers (v2)", "gpu path folder (v2)", "gpu path in-memory (small)"}
    assert all(r["img_per_s"] > 0 for r in rows)
