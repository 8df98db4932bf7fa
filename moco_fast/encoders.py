"""Backbones by name: torchvision ResNets, their CIFAR-stem variants for small images, and a narrow
ResNet for the CPU demo. Each builder takes num_classes (the projection size MoCo asks for)."""
from __future__ import annotations

import functools

import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock


def cifar_stem(model: nn.Module) -> nn.Module:
    """The official CIFAR demo's change for 32x32 inputs: a 3x3 stride-1 first conv and no max-pool."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class SmallResNet(nn.Module):
    """A narrow 3-stage ResNet (widths w, 2w, 4w unless `widths` says; two BasicBlocks each) for small
    images on a CPU.

    stem_stride=2 (`small_resnet_s2`) runs the first stage at half resolution (14x14 for 28 px inputs):
    a quarter of its convolutions' work.
    pool=2 (`small_resnet_s2_p2`, the demo's) averages the last map (4x4 at 28 px) over a 2x2 grid
    instead of over the whole map: the feature (4 x 64 = 256 wide) keeps where on the image a pattern
    is, at no cost in compute (the held-out figures that chose it: docs/results.md).
    """

    def __init__(self, num_classes: int = 128, width: int = 16, norm_layer=nn.BatchNorm2d, stem_stride: int = 1,
                 pool: int = 1, widths: tuple | None = None):
        super().__init__()
        widths = widths or (width, 2 * width, 4 * width)
        width = widths[0]
        self.conv1 = nn.Conv2d(3, width, 3, stem_stride, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], width
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and inplanes == planes else nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm_layer(planes))
            layers += [BasicBlock(inplanes, planes, stride, down, norm_layer=norm_layer),
                       BasicBlock(planes, planes, norm_layer=norm_layer)]
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(inplanes * pool * pool, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _torchvision(name: str, small_images: bool, num_classes: int = 1000):
    model = getattr(torchvision.models, name)(num_classes=num_classes)  # random init: nothing downloaded
    return cifar_stem(model) if small_images else model


ARCHS = {name: functools.partial(_torchvision, name, False)
         for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")}
ARCHS.update({f"cifar_{name}": functools.partial(_torchvision, name, True) for name in ("resnet18", "resnet50")})
ARCHS["small_resnet"] = SmallResNet
ARCHS["small_resnet_s2"] = functools.partial(SmallResNet, stem_stride=2)
ARCHS["small_resnet_s2_p2"] = functools.partial(SmallResNet, stem_stride=2, pool=2)


def get_encoder(arch: str):
    """The builder for `arch`: called as builder(num_classes=dim), like torchvision's models."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch]
