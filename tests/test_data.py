"""moco_fast.data: the official augmentations (the PIL pipeline), datasets found from their on-disk layout.

Every dataset is written by the test into tmp_path in torchvision's own on-disk format; nothing is
downloaded. Only test_demo_fashion_mnist reads Debian's dataset-fashion-mnist, and skips without it.
"""
import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import datasets, transforms as T
from torchvision.transforms import InterpolationMode

from moco_fast import data as D
from moco_fast.data import datasets as layouts
from moco_fast.data import pil

# ------------------------------------------------------------------------------------------------
# writers of tiny datasets


def save_image(path, seed, size=(40, 30)):
    """A noise image; JPEG or PNG from the suffix."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)


def make_image_folder(root, counts):
    """counts: {split: {class: n}}; images alternate JPEG and PNG."""
    for split, classes in counts.items():
        for c, n in classes.items():
            for i in range(n):
                save_image(root / split / c / f"{i}.{'jpg' if i % 2 else 'png'}", seed=i)
    return root


def write_corrupt(folder):
    """good.png, then a truncated JPEG and random bytes named .jpg (ImageFolder reads them sorted)."""
    save_image(folder / "good.png", seed=0)
    save_image(folder / "whole.jpg", seed=1, size=(64, 64))
    whole = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "trunc.jpg").write_bytes(whole[:len(whole) * 6 // 10])
    (folder / "x.jpg").write_bytes(np.random.default_rng(1).bytes(500))
    return [str(folder / "trunc.jpg"), str(folder / "x.jpg")]


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root, n_train=2, n_test=3):
    """torchvision's cifar-10-batches-py: pickled dicts of uint8 rows (3x32x32, channels first)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        n = n_test if name == "test_batch" else n_train
        rows = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": [(b + i) % 10 for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_vis": 3072}, f)
    return folder


def trust_files(monkeypatch, cls, folder):
    """Point torchvision's md5 table at the md5s of the files the test wrote.

    torchvision's CIFAR and STL-10 classes compare every file's md5 with the official release's,
    which synthetic files cannot match. Replacing the expected md5s (class attributes) keeps that
    check running, so a missing or altered file is still rejected, while the content is ours.
    """
    md5 = lambda name: hashlib.md5((folder / name).read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    if hasattr(cls, "meta"):
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def write_idx(path, array, compress=False):
    """torchvision's (Fashion-)MNIST idx format: big-endian magic 2051 (images) or 2049 (labels), dims."""
    header = struct.pack(">I", 2051 if array.ndim == 3 else 2049) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(folder, n_train=5, n_test=3, compress=False):
    rng = np.random.default_rng(0)
    images = {}
    for split, n in [("train", n_train), ("t10k", n_test)]:
        images[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images[split], compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    return images


# ------------------------------------------------------------------------------------------------
# augmentations: exactly the official pipelines


def test_v1_pipeline_is_official():
    t = D.moco_augmentation(aug_plus=False).transforms
    assert [type(x) for x in t] == [T.RandomResizedCrop, T.RandomGrayscale, T.ColorJitter,
                                    T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert (t[0].size, t[0].scale, t[0].interpolation) == ((224, 224), (0.2, 1.0), InterpolationMode.BILINEAR)
    assert t[1].p == 0.2
    assert t[2].brightness == t[2].contrast == t[2].saturation == pytest.approx((0.6, 1.4))
    assert t[2].hue == pytest.approx((-0.4, 0.4))
    assert t[3].p == 0.5
    assert (list(t[5].mean), list(t[5].std)) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_v2_pipeline_is_official():
    t = D.moco_augmentation(aug_plus=True).transforms
    assert [type(x) for x in t] == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale, T.RandomApply,
                                    T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert (t[0].size, t[0].scale) == ((224, 224), (0.2, 1.0))
    jitter, = t[1].transforms
    assert t[1].p == 0.8 and isinstance(jitter, T.ColorJitter)
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    assert t[2].p == 0.2
    blur, = t[3].transforms
    assert t[3].p == 0.5 and isinstance(blur, D.GaussianBlur) and blur.sigma == [0.1, 2.0]
    assert t[4].p == 0.5
    assert list(t[6].mean) == list(D.IMAGENET_MEAN)


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
def test_small_pipeline_is_the_cifar_demo(aug_plus):
    t = D.moco_augmentation(aug_plus, 32, D.CIFAR10_MEAN, D.CIFAR10_STD, small=True).transforms
    assert [type(x) for x in t] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply,
                                    T.RandomGrayscale, T.ToTensor, T.Normalize]
    assert (t[0].size, t[0].scale) == ((32, 32), (0.08, 1.0))
    jitter, = t[2].transforms
    assert t[2].p == 0.8 and jitter.hue == pytest.approx((-0.1, 0.1))
    assert t[3].p == 0.2
    assert (list(t[5].mean), list(t[5].std)) == ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])


