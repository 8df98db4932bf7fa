"""The small backbones: the feature the kNN and the linear probe read is what the docstrings say."""
import pytest
import torch
import torch.nn as nn

from moco_fast.encoders import ARCHS, SmallResNet, get_encoder
from moco_fast.evaluate import backbone_only


def last_map(model: SmallResNet, x: torch.Tensor) -> torch.Tensor:
    return model.layers(model.relu(model.bn1(model.conv1(x))))


def test_the_demo_encoder_reads_a_2x2_grid_of_the_last_map():
    """small_resnet_s2_p2 (the demo's): each quadrant of the 4x4 last map (28 px input) averaged, the
    four in row-major order per channel, 4 x 64 = 256 features."""
    torch.manual_seed(0)
    model = get_encoder("small_resnet_s2_p2")(num_classes=128).eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad(), backbone_only(model) as backbone:
        features = backbone(x)
        grid = last_map(model, x)
    assert grid.shape == (3, 64, 4, 4) and model.fc.in_features == 256
    want = grid.reshape(3, 64, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(features, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert model(x).shape == (3, 128)


def test_global_pooling_stays_the_default():
    """small_resnet_s2 (the demo's encoder before) keeps one average over the whole map: 64 features."""
    torch.manual_seed(0)
    model = get_encoder("small_resnet_s2")(num_classes=16).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad(), backbone_only(model) as backbone:
        torch.testing.assert_close(backbone(x), last_map(model, x).mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [24, 28, 32])
def test_pooled_encoders_take_other_sizes(size):
    """A 2x2 grid of any last map (3x3 at 24 px: overlapping cells), the same feature width."""
    model = SmallResNet(num_classes=8, stem_stride=2, pool=2).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 8)


def test_every_small_arch_is_built_by_name():
    for name in [a for a in ARCHS if a.startswith("small_resnet")]:
        model = get_encoder(name)(num_classes=8)
        assert isinstance(model, SmallResNet) and isinstance(model.fc, nn.Linear)
    with pytest.raises(ValueError, match="unknown arch 'small_resnet_s3'"):
        get_encoder("small_resnet_s3")
