"""The training loop in-process (no Ray): every loss trains; resume from a checkpoint is exact."""
import math

import pytest
import torch

from paco_ray.checkpoint import CheckpointError, load_state, save_state
from paco_ray.optim import warmup_cosine
from paco_ray.session import LocalSession
from paco_ray.loop import train


class Interrupted(Exception):
    pass


class StopAfter(LocalSession):
    """A session that dies right after reporting epoch ``n`` (a preempted worker)."""

    def __init__(self, out_dir, n):
        super().__init__(out_dir)
        self.n = n

    def report(self, metrics, state):
        super().report(metrics, state)
        if metrics["epoch"] == self.n:
            raise Interrupted


def test_warmup_then_cosine():
    assert [round(warmup_cosine(s, 4, 20), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 10) == 1.0


def official_cifar_lr(epoch: int, lr: float, warmup_epochs: int) -> float:
    """adjust_learning_rate of the official paco_cifar.py (its --cos flag is never read)."""
    if epoch <= warmup_epochs:
        return lr / warmup_epochs * (epoch + 1)
    elif epoch > 360:
        return lr * 0.01
    elif epoch > 320:
        return lr * 0.1
    return lr


def test_the_step_schedule_is_the_official_cifar_schedule():
    from paco_ray.config import OptimConfig
    from paco_ray.optim import build_optimizer

    optim = OptimConfig(epochs=400, lr=0.05, warmup_epochs=10, schedule="step")  # milestones 320, 360; gamma 0.1
    steps = 3
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), optim, steps)
    seen = []
    for step in range(400 * steps):
        if step % steps == 0:
            seen.append(optimizer.param_groups[0]["lr"])
        else:  # constant within an epoch
            assert optimizer.param_groups[0]["lr"] == seen[-1]
        optimizer.step()
        scheduler.step()
    expected = [official_cifar_lr(e, 0.05, 10) for e in range(400)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[10] == pytest.approx(0.055) and seen[321] == pytest.approx(0.005) and seen[361] == pytest.approx(5e-4)


@pytest.mark.parametrize("loss", ["paco", "gpaco", "balanced_softmax", "ce"])
def test_each_loss_trains_and_reports(loss, tiny_config, tmp_path):
    cfg = tiny_config(f"loss={loss}")
    session = LocalSession(tmp_path / "out")
    train(cfg, session)
    assert [r["epoch"] for r in session.reports] == [1, 2]
    last = session.reports[-1]
    assert math.isfinite(last["train_loss"]) and 0 <= last["val_balanced_acc"] <= 100
    assert last["train_duplicate_samples"] == 0
    assert last["train_samples"] == (len_train(cfg) // 16) * 16
    assert ("queue_fill" in last) == (loss in ("paco", "gpaco"))
    state = load_state(last["checkpoint_path"])
    assert state["epoch"] == 2 and state["config"]["loss"] == loss
    if loss == "paco":
        assert any(k.startswith("key_encoder.") for k in state["model"]) and "queue.ptr" in state["model"]


def len_train(cfg):
    from paco_ray.data.prepared import PreparedDataset
    return PreparedDataset.open(cfg.data.path).size("train")


@pytest.mark.parametrize("views", [(), ("data.query_view=randaugment", "data.randaugment_ops=2", "data.key_view=sim")])
def test_resume_from_checkpoint_is_exact(views, tiny_config, tmp_path):
    """Also with the batched photometric ops of the published views (their own per-epoch generator)."""
    cfg = tiny_config("loss=paco", "optim.epochs=4", "deterministic=true", *views)
    straight = LocalSession(tmp_path / "straight")
    train(cfg, straight)

    interrupted = StopAfter(tmp_path / "interrupted", n=2)
    with pytest.raises(Interrupted):
        train(cfg, interrupted)
    resumed = LocalSession(tmp_path / "resumed", resume_from=interrupted.reports[-1]["checkpoint_path"])
    train(cfg, resumed)
    assert [r["epoch"] for r in resumed.reports] == [3, 4]

    a = load_state(straight.reports[-1]["checkpoint_path"])
    b = load_state(resumed.reports[-1]["checkpoint_path"])
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:  # weights, key encoder, BN statistics, queue and its pointer
        assert torch.equal(a["model"][name], b["model"][name]), name
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert straight.reports[-1]["val_balanced_acc"] == resumed.reports[-1]["val_balanced_acc"]


def test_ffcv_loader_trains_the_same_loop(tiny_config, tmp_path, ffcv_uncompiled):
    session = LocalSession(tmp_path / "out")
    train(tiny_config("data.loader=ffcv", "data.num_workers=1", "optim.epochs=2"), session)
    assert session.reports[-1]["train_duplicate_samples"] == 0
    assert session.reports[-1]["train_samples"] == (len_train(tiny_config()) // 16) * 16


def test_resume_refuses_a_broken_checkpoint(tiny_config, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="broken/state.pt.*unreadable"):
        train(tiny_config(), LocalSession(tmp_path / "out", resume_from=broken))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_config(), LocalSession(tmp_path / "out", resume_from=tmp_path / "nowhere"))


def test_resume_refuses_a_checkpoint_without_training_state_or_with_other_classes(tiny_config, tmp_path):
    cfg = tiny_config("optim.epochs=1", "optim.warmup_epochs=0")
    first = LocalSession(tmp_path / "a")
    train(cfg, first)
    state = load_state(first.reports[-1]["checkpoint_path"])
    weights_only = {k: v for k, v in state.items() if k not in ("optimizer", "rng")}
    save_state(tmp_path / "weights-only", weights_only)
    with pytest.raises(CheckpointError, match="checkpoint lacks optimizer, rng, needed to resume training"):
        train(cfg, LocalSession(tmp_path / "b", resume_from=tmp_path / "weights-only"))
    nine = {**state, "classes": {**state["classes"], "names": state["classes"]["names"][:9],
                                 "train_counts": state["classes"]["train_counts"][:9]}}
    save_state(tmp_path / "nine-classes", nine)
    with pytest.raises(CheckpointError, match=r"checkpoint has 9 classes but the dataset .*tiny has 10"):
        train(cfg, LocalSession(tmp_path / "b", resume_from=tmp_path / "nine-classes"))
    assert not (tmp_path / "b").exists()


def test_resume_refuses_a_checkpoint_of_another_model(tiny_config, tmp_path):
    first = LocalSession(tmp_path / "a")
    train(tiny_config("optim.epochs=1", "optim.warmup_epochs=0", "model.proj_dim=8"), first)
    checkpoint = first.reports[-1]["checkpoint_path"]
    with pytest.raises(CheckpointError, match=r"trained with other settings: model.proj_dim \(8 in the checkpoint vs 16\); "
                                              r"set resume_override: true"):
        train(tiny_config("model.proj_dim=16"), LocalSession(tmp_path / "b", resume_from=checkpoint))
    with pytest.raises(CheckpointError, match=r"does not fit this model \(resnet_small28, 10 classes\).*size mismatch"):
        train(tiny_config("model.proj_dim=16", "resume_override=true"), LocalSession(tmp_path / "b", resume_from=checkpoint))


def test_resume_refuses_other_training_settings_but_not_other_resources(tiny_config, tmp_path):
    first = LocalSession(tmp_path / "a")
    train(tiny_config("optim.epochs=2"), first)
    checkpoint = first.reports[0]["checkpoint_path"]  # after epoch 1
    with pytest.raises(CheckpointError, match=r"paco.alpha \(0.005 in the checkpoint vs 0.01\)"):
        train(tiny_config("optim.epochs=2", "paco.alpha=0.01"), LocalSession(tmp_path / "b", resume_from=checkpoint))
    assert not (tmp_path / "b").exists()  # refused before anything was written
    resumed = LocalSession(tmp_path / "c", resume_from=checkpoint)  # other resources and logging: fine
    train(tiny_config("optim.epochs=2", "cpus_per_worker=2", "log_level=INFO", "data.eval_batch_size=7"), resumed)
    assert [r["epoch"] for r in resumed.reports] == [2]
    overridden = LocalSession(tmp_path / "d", resume_from=checkpoint)
    train(tiny_config("optim.epochs=2", "paco.alpha=0.01", "resume_override=true"), overridden)
    assert [r["epoch"] for r in overridden.reports] == [2]


def test_evaluate_names_a_missing_split_and_defaults_to_the_present_ones(tiny_config, tiny_dataset, tmp_path, capsys):
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from paco_ray import evaluate as evaluate_cli

    no_test = tmp_path / "no_test"
    shutil.copytree(tiny_dataset, no_test)
    manifest = pq.read_table(no_test / "manifest.parquet")
    pq.write_table(manifest.filter(pc.not_equal(manifest["split"], "test")), no_test / "manifest.parquet")
    (no_test / "test.beton").unlink()
    session = LocalSession(tmp_path / "out")
    train(tiny_config(f"data.path={no_test}", "optim.epochs=1", "optim.warmup_epochs=0"), session)
    checkpoint = session.reports[-1]["checkpoint_path"]

    results, _ = evaluate_cli.evaluate_checkpoint(checkpoint)
    assert list(results) == ["val"]
    assert evaluate_cli.main([checkpoint, "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --split test: {no_test} has no test split"


def poison_step(monkeypatch, bad_steps):
    """Make compute_loss return NaN on the given (1-based) calls: a numerical fault mid-epoch."""
    import paco_ray.loop as train_module

    real, calls = train_module.compute_loss, {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(train_module, "compute_loss", faulty)


def test_a_nan_loss_stops_training_naming_the_step(tiny_config, tmp_path, monkeypatch):
    poison_step(monkeypatch, {3})
    session = LocalSession(tmp_path / "out")
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at epoch 1, step 3 \(global step 3\); "
                                                 r"set skip_nonfinite: true"):
        train(tiny_config("loss=paco"), session)
    assert session.reports == []  # nothing trained on after the fault was reported


def test_skip_nonfinite_skips_the_step_and_keeps_training(tiny_config, tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, {2, 5})
    session = LocalSession(tmp_path / "out")
    train(tiny_config("loss=paco", "skip_nonfinite=true"), session)
    first, second = session.reports
    steps = len_train(tiny_config()) // 16
    assert first["skipped_steps"] + second["skipped_steps"] == 2
    assert first["train_samples"] == (steps - first["skipped_steps"]) * 16
    assert math.isfinite(second["train_loss"])
    state = load_state(second["checkpoint_path"])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert "skipped a step with a non-finite loss or gradient at epoch 1, step 2" in capsys.readouterr().err


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_a_flagged_step_leaves_weights_and_momentum_untouched_even_as_the_first_step(momentum):
    from paco_ray.config import OptimConfig
    from paco_ray.optim import build_optimizer, skip_next_step_if

    model = torch.nn.Linear(3, 2)
    optim = OptimConfig(lr=0.1, momentum=momentum, weight_decay=1e-3, warmup_epochs=0)
    optimizer, _ = build_optimizer(model, optim, 10)
    reference = torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    skip_next_step_if(optimizer, torch.tensor(1, dtype=torch.int32))
    optimizer.step()  # skipped: nothing moves, NaN gradients included
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for step in range(3):  # then the same trajectory as plain (unfused) SGD that never saw the skipped step
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = q.grad = torch.full_like(p, 0.5 + step)
        skip_next_step_if(optimizer, torch.tensor(0, dtype=torch.int32))
        optimizer.step()
        plain.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))
    if momentum:  # an unfused optimizer's state dict (older checkpoints) still skips once loaded
        optimizer.load_state_dict(plain.state_dict())
        snapshot = [p.detach().clone() for p in model.parameters()]
        skip_next_step_if(optimizer, torch.tensor(1, dtype=torch.int32))
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))