def test_eval_transform():
    t = D.eval_transform().transforms
    assert [type(x) for x in t] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert (t[0].size, t[1].size) == (256, (224, 224))
    assert D.eval_transform(160).transforms[0].size == 183  # the official 256/224 ratio
    assert [type(x) for x in D.eval_transform(32, small=True).transforms] == [T.ToTensor, T.Normalize]


def test_gaussian_blur_draws_sigma_like_the_official(monkeypatch):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    drawn = []
    monkeypatch.setattr(pil.random, "uniform", lambda a, b: drawn.append((a, b)) or 1.5)
    out = D.GaussianBlur()(img)
    assert drawn == [(0.1, 2.0)]
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=1.5))))


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
def test_two_crops_of_full_pipeline(aug_plus):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    q, k = D.TwoCropsTransform(D.moco_augmentation(aug_plus))(img)
    assert q.shape == k.shape == (3, 224, 224) and q.dtype == k.dtype == torch.float32
    assert not torch.equal(q, k)


# ------------------------------------------------------------------------------------------------
# datasets


def test_image_folder_train_val(tmp_path):
    make_image_folder(tmp_path, {"train": {"cat": 3, "dog": 3}, "val": {"dog": 2}})
    two = D.TwoCropsTransform(D.moco_augmentation(True, 32))
    train = D.build_dataset(tmp_path, "train", two)
    assert D.detect_dataset(tmp_path) == "imagefolder" and D.has_split(tmp_path, "val")
    assert train.classes == ["cat", "dog"] and len(train) == 6
    (q, k), target, skipped = train[4]
    assert q.shape == k.shape == (3, 32, 32) and q.dtype == torch.float32 and not torch.equal(q, k)
    assert (target, skipped) == (1, ())
    val = D.build_dataset(tmp_path, "val", D.eval_transform(32))
    # val holds only "dog": its target must still be train's index for "dog"
    assert len(val) == 2 and val.classes == ["cat", "dog"] and [val[i][1] for i in range(2)] == [1, 1]
    assert val[0][0].shape == (3, 32, 32)


def test_plain_class_folders_are_a_train_split(tmp_path):
    make_image_folder(tmp_path, {".": {"a": 1, "b": 2}})
    assert len(D.build_dataset(tmp_path, "train", None)) == 3
    assert not D.has_split(tmp_path, "val")
    with pytest.raises(D.DataError, match="has no val split"):
        D.build_dataset(tmp_path, "val", None)


def test_unreadable_images_are_replaced_and_reported(tmp_path):
    bad = write_corrupt(tmp_path / "train" / "a")
    ds = D.build_dataset(tmp_path, "train", None)
    good, target, skipped = ds[0]
    assert skipped == () and good.size == (40, 30)
    img, target, skipped = ds[1]  # trunc.jpg, then x.jpg, then wraps around to good.png
    assert skipped == tuple(bad) and target == 0 and np.array_equal(np.asarray(img), np.asarray(good))
    assert ds[2][2] == (bad[1],)

    samples, targets, paths = next(iter(D.make_loader(D.build_dataset(tmp_path, "train", T.ToTensor()),
                                                      batch_size=3, workers=0, shuffle=False, drop_last=False)))
    assert samples.shape == (3, 3, 30, 40) and targets.tolist() == [0, 0, 0]
    assert paths == [bad[0], bad[1], bad[1]]
    counter = D.SkipCounter(max_bad=3)
    counter.add(paths)
    assert counter.count == 3
    with pytest.raises(D.DataError, match=r"4 unreadable images, more than max_bad=3:(.|\n)*x\.jpg"):
        counter.add([bad[1]])


def test_skipped_paths_cross_worker_processes(tmp_path):
    bad = write_corrupt(tmp_path / "a")
    loader = D.make_loader(D.build_dataset(tmp_path, "train", T.ToTensor()), batch_size=1, workers=2,
                           shuffle=False, drop_last=False)
    assert loader.persistent_workers and loader.worker_init_fn is not None
    assert [p for _, _, paths in loader for p in paths] == [bad[0], bad[1], bad[1]]


