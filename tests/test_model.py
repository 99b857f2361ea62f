"""KeyQueue, momentum encoder and PaCoModel outputs; queue gather across 2 gloo processes."""
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paco_ray.backbones import BACKBONES, build_backbone
from paco_ray.model import KeyQueue, PaCoModel


def test_queue_wraps_around_with_size_not_a_multiple_of_batch():
    queue = KeyQueue(size=7, dim=2)
    assert queue.filled().item() == 0 and (queue.labels == -1).all()
    written = []
    for step in range(4):  # 4 batches of 3 keys into 7 slots
        keys = torch.arange(6, dtype=torch.float).view(3, 2) + 100 * step
        labels = torch.arange(3) + 10 * step
        queue.enqueue(keys, labels)
        written += list(zip(keys, labels))
    # The ring holds the last 7 keys; slot of the n-th key written is n % 7.
    for n, (key, label) in enumerate(written[-7:], start=len(written) - 7):
        assert torch.equal(queue.keys[n % 7], key) and queue.labels[n % 7] == label
    assert queue.ptr.item() == 12 % 7 and queue.filled().item() == 7


def test_queue_keeps_last_keys_when_batch_exceeds_size():
    queue = KeyQueue(size=4, dim=1)
    queue.enqueue(torch.arange(6, dtype=torch.float).view(6, 1), torch.arange(6))
    assert sorted(queue.labels.tolist()) == [2, 3, 4, 5]
    assert torch.equal(queue.keys.view(-1), queue.labels.float())  # each key stored beside its own label


def test_momentum_update_is_an_ema_of_query_parameters():
    model = PaCoModel("resnet_small28", num_classes=3, in_channels=1, proj_dim=8, queue_size=5, momentum=0.9)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in model._key_params()]
    model.momentum_update()
    for k_old, k_new, q in zip(before_k, model._key_params(), model._query_params()):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert not any(p.requires_grad for p in model._key_params())


def test_forward_changes_nothing_and_the_step_end_enqueues():
    torch.manual_seed(0)
    model = PaCoModel("resnet_small28", num_classes=3, in_channels=1, proj_dim=8, queue_size=5, momentum=0.9)
    x = torch.randn(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 1])
    out = model(x, x.flip(-1), labels)
    assert out.logits.shape == (4, 3) and out.q.shape == out.k.shape == (4, 8) and out.logits_k is None
    torch.testing.assert_close(out.q.norm(dim=1), torch.ones(4))
    assert (out.queue_labels == -1).all() and model.queue.filled().item() == 0  # the forward enqueues nothing
    assert out.q.requires_grad and not out.k.requires_grad
    model.end_step(out, labels, torch.tensor(0))  # a skipped step: no enqueue
    assert model.queue.filled().item() == 0 and model.queue.ptr.item() == 0
    model.end_step(out, labels, torch.tensor(1))
    assert model.queue.filled().item() == 4
    out2 = model(x, x, labels)
    assert (out2.queue_labels >= 0).sum() == 4
    model.end_step(out2, labels)
    inference = model(x)  # no key view: logits only
    assert inference.logits.shape == (4, 3) and inference.q is None and model.queue.filled().item() == 5


def test_a_skipped_step_end_leaves_key_encoder_and_queue_as_they_were():
    torch.manual_seed(0)
    model = PaCoModel("resnet_small28", num_classes=3, in_channels=1, proj_dim=8, queue_size=6, momentum=0.9)
    x, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 1])
    model.end_step(model(x, x, labels), labels)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)  # the query encoder moved: an update would move the key encoder
    def state():  # the key encoder's weights and the queue (BatchNorm statistics are BatchNormState's)
        return {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]
                if k.startswith(("key_", "queue.")) and "running_" not in k and "num_batches" not in k}

    before = state()
    model.end_step(model(x, x, labels), labels, torch.tensor(0, dtype=torch.int32))
    after = state()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    model.end_step(model(x, x, labels), labels, torch.tensor(1, dtype=torch.int32))
    assert not torch.equal(before["key_encoder.0.weight"], model.state_dict()["key_encoder.0.weight"])


