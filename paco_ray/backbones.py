"""Backbones: each returns a module mapping images to pooled features, and the feature size:
small ResNets for 28 px and CIFAR images, torchvision's ResNets/ResNeXts, and any timm model
named ``timm:<name>`` (built without weights: nothing is downloaded; ``model.pretrained`` loads a
local or object-storage file)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
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


class OptionABlock(nn.Module):
    """The CIFAR ResNet block of He et al. and of the official code (``models/resnet_cifar.py``):
    a parameter-free shortcut (option A: subsample by 2, pad the new channels with zeros)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px images as the official code builds it (``ResNet_s``): a 3x3 stem,
    three stages of ``blocks`` option-A blocks (16, 32, 64 channels) and global average pooling;
    its convolutions initialised with ``kaiming_normal_`` (fan in). Module names match the
    official checkpoints' (conv1, bn1, layer1-3)."""

    def __init__(self, in_channels: int = 3, blocks: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, stages = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[OptionABlock(planes if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(blocks)]))
            planes = width
        self.layer1, self.layer2, self.layer3 = stages
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def _torchvision_trunk(name: str, in_channels: int) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


TORCHVISION_BACKBONES = ("resnet18", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d")
BACKBONES = {
    "resnet_small28": lambda c: small_resnet(c, (16, 32, 64), (1, 1, 1)),
    "resnet32": lambda c: (CifarResNet(c, 5), 64),  # the published CIFAR-LT backbone (option-A shortcuts)
    "resnet32_b": lambda c: small_resnet(c, (16, 32, 64), (5, 5, 5)),  # 1x1-conv + BN shortcuts
    **{name: (lambda c, name=name: _torchvision_trunk(name, c)) for name in TORCHVISION_BACKBONES},
}


TIMM_PREFIX = "timm:"


def timm_model_exists(name: str) -> bool:
    import timm

    return bool(timm.list_models(name))


def _timm_trunk(name: str, in_channels: int) -> tuple[nn.Module, int]:
    """A timm model without its classifier (``num_classes=0``: pooled features), random weights."""
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    return net, net.num_features


def build_backbone(name: str, in_channels: int = 3) -> tuple[nn.Module, int]:
    """Return (trunk, feature_dim) for a backbone name from ``BACKBONES`` or ``timm:<name>``."""
    if name.startswith(TIMM_PREFIX):
        return _timm_trunk(name[len(TIMM_PREFIX):], in_channels)
    if name not in BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name](in_channels)


def load_pretrained(trunk: nn.Module, source: str) -> tuple[int, int]:
    """Copy a state dict (a ``.pth`` torch file or a ``.safetensors`` file, local or an
    object-storage URI; or a paco_ray checkpoint's query encoder) into a trunk: every tensor whose
    name and shape match (a classifier never does: the trunk has none); returns (loaded, total)
    tensor counts. Refuses a file that matches nothing."""
    import io

    import torch

    from .errors import InputError, MissingInputError
    from .storage import filesystem, is_uri

    try:
        fs, path = filesystem(source)
        with fs.open_input_stream(path) as stream:
            data = stream.read()
        if source.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingInputError(f"model.pretrained: {source} does not exist") from None
    except Exception as err:
        kind = "unreadable" if is_uri(source) else "not a torch state dict"
        raise InputError(f"model.pretrained: {source}: {kind} ({type(err).__name__}: {err})".splitlines()[0]) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        # a paco_ray checkpoint (paco-import writes one from an official model): its query encoder
        state = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = trunk.state_dict()
    matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape} if isinstance(state, dict) else {}
    if not matched:
        raise InputError(f"model.pretrained: {source} matches none of the backbone's {len(own)} tensors")
    trunk.load_state_dict(matched, strict=False)
    return len(matched), len(own)