def test_unreadable_images_give_up(tmp_path):
    for i in range(3):
        (tmp_path / "a" / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(D.DataError, match="3 unreadable images in a row"):  # a whole pass
        D.build_dataset(tmp_path, "train", None)[1]
    save_image(tmp_path / "a" / "3.png", seed=0)
    assert len(D.build_dataset(tmp_path, "train", None)[0][2]) == 3
    with pytest.raises(D.DataError, match="2 unreadable images in a row"):  # bounded by max_bad + 1
        D.build_dataset(tmp_path, "train", None, max_bad=1)[0]


def test_skip_counter_names_at_most_20_files():
    counter = D.SkipCounter(max_bad=0)
    with pytest.raises(D.DataError) as info:
        counter.add([f"f{i:02d}.jpg" for i in range(25)])
    assert "f19.jpg" in str(info.value) and "f20.jpg" not in str(info.value) and "and 5 more" in str(info.value)


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "folder-itself"])
def test_cifar10(tmp_path, monkeypatch, inside):
    folder = write_cifar10(tmp_path)
    trust_files(monkeypatch, datasets.CIFAR10, folder)
    path = folder if inside else tmp_path
    train = D.build_dataset(path, "train", D.moco_augmentation(False, 32, small=True))
    assert D.detect_dataset(path) == "cifar10" and train.classes == CIFAR_NAMES and len(train) == 10
    assert train[0][0].shape == (3, 32, 32)
    val = D.build_dataset(path, "val", None)
    img, target, skipped = val[2]
    with open(folder / "test_batch", "rb") as f:
        batch = pickle.load(f)
    assert np.array_equal(np.asarray(img), batch["data"][2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert (len(val), target, skipped) == (3, batch["labels"][2], ())


def test_cifar10_with_wrong_md5_is_rejected(tmp_path):
    write_cifar10(tmp_path)  # torchvision's own md5 table: these files are not the release's
    with pytest.raises(D.DataError, match="torchvision could not load cifar10 from .*cifar-10-batches-py"):
        D.build_dataset(tmp_path, "train", None)


def test_stl10_splits(tmp_path, monkeypatch):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [("train", 2), ("unlabeled", 3), ("test", 1)]:
        (folder / f"{name}_X.bin").write_bytes(rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tobytes())
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    trust_files(monkeypatch, datasets.STL10, folder)
    pretrain = D.build_dataset(tmp_path, "train", None)
    assert len(pretrain) == 5 and pretrain[4][1] == -1 and pretrain[0][0].size == (96, 96)
    labelled = D.build_dataset(tmp_path, "train", None, labelled=True)
    assert len(labelled) == 2 and [labelled[i][1] for i in range(2)] == [0, 1]
    assert len(D.build_dataset(tmp_path, "val", None)) == 1 and labelled.classes[0] == "c0"


@pytest.mark.parametrize("folder, kind", [("FashionMNIST", "fashion-mnist"), ("MNIST", "mnist")])
def test_mnist_idx_files_become_rgb(tmp_path, folder, kind):
    images = write_mnist_like(tmp_path / folder / "raw")
    assert D.detect_dataset(tmp_path) == kind
    train = D.build_dataset(tmp_path, "train", None)
    img, target, skipped = train[3]
    assert (len(train), target, skipped, img.mode, img.size) == (5, 3, (), "RGB", (28, 28))
    assert all(np.array_equal(np.asarray(img)[..., c], images["train"][3]) for c in range(3))
    assert train.classes == getattr(datasets, folder).classes
    info = D.DATASETS[kind]
    val = D.build_dataset(tmp_path / folder, "val", D.moco_augmentation(True, info.image_size, info.mean,
                                                                        info.std, small=info.small))
    assert len(val) == 3 and val[0][0].shape == (3, 28, 28)


def test_gz_folder_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCO_FAST_CACHE", str(tmp_path / "cache"))
    images = write_mnist_like(tmp_path / "gz", compress=True)
    assert D.detect_dataset(tmp_path / "gz") == "fashion-mnist"
    val = D.build_dataset(tmp_path / "gz", "val", None)
    assert len(val) == 3 and np.array_equal(np.asarray(val[1][0])[..., 0], images["t10k"][1])
    unpacked = sorted((tmp_path / "cache").glob("idx-*/FashionMNIST/raw/*"))
    assert [p.name for p in unpacked] == sorted(D.IDX_FILES)  # no temporary files left
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in unpacked]
    assert len(D.build_dataset(tmp_path / "gz", "train", None)) == 5
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in unpacked] == stamps  # not rewritten
    # MNIST's .gz files have the same names: only an explicit dataset="mnist" reads them as MNIST
    assert D.build_dataset(tmp_path / "gz", "train", None, dataset="mnist").classes == datasets.MNIST.classes