def test_the_step_does_not_wait_for_the_host_each_step(tiny_config, tmp_path, monkeypatch):
    """.item() (a host sync on GPU) runs a fixed number of times per training epoch, not once per step."""
    import paco_ray.loop as train_module

    calls, active = {"n": 0}, {"on": False}
    real_item, real_epoch = torch.Tensor.item, train_module.train_one_epoch

    def counting(self):
        calls["n"] += active["on"]
        return real_item(self)

    def epoch(*args, **kwargs):
        active["on"] = True
        try:
            return real_epoch(*args, **kwargs)
        finally:
            active["on"] = False

    monkeypatch.setattr(torch.Tensor, "item", counting)
    monkeypatch.setattr(train_module, "train_one_epoch", epoch)
    cfg = tiny_config("loss=paco", "data.batch_size=4", "optim.epochs=1", "optim.warmup_epochs=0")
    train(cfg, LocalSession(tmp_path / "out"))
    # the DataLoader's seed, the epoch's mean loss and its image count: 3 for 29 steps
    assert len_train(cfg) // 4 >= 20 and calls["n"] <= 3


def test_a_config_without_a_dataset_is_refused_in_the_loop(tiny_config, tmp_path):
    from paco_ray.data.prepared import DatasetError

    with pytest.raises(DatasetError, match=r"data.path: empty; prepare a dataset with python -m pipelines"):
        train(tiny_config("data.path="), LocalSession(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_compile_trains_the_same_model_with_unchanged_checkpoints(tiny_config, tmp_path, monkeypatch):
    """``compile: true`` goes through torch.compile (dynamo tracing; inductor's code generation
    is swapped for dynamo's eager backend to keep this fast): same checkpoint keys, and an
    uncompiled run resumes from the compiled one."""
    compiled_modules = []
    original = torch.nn.Module.compile

    def eager_backend(module, *args, **kwargs):
        compiled_modules.append(module)
        return original(module, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", eager_backend)
    torch._dynamo.reset()
    compiled = LocalSession(tmp_path / "compiled")
    train(tiny_config("loss=paco", "compile=true"), compiled)
    assert len(compiled_modules) == 2  # query and key encoders
    assert all(m._compiled_call_impl is not None for m in compiled_modules)
    plain = LocalSession(tmp_path / "plain")
    train(tiny_config("loss=paco"), plain)
    a, b = (load_state(s.reports[-1]["checkpoint_path"])["model"] for s in (compiled, plain))
    assert a.keys() == b.keys()
    assert max((a[n].float() - b[n].float()).abs().max().item() for n in a) < 1e-3  # same training, up to float order
    resumed = LocalSession(tmp_path / "resumed", resume_from=compiled.reports[0]["checkpoint_path"])
    train(tiny_config("loss=paco"), resumed)
    assert [r["epoch"] for r in resumed.reports] == [2]


class StepWatch:
    """Wraps a run's training batches: poisons chosen steps and snapshots the whole training state
    (weights, BatchNorm statistics, key encoder, queue, optimizer state) after every step."""

    def __init__(self, monkeypatch, poison_inputs=(), poison_gradients=()):
        import paco_ray.loop as train_module

        self.poison_inputs, self.poison_gradients = set(poison_inputs), set(poison_gradients)
        self.states: list[dict] = []  # states[s]: after step s (states[0]: before the first)
        self.model = self.optimizer = None
        build_loaders, build_optimizer = train_module.build_loaders, train_module.build_optimizer

        def loaders(*args, **kwargs):
            built = build_loaders(*args, **kwargs)
            real = built.train
            built.train = lambda epoch: self.batches(real(epoch))
            return built

        def optimizer(model, *args, **kwargs):
            self.model = model
            self.optimizer, scheduler = build_optimizer(model, *args, **kwargs)
            return self.optimizer, scheduler

        monkeypatch.setattr(train_module, "build_loaders", loaders)
        monkeypatch.setattr(train_module, "build_optimizer", optimizer)

    def snapshot(self) -> dict:
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        for i, p in enumerate(self.optimizer.param_groups[0]["params"]):
            buffer = self.optimizer.state[p].get("momentum_buffer")
            if buffer is not None:
                state[f"momentum.{i}"] = buffer.clone()
        return state

    def batches(self, inner):
        for step, (x_q, x_k, labels, index) in enumerate(inner, start=1):
            self.states.append(self.snapshot())
            if step in self.poison_inputs:
                x_q = x_q.float().clone()
                x_q[0] = float("nan")  # one image of NaNs: NaN activations, BatchNorm statistics, loss
            hooks = [p.register_hook(lambda g: g * float("nan")) for p in [next(self.model.classifier.parameters())]] \
                if step in self.poison_gradients else []
            yield x_q, x_k, labels, index
            for hook in hooks:
                hook.remove()
        self.states.append(self.snapshot())


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the skipped step changed {changed[:6]}"


@pytest.mark.parametrize("loss", ["paco", "gpaco"])
def test_a_skipped_step_leaves_no_trace(loss, tiny_config, tmp_path, monkeypatch):
    """A NaN input (step 2) and NaN gradients with a finite loss (step 4, bfloat16 default: no
    GradScaler) are skipped: weights, optimizer momentum, BatchNorm statistics, key encoder and
    queue are bit for bit what they were before the step; training goes on with finite state."""
    watch = StepWatch(monkeypatch, poison_inputs={2}, poison_gradients={4})
    session = LocalSession(tmp_path / "out")
    train(tiny_config(f"loss={loss}", "skip_nonfinite=true", "optim.epochs=1", "optim.warmup_epochs=0",
                     "model.projector=mlp_bn"), session)
    (report,) = session.reports
    assert report["skipped_steps"] == 2
    assert_same_state(watch.states[1], watch.states[2])
    assert_same_state(watch.states[3], watch.states[4])
    for step in (1, 3, 5):  # the steps around them did train
        assert not torch.equal(watch.states[step - 1]["model.classifier.weight"],
                               watch.states[step]["model.classifier.weight"])
    assert all(torch.isfinite(t).all() for t in watch.states[-1].values() if t.is_floating_point())
    assert math.isfinite(report["val_balanced_acc"]) and math.isfinite(report["train_loss"])


def test_a_non_finite_gradient_with_a_finite_loss_stops_training_naming_the_step(tiny_config, tmp_path, monkeypatch):
    StepWatch(monkeypatch, poison_gradients={3})
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(loss [\d.]+\) at epoch 1, step 3 "):
        train(tiny_config("loss=paco"), LocalSession(tmp_path / "out"))
