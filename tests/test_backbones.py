"""Backbones through timm (``timm:<name>``): pooled features of the right size, no download,
weights from a local .safetensors or .pth file, and one-line errors for a bad name."""
import pytest
import torch

from paco_ray.backbones import build_backbone, load_pretrained
from paco_ray.model import PaCoModel
from paco_ray.schema import ConfigError


def test_timm_backbone_gives_pooled_features_and_trains_in_a_paco_model(tiny_config):
    trunk, dim = build_backbone("timm:resnet10t", in_channels=1)
    assert trunk(torch.randn(2, 1, 28, 28)).shape == (2, dim) and dim == 512
    cfg = tiny_config("model.backbone=timm:resnet10t")
    model = PaCoModel.from_config(cfg, 10, 1)
    out = model(torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.arange(4))
    assert out.logits.shape == (4, 10) and out.q.shape == (4, cfg.model.proj_dim)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_load_from_a_local_file(suffix, tmp_path):
    source, _ = build_backbone("timm:resnet10t", 3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    target, _ = build_backbone("timm:resnet10t", 3)
    loaded, total = load_pretrained(target, str(path))
    assert loaded == total
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_bad_timm_names_are_refused_in_one_line(tiny_config):
    with pytest.raises(ConfigError, match="model.backbone: names no timm model"):
        tiny_config("model.backbone=timm:resnet_nonexistent")
    with pytest.raises(ConfigError, match="model.backbone: must be one of resnet_small28"):
        tiny_config("model.backbone=vgg")


class ReferenceResNet32(torch.nn.Module):
    """models/resnet_cifar.py of the official code (ResNet_s with option-A BasicBlocks), written
    out again here, returning its pooled encoding."""

    class Block(torch.nn.Module):
        def __init__(self, in_planes, planes, stride):
            super().__init__()
            nn = torch.nn
            self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.option_a = stride != 1 or in_planes != planes
            self.planes = planes

        def forward(self, x):
            F = torch.nn.functional
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4), "constant", 0) \
                if self.option_a else x
            return F.relu(out + shortcut)

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1, in_planes = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), 16
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for s in [stride] + [1] * 4:
                blocks.append(self.Block(in_planes, planes, s))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))

    def forward(self, x):
        F = torch.nn.functional
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return F.adaptive_avg_pool2d(out, (1, 1)).view(out.size(0), -1)


def test_resnet32_is_the_published_option_a_network():
    ours, dim = build_backbone("resnet32", 3)
    reference = ReferenceResNet32()
    assert dim == 64 and set(ours.state_dict()) == set(reference.state_dict())  # the official module names
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) and 460_000 < count < 470_000  # "0.46M"
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(reference, mode)()
        torch.testing.assert_close(ours(x), reference(x))
    # option B (1x1 convolution + BatchNorm shortcuts) stays available by name, with more weights
    option_b, _ = build_backbone("resnet32_b", 3)
    assert sum(p.numel() for p in option_b.parameters()) > count
    # the official initialisation: kaiming_normal_ with fan-in on every convolution
    conv = ours.layer3[0].conv1.weight
    assert abs(conv.std().item() - (2 / conv[0].numel()) ** 0.5) < 0.01