def test_gpaco_has_no_key_encoder_and_both_views_carry_gradient_and_logits():
    gpaco = PaCoModel("resnet_small28", 3, 1, 8, 5, key_source="query")
    assert not hasattr(gpaco, "key_encoder") and hasattr(gpaco, "queue")
    x_q, x_k = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    out = gpaco(x_q, x_k, torch.tensor([0, 1]))
    assert out.k.requires_grad and out.logits_k.shape == (2, 3)  # the official GPaCo builder
    # the key view's center logits are the classifier on the key view's own features (its own batch)
    torch.testing.assert_close(out.logits_k, gpaco(x_k).logits)
    baseline = PaCoModel("resnet_small28", 3, 1, key_source=None)
    assert not hasattr(baseline, "queue")
    out = baseline(torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    assert out.logits.shape == (2, 3) and out.q is None and out.queue_keys is None


@pytest.mark.parametrize("loss,key_source", [("paco", "momentum"), ("gpaco", "query"), ("ce", None),
                                              ("balanced_softmax", None)])
def test_from_config_picks_the_key_source_of_the_loss(loss, key_source):
    from paco_ray.config import load_config

    cfg = load_config(None, [f"loss={loss}", "paco.queue_size=37", "model.proj_dim=16"])
    model = PaCoModel.from_config(cfg, num_classes=10, in_channels=1)
    assert model.key_source == key_source and hasattr(model, "key_encoder") == (key_source == "momentum")
    if key_source:
        assert model.queue.keys.shape == (37, 16) and model.momentum == cfg.paco.momentum


@pytest.mark.parametrize("name,channels,size,dim", [
    ("resnet_small28", 1, 28, 64), ("resnet32", 3, 32, 64), ("resnet18", 3, 64, 512)])
def test_backbones_produce_pooled_features(name, channels, size, dim):
    net, feature_dim = build_backbone(name, channels)
    assert feature_dim == dim
    assert net(torch.randn(2, channels, size, size)).shape == (2, dim)


def test_large_backbones_are_registered():
    for name, dim in (("resnet50", 2048), ("resnext50_32x4d", 2048), ("resnet152", 2048)):
        assert build_backbone(name, 3)[1] == dim
    assert {"resnet18", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnet32", "resnet_small28"} \
        <= set(BACKBONES)


def test_pretrained_torchvision_weights_load_into_both_encoders_but_not_the_classifier(tmp_path, tiny_config):
    import torchvision
    reference = torchvision.models.resnet18(weights=None, num_classes=1000)  # a torchvision weights file, 1000 classes
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    cfg = tiny_config("model.backbone=resnet18", f"model.pretrained={tmp_path / 'resnet18.pth'}")
    model = PaCoModel.from_config(cfg, num_classes=5, in_channels=3)
    want = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    for encoder in (model.encoder, model.key_encoder):
        got = encoder.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.classifier.weight.shape == (5, 512)
    fresh = PaCoModel.from_config(tiny_config("model.backbone=resnet18"), num_classes=5, in_channels=3)
    assert not torch.equal(fresh.encoder.conv1.weight, reference.conv1.weight)  # without it: random init


def test_pretrained_errors_name_the_file(tmp_path, tiny_config):
    from paco_ray.errors import InputError, MissingInputError
    def build(path):
        return PaCoModel.from_config(tiny_config("model.backbone=resnet18", f"model.pretrained={path}"), 5, 3)

    with pytest.raises(MissingInputError, match=r"model.pretrained: .*missing.pth does not exist"):
        build(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match=r"model.pretrained: .*junk.pth: not a torch state dict"):
        build(tmp_path / "junk.pth")
    torch.save(build_backbone("resnet_small28", 3)[0].state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError, match=r"other.pth matches none of the backbone's \d+ tensors"):
        build(tmp_path / "other.pth")
    # any paco_ray backbone takes weights of its own shape (an official CIFAR ResNet-32 included)
    small = PaCoModel.from_config(tiny_config(f"model.pretrained={tmp_path / 'other.pth'}"), 5, 3)
    assert torch.equal(small.encoder.state_dict()["0.weight"], torch.load(tmp_path / "other.pth")["0.weight"])


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    queue = KeyQueue(size=5, dim=2)
    for step in range(2):  # 2 steps x 2 ranks x 2 keys = 8 keys into 5 slots
        keys = torch.full((2, 2), float(100 * step + 10 * rank)) + torch.arange(2.0).view(2, 1)
        queue.enqueue(keys, torch.tensor([rank, rank]) + 2 * step)
    torch.save({"keys": queue.keys, "labels": queue.labels, "ptr": queue.ptr}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_enqueue_gathers_across_two_gloo_processes(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    q0, q1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    for name in ("keys", "labels", "ptr"):
        assert torch.equal(q0[name], q1[name])  # every rank holds the same queue
    # Written in rank order per step: step 0 -> [r0, r0, r1, r1], step 1 -> [r0, r0, r1, r1].
    order = [(100 * s + 10 * r + i, r + 2 * s) for s in range(2) for r in range(2) for i in range(2)]
    for n, (value, label) in enumerate(order[-5:], start=len(order) - 5):
        assert q0["keys"][n % 5, 0].item() == value and q0["labels"][n % 5].item() == label
    assert q0["ptr"].item() == 8 % 5


def test_queue_stores_non_finite_keys_as_empty_slots():
    queue = KeyQueue(4, 2)
    keys = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, float("inf")]])
    queue.enqueue(keys, torch.tensor([3, 4, 5]))
    assert queue.labels.tolist() == [3, -1, -1, -1] and torch.isfinite(queue.keys).all()
    assert queue.ptr.item() == 3


def test_projector_with_batch_norm_is_the_official_head():
    from paco_ray.config import load_config
    from paco_ray.model import projection_head

    head = projection_head(16, 4, "mlp_bn")
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in projection_head(16, 4)] == ["Linear", "ReLU", "Linear"]
    model = PaCoModel.from_config(load_config(None, ["model.projector=mlp_bn"]), 10, 1)
    assert isinstance(model.projector[1], torch.nn.BatchNorm1d) and isinstance(model.key_projector[1],
                                                                                torch.nn.BatchNorm1d)


