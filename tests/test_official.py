"""Models released with the official code: a state dict in the official layout (its MoCo builder
around a torchvision ResNet, saved by DDP) converted by paco-import gives the logits of the official
forward, computed here independently; paco-eval evaluates it and model.pretrained starts from it."""
import pytest
import torch
import torchvision

from paco_ray import evaluate as evaluate_cli
from paco_ray import official
from paco_ray.checkpoint import load_model_weights, load_state
from paco_ray.config import TrainConfig
from paco_ray.model import PaCoModel

DIM, K, CLASSES = 16, 12, 10


def official_layout(gpaco: bool = False) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """(saved file contents, encoder_q, linear) of the official builder: PaCo/LT/moco/builder.py
    (PaCo: mlp = Linear-BN-ReLU-Linear, an encoder_k copy, linear_k) or GPaCo/LT/moco/builder.py
    (mlp = Linear-ReLU-Linear-ReLU-Linear, no encoder_k), around torchvision's resnet18."""
    torch.manual_seed(0)
    encoder_q = torchvision.models.resnet18(num_classes=DIM)
    encoder_q.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # the tiny dataset's grey images
    dim_mlp = encoder_q.fc.weight.shape[1]
    head = [torch.nn.Linear(dim_mlp, dim_mlp), torch.nn.ReLU(), torch.nn.Linear(dim_mlp, dim_mlp), torch.nn.ReLU()] \
        if gpaco else [torch.nn.Linear(dim_mlp, dim_mlp), torch.nn.BatchNorm1d(dim_mlp), torch.nn.ReLU()]
    encoder_q.fc = torch.nn.Sequential(*head, encoder_q.fc)
    linear = torch.nn.Linear(dim_mlp, CLASSES)
    for module in encoder_q.modules():  # trained statistics, not the defaults
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    state = {f"encoder_q.{k}": v for k, v in encoder_q.state_dict().items()}
    state.update({f"linear.{k}": v for k, v in linear.state_dict().items()})
    if not gpaco:
        state.update({f"encoder_k.{k}": v.clone() + 0.01 for k, v in encoder_q.state_dict().items()})
        state.update({f"linear_k.{k}": v.clone() for k, v in linear.state_dict().items()})
    state.update(queue=torch.nn.functional.normalize(torch.randn(K, DIM), dim=1),
                 queue_l=torch.randint(0, CLASSES, (K,)), queue_ptr=torch.tensor([4]))
    return {"epoch": 400, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in state.items()}}, \
        encoder_q, linear


def official_logits(encoder_q, linear, x):
    """The official _inference: encoder_q(image), its avgpool output (the forward hook on the
    layer before fc) through self.linear."""
    encoder_q.eval()
    pooled = {}
    handle = encoder_q.avgpool.register_forward_hook(lambda _, __, out: pooled.update(feat=out.flatten(1)))
    with torch.no_grad():
        encoder_q(x)
    handle.remove()
    return linear(pooled["feat"])


def config_args(tiny_dataset, loss="paco"):
    return ["--set", f"data.path={tiny_dataset}", "--set", "data.loader=torch", "--set", "model.backbone=resnet18",
            "--set", f"model.proj_dim={DIM}", "--set", f"paco.queue_size={K}", "--set", f"loss={loss}"]


@pytest.mark.parametrize("loss", ["paco", "gpaco"])
def test_an_official_checkpoint_imports_with_the_official_logits(loss, tiny_dataset, tmp_path, capsys):
    saved, encoder_q, linear = official_layout(gpaco=loss == "gpaco")
    torch.save(saved, tmp_path / "official.pth.tar")
    (tmp_path / "c.yaml").write_text("{}\n")
    out = tmp_path / "imported"
    assert official.main([str(tmp_path / "official.pth.tar"), "--config", str(tmp_path / "c.yaml"),
                          *config_args(tiny_dataset, loss), "--out", str(out)]) == 0
    state = load_state(out)
    cfg = TrainConfig.from_dict(state["config"])
    model = PaCoModel.from_config(cfg, CLASSES, 1)
    load_model_weights(model, state, cfg, CLASSES)
    model.eval()
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, official_logits(encoder_q, linear, x))
    queue = saved["state_dict"]
    assert torch.equal(model.queue.keys, queue["module.queue"]) and model.queue.ptr.item() == 4
    if loss == "paco":  # the momentum encoder too
        assert torch.equal(model.key_encoder.conv1.weight, queue["module.encoder_k.conv1.weight"])
    capsys.readouterr()
    assert evaluate_cli.main([str(out), "--split", "test"]) == 0  # paco-eval evaluates it
    assert capsys.readouterr().out.startswith("split")


def test_an_official_checkpoint_that_does_not_fit_the_config_is_refused_in_one_line(tiny_dataset, tmp_path, capsys):
    saved, _, _ = official_layout()
    torch.save(saved, tmp_path / "official.pth")
    (tmp_path / "c.yaml").write_text("{}\n")
    args = [str(tmp_path / "official.pth"), "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]
    assert official.main([*args, *config_args(tiny_dataset), "--set", "model.proj_dim=32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "projector.3.weight is (16, 512) in the file but (32, 512)" in err
    assert official.main([*args, *config_args(tiny_dataset, "gpaco")]) == 2  # a PaCo file read as GPaCo
    assert "has no tensor for projector.2.weight" in capsys.readouterr().err
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    assert official.main([str(tmp_path / "other.pth"), *args[1:], *config_args(tiny_dataset)]) == 2
    assert "not an official PaCo/GPaCo checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_training_starts_from_an_imported_official_model(tiny_dataset, tiny_config, tmp_path):
    saved, encoder_q, _ = official_layout()
    torch.save(saved, tmp_path / "official.pth")
    (tmp_path / "c.yaml").write_text("{}\n")
    out = tmp_path / "imported"
    assert official.main([str(tmp_path / "official.pth"), "--config", str(tmp_path / "c.yaml"),
                          *config_args(tiny_dataset), "--out", str(out)]) == 0
    cfg = tiny_config("model.backbone=resnet18", f"model.pretrained={out / 'state.pt'}")
    model = PaCoModel.from_config(cfg, CLASSES, 1)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, encoder_q.layer4[1].conv2.weight)
