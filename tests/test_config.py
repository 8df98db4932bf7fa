"""Presets, the official flag names, and bad values caught before any work."""
import pytest
import torch

from moco_fast.config import PRESETS, Config, ConfigError, ema_momentum, learning_rate, parse_config, validate


def test_no_data_means_the_demo_preset():
    cfg = parse_config([])
    assert cfg.data is None and cfg.preset == "demo" and cfg.arch == PRESETS["demo"]["arch"]


def test_preset_then_explicit_official_flags():
    cfg = parse_config(["/data", "--preset", "moco_v2", "-a", "resnet18", "-b", "128", "--lr", "0.1", "--moco-k", "4096",
                        "--moco-t", "0.3", "--schedule", "30", "40", "-j", "4", "--wd", "5e-4", "-p", "5"])
    assert (cfg.mlp, cfg.aug_plus, cfg.cos) == (True, True, True)  # from the preset
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.moco_k, cfg.moco_t) == ("resnet18", 128, 0.1, 4096, 0.3)
    assert (cfg.schedule, cfg.workers, cfg.weight_decay, cfg.print_freq) == ((30, 40), 4, 5e-4, 5)
    v1 = parse_config(["/data", "--preset", "moco_v1"])
    assert (v1.mlp, v1.aug_plus, v1.cos, v1.moco_t) == (False, False, False, 0.07)


@pytest.mark.parametrize("flags, message", [
    (["--moco-m", "1.5"], "--moco-m must be in"),
    (["-b", "0"], "--batch-size must be >= 1"),
    (["--moco-t", "0"], "--moco-t and --lr must be positive"),
])
def test_bad_values(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's error: usage, the message, exit code 2
        parse_config(["/data", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(ConfigError, match=message):  # a config built in Python: the same check
        validate(Config(data="/data", **{k: v for k, v in [_as_field(flags)]}))


def _as_field(flags):
    name = {"--moco-m": "moco_m", "-b": "batch_size", "--moco-t": "moco_t"}[flags[0]]
    return name, type(getattr(Config, name))(flags[1])


def test_schedules():
    cfg = parse_config(["/data", "--lr", "1", "--epochs", "100", "--schedule", "60", "80"])
    assert [learning_rate(cfg, e) for e in (0, 59, 60, 80, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    cos = parse_config(["/data", "--lr", "1", "--epochs", "100", "--cos"])
    assert learning_rate(cos, 0) == 1 and learning_rate(cos, 50) == pytest.approx(0.5)
    m = parse_config(["/data", "--moco-m", "0.99", "--moco-m-cos"])
    assert ema_momentum(m, 0, 100) == pytest.approx(0.99) and ema_momentum(m, 100, 100) == pytest.approx(1.0)
    assert ema_momentum(parse_config(["/data", "--moco-m", "0.99"]), 50, 100) == 0.99


def test_crop_scale_reaches_both_augmentation_pipelines():
    from moco_fast import data
    from moco_fast.data import batch_augment
    cfg = parse_config(["/data", "--crop-scale", "0.5"])
    assert cfg.crop_scale == 0.5
    pil = data.moco_augmentation(False, 28, small=True, crop_scale=cfg.crop_scale)
    assert pil.transforms[0].scale == (0.5, 1.0)
    assert data.moco_augmentation(False, 28, small=True).transforms[0].scale == (0.08, 1.0)  # the official recipe
    g = torch.Generator().manual_seed(0)
    sizes = torch.full((2000,), 28)
    boxes = batch_augment.sample_params("small", sizes, sizes, g, crop_scale=cfg.crop_scale).boxes
    area = (boxes[:, 2] * boxes[:, 3]).float() / 28 ** 2
    assert area.min() >= 0.5 - 0.05  # rounding of the box sides
    assert batch_augment.sample_params("small", sizes, sizes, g).boxes[:, 2:].prod(1).min() < 0.3 * 28 ** 2


@pytest.mark.parametrize("flags, value", [
    ([], True),                                   # the demo preset's
    (["--gpu-aug"], True), (["--no-gpu-aug"], False),
    (["--gpu-aug", "false"], False), (["--gpu-aug", "true"], True), (["--gpu-aug=0"], False),
    (["--gpu-aug", "/data"], True),               # a data path after the flag stays the data path
], ids=str)
def test_boolean_flags_work_alone_and_with_a_value(flags, value):
    cfg = parse_config(flags)
    assert cfg.gpu_aug is value
    assert cfg.data == ("/data" if "/data" in flags else None)


def test_boolean_flags_negate_a_preset_and_refuse_other_words(capsys):
    v2 = parse_config(["/data", "--preset", "moco_v2", "--no-mlp", "--compile", "false", "--channels-last", "off"])
    assert (v2.mlp, v2.aug_plus, v2.compile, v2.channels_last) == (False, True, False, False)
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--gpu-aug=maybe"])
    assert exit_.value.code == 2 and "argument --gpu-aug: expected a boolean, got 'maybe'" in capsys.readouterr().err


def test_start_epoch_points_to_resume(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(["/data", "--start-epoch", "3"])
    assert exit_.value.code == 2 and "--resume" in capsys.readouterr().err


def test_both_scripts_share_the_common_flags_and_the_schedule():
    from moco_fast.config import LINCLS_PRESETS, LinclsConfig, parse_lincls_config
    common = ["/data", "-a", "resnet18", "--epochs", "10", "-b", "64", "--lr", "2", "--schedule", "4", "8", "--wd", "0.1",
              "-j", "3", "-p", "7", "--seed", "5", "--max-steps", "11", "--device", "cpu", "--image-size", "32"]
    pre, lin = parse_config(common), parse_lincls_config([*common, "--pretrained", "x.pth"])
    names = ("arch", "epochs", "batch_size", "lr", "schedule", "weight_decay", "workers", "print_freq", "seed",
             "max_steps", "device", "image_size")
    assert [getattr(pre, n) for n in names] == [getattr(lin, n) for n in names]
    assert [learning_rate(lin, e) for e in (0, 4, 8)] == pytest.approx([2, 0.2, 0.02])
    assert isinstance(lin, LinclsConfig) and (lin.lr, lin.schedule) != (LinclsConfig.lr, LinclsConfig.schedule)
    demo = parse_lincls_config([])  # no data: the demo preset, as for pretraining
    assert demo.preset == "demo" and demo.pretrained == LINCLS_PRESETS["demo"]["pretrained"]