def _key_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))


def _shuffle_worker(rank: int, world: int, init_file: str, out_dir: str):
    from paco_ray.model import encode_shuffled

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = _key_net()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 + rank)) * (1 + 3 * rank)  # ranks differ
    out = {}
    net.eval()
    out["eval"], out["eval_plain"] = encode_shuffled(net, x), net(x)
    net.train()
    torch.manual_seed(123)  # rank 0 draws the permutation from here
    out["train"], out["train_plain"] = encode_shuffled(net, x), net(x)
    out["x"] = x
    torch.save(out, os.path.join(out_dir, f"shuffle{rank}.pt"))
    dist.destroy_process_group()


def test_shuffled_keys_equal_plain_keys_in_eval_and_differ_only_by_batch_statistics_in_train(tmp_path):
    from paco_ray.model import encode_shuffled

    net = _key_net()
    x = torch.randn(4, 3)
    assert torch.equal(encode_shuffled(net, x), net(x))  # no DDP: nothing to shuffle
    mp.spawn(_shuffle_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"shuffle{r}.pt") for r in range(2)]
    for r in ranks:  # eval mode: per-sample computation, so shuffling changes nothing
        torch.testing.assert_close(r["eval"], r["eval_plain"], rtol=0, atol=1e-6)
        assert not torch.allclose(r["train"], r["train_plain"], atol=1e-3)  # batch statistics differ
    # train mode: each key is the net applied to the shuffled half-batch its sample was sent to
    everything = torch.cat([r["x"] for r in ranks])
    torch.manual_seed(123)
    order = torch.randperm(8)
    net = _key_net().train()
    shuffled = torch.cat([net(everything[chunk]) for chunk in order.view(2, -1)])
    expected = shuffled[torch.argsort(order)]
    torch.testing.assert_close(torch.cat([r["train"] for r in ranks]), expected, rtol=0, atol=1e-6)


