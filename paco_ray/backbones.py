"""Backbones: each returns a module mapping images to pooled features, and the feature size."""
from __future__ import annotations

import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        s = stride if i == 0 else 1
        downsample = None
        if s != 1 or in_planes != planes:
            downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, s, bias=False), nn.BatchNorm2d(planes))
        layers.append(BasicBlock(in_planes, planes, s, downsample))
        in_planes = planes
    return nn.Sequential(*layers), in_planes


def small_resnet(in_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...]) -> tuple[nn.Module, int]:
    """A CIFAR-style ResNet from torchvision BasicBlocks: 3x3 stem, stages at strides 1, 2, 2, ..."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    planes = widths[0]
    for i, (width, n) in enumerate(zip(widths, blocks)):
        stage, planes = _stage(planes, width, n, 1 if i == 0 else 2)
        layers.append(stage)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net, planes


def _torchvision_trunk(name: str, in_channels: int) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


BACKBONES = {
    "resnet_small28": lambda c: small_resnet(c, (16, 32, 64), (1, 1, 1)),
    "resnet32": lambda c: small_resnet(c, (16, 32, 64), (5, 5, 5)),
    "resnet18": lambda c: _torchvision_trunk("resnet18", c),
    "resnet50": lambda c: _torchvision_trunk("resnet50", c),
    "resnext50_32x4d": lambda c: _torchvision_trunk("resnext50_32x4d", c),
}


def build_backbone(name: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """Return (trunk, feature_dim) for a backbone name from ``BACKBONES``."""
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name](in_channels)
