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