def test_places_fine_tuning_trains_exactly_what_the_official_code_trains():
    """paco_fp16_places.py: disable_conv(model) (every nn.Conv2d weight), then re-enable the
    Conv2d and BatchNorm2d weights of encoder_q.layer4[-1]; everything else keeps its setting."""
    from pathlib import Path

    from paco_ray.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "places_lt.yaml", ["model.pretrained="])
    assert cfg.model.trainable == "last_block" and cfg.model.backbone == "resnet152"
    model = PaCoModel.from_config(cfg, 365, 3)
    reference = PaCoModel.from_config(load_config(None, ["model.backbone=resnet152", "model.projector=mlp_bn",
                                                         "model.proj_dim=128"]), 365, 3)
    for module in reference.modules():  # the official rule, applied to an untouched model
        if isinstance(module, torch.nn.Conv2d):
            module.weight.requires_grad = False
    for module in reference.encoder.layer4[-1].modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.requires_grad = True
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.requires_grad = module.bias.requires_grad = True
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in reference.named_parameters() if p.requires_grad}
    assert "encoder.layer4.2.conv3.weight" in trained and "encoder.layer4.1.conv3.weight" not in trained
    assert "encoder.layer1.0.bn1.weight" in trained and "classifier.weight" in trained and "projector.0.weight" in trained
    assert not any(n.startswith("key_") for n in trained)


def _eval_worker(rank: int, world: int, init_file: str, out_dir: str):
    """A DDP model trains one step on both ranks, then evaluates a split of which only rank 0
    holds a batch (a validation split smaller than the number of workers)."""
    from types import SimpleNamespace

    from paco_ray.data.longtail import ClassInfo
    from paco_ray.metrics import evaluate_split

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(PaCoModel("resnet_small28", 3, 1, key_source=None))
    torch.manual_seed(rank)  # each rank its own batch: its own BatchNorm statistics
    model(torch.randn(4, 1, 28, 28)).logits.sum().backward()
    batches = [(torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 2]))]
    loaders = SimpleNamespace(eval=lambda split: iter(batches if rank == 0 else []), normalize=lambda x: x)
    metrics = evaluate_split(model, loaders, "val", ClassInfo(("a", "b", "c"), (5, 3, 1)), torch.device("cpu"))
    torch.save(metrics["per_class"], os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_evaluation_finishes_when_a_rank_has_no_batch(tmp_path):
    context = mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("evaluation under DDP waited for ever for the rank without a batch")
    per_class = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    np.testing.assert_array_equal(per_class[0], per_class[1])  # counts summed over ranks, the same on both
    assert per_class[0][0] == 100.0 or per_class[0][0] == 0.0  # class a: its one image counted once


def test_a_loss_is_one_entry_in_losses(monkeypatch, tiny_config, tmp_path):
    """A loss added to losses.LOSSES alone is accepted by the config, builds its model (keys from
    the query encoder, its own head) and trains through the loop, with the value it computes."""
    from paco_ray import losses
    from paco_ray.config import ConfigError, TrainConfig
    from paco_ray.loop import train
    from paco_ray.session import LocalSession

    seen = []

    def twice_ce(out, labels, log_prior, weights):
        seen.append(weights["temperature"])
        return 2 * losses.cross_entropy(out.logits, labels)

    monkeypatch.setitem(losses.LOSSES, "twice_ce", losses.Loss(twice_ce, keys="query", head="mlp"))
    cfg = tiny_config("loss=twice_ce", "optim.epochs=1", "optim.warmup_epochs=0", "paco.temperature=0.3",
                      "progress_every_s=0")
    assert cfg.contrastive
    model = PaCoModel.from_config(cfg, num_classes=10, in_channels=1)
    assert model.key_source == "query" and len(model.projector) == 3 and isinstance(model.projector[1], torch.nn.ReLU)
    session = LocalSession(tmp_path / "run", tensorboard=False)
    train(cfg, session)
    assert seen and set(seen) == {0.3} and session.reports[0]["epoch"] == 1
    monkeypatch.delitem(losses.LOSSES, "twice_ce")
    with pytest.raises(ConfigError, match="loss: must be one of paco, gpaco, balanced_softmax, ce, got 'twice_ce'"):
        TrainConfig.from_dict(cfg.to_dict())