@pytest.mark.skipif(D.find_fashion_mnist() is None, reason="apt-get install dataset-fashion-mnist")
def test_demo_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("MOCO_FAST_CACHE", str(tmp_path))
    assert D.find_fashion_mnist() == D.DEMO_DIR
    train = D.build_dataset(None, "train", None)
    img, target, skipped = train[0]
    assert (len(train), len(train.classes), img.mode, img.size, skipped) == (60000, 10, "RGB", (28, 28), ())
    assert D.has_split(None, "val") and D.detect_dataset(None) == "fashion-mnist"


# ------------------------------------------------------------------------------------------------
# errors, raised before any loading


def _no_images(p):
    (p / "train" / "cat").mkdir(parents=True)
    (p / "train" / "cat" / "readme.txt").write_text("no images here")


def _unknown_val_class(p):
    make_image_folder(p, {"train": {"cat": 1}, "val": {"cow": 1}})


ERRORS = [
    pytest.param(lambda p: None, "nope", "train", r"data path .*nope does not exist", id="missing"),
    pytest.param(lambda p: (p / "empty").mkdir(), "empty", "train", r"data folder .*empty is empty", id="empty"),
    pytest.param(lambda p: (p / "notes.txt").write_text("x"), ".", "train",
                 r"no recognised dataset layout in .*\n.*accepted layouts(.|\n)*cifar-10-batches-py",
                 id="unrecognised"),
    pytest.param(lambda p: (p / "f.txt").write_text("x"), "f.txt", "train", "is not a folder", id="file"),
    pytest.param(_no_images, ".", "train", r"no images in .*train/<class>/: expected files ending in \.jpg",
                 id="no-images"),
    pytest.param(lambda p: (p / "train").mkdir(), ".", "train", r"no class folders in .*train", id="no-classes"),
    pytest.param(_unknown_val_class, ".", "val", r"class folders \['cow'\] of .*val are not in", id="val-class"),
    pytest.param(lambda p: make_image_folder(p, {"train": {"a": 1}}), ".", "test", "split must be", id="split"),
]


@pytest.mark.parametrize("setup, name, split, match", ERRORS)
def test_errors(tmp_path, setup, name, split, match):
    setup(tmp_path)
    with pytest.raises(D.DataError, match=match):
        D.build_dataset(tmp_path / name, split, None)


def test_wrong_dataset_kind(tmp_path):
    make_image_folder(tmp_path, {"train": {"a": 1}})
    with pytest.raises(D.DataError, match=r"no cifar10 data in"):
        D.build_dataset(tmp_path, "train", None, dataset="cifar10")
    with pytest.raises(D.DataError, match=r"unknown dataset 'imagenet'"):
        D.build_dataset(tmp_path, "train", None, dataset="imagenet")


def test_missing_demo_dataset(monkeypatch):
    monkeypatch.setattr(layouts, "find_fashion_mnist", lambda: None)
    with pytest.raises(D.DataError, match=r"apt-get install dataset-fashion-mnist`, or pass a data path"):
        D.build_dataset(None, "train", None)
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist"):
        D.has_split(None, "val")


def test_both_pipelines_read_the_one_recipe_table(monkeypatch):
    """A change to recipes.RECIPES reaches the PIL transforms and the device pipeline's draws alike."""
    from moco_fast.data import batch_augment
    changed = D.RECIPES["v2"]._replace(scale=(0.5, 1.0), p_gray=0.9, jitter=(0.4, 0.4, 0.4, 0.3))
    monkeypatch.setitem(D.RECIPES, "v2", changed)
    t = D.moco_augmentation(aug_plus=True, image_size=32).transforms
    assert t[0].scale == (0.5, 1.0) and t[2].p == 0.9 and t[1].transforms[0].hue == pytest.approx((-0.3, 0.3))
    sizes = torch.full((4000,), 40)
    p = batch_augment.sample_params("v2", sizes, sizes, torch.Generator().manual_seed(0))
    assert p.gray.float().mean() > 0.85 and p.factors[:, 3].abs().max() > 0.25
    assert (p.boxes[:, 2] * p.boxes[:, 3]).min() >= 0.45 * 40 * 40
