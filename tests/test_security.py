"""Security: YAML through safe loaders only, checkpoints through torch.load(weights_only=True), no
credentials in values that get recorded, Ray's dashboard (and its job API) bound to localhost.
Each hostile input must fail in one line *without running* the code it carries."""
import pytest
import torch
import yaml

from conftest import RunsCode
from paco_ray import evaluate as evaluate_cli
from paco_ray import train as train_cli
from paco_ray import tune as tune_cli
from paco_ray.checkpoint import CheckpointError, load_state
from paco_ray.loop import train
from paco_ray.session import LocalSession


def python_tag(marker) -> str:
    """A YAML value that an unsafe loader would turn into a call creating ``marker``."""
    return f"!!python/object/apply:pathlib.Path.touch [{str(marker)!r}]"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("where", ["config-file", "set-value", "search-space", "tune-set-value"])
def test_yaml_python_tags_are_refused_unrun(where, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    if where == "config-file":
        (tmp_path / "c.yaml").write_text(f"loss: {python_tag(marker)}\n")
        code = train_cli.main([str(tmp_path / "c.yaml")])
    elif where == "set-value":
        code = train_cli.main(["--set", f"loss={python_tag(marker)}"])
    else:
        space = {"base": {"optim": {"epochs": 2}}, "search": {"paco.temperature": {"choice": [0.1, 0.2]}},
                 "scheduler": {"max_t": 2}, "storage_path": str(tmp_path)}
        text = yaml.safe_dump(space)
        if where == "search-space":
            text += f"name: {python_tag(marker)}\n"
        (tmp_path / "s.yaml").write_text(text)
        extra = ["--set", f"name={python_tag(marker)}"] if where == "tune-set-value" else []
        code = tune_cli.main([str(tmp_path / "s.yaml"), "--dry-run", *extra])
    assert code == 2
    one_line_error(capsys)
    assert not marker.exists()


@pytest.fixture
def finished_checkpoint(tiny_config, tmp_path):
    session = LocalSession(tmp_path / "done")
    train(tiny_config("optim.epochs=1", "optim.warmup_epochs=0"), session)
    return session.reports[-1]["checkpoint_path"]


def test_a_checkpoint_that_would_run_code_is_refused_unrun(finished_checkpoint, tiny_config, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    state = torch.load(f"{finished_checkpoint}/state.pt", weights_only=True)
    state["metrics"] = RunsCode(marker)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    torch.save(state, hostile / "state.pt")

    with pytest.raises(CheckpointError, match=r"hostile/state.pt' is unreadable \(UnpicklingError\)"):
        load_state(hostile)
    assert evaluate_cli.main([str(hostile)]) == 2
    assert "is unreadable (UnpicklingError)" in one_line_error(capsys)
    with pytest.raises(CheckpointError, match="is unreadable"):
        train(tiny_config(), LocalSession(tmp_path / "resumed", resume_from=hostile))
    assert not marker.exists() and not (tmp_path / "resumed").exists()


@pytest.mark.parametrize("command", ["train", "tune"])
def test_credentials_in_a_storage_uri_are_refused_without_echoing_them(command, tmp_path, capsys):
    uri = "s3://AKIAEXAMPLE:sEcReT-42@bucket/runs"
    if command == "train":
        code = train_cli.main(["--set", f"storage_path={uri}"])
    else:
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({
            "base": {"optim": {"epochs": 2}}, "search": {"paco.temperature": {"choice": [0.1]}},
            "scheduler": {"max_t": 2}, "storage_path": uri}))
        code = tune_cli.main([str(tmp_path / "s.yaml"), "--dry-run"])
    assert code == 2
    err = one_line_error(capsys)
    assert "storage_path: a s3:// URI must not carry credentials" in err
    assert "sEcReT" not in err and "AKIA" not in err


def test_checkpoints_and_tensorboard_hold_no_environment_secrets(tiny_config, tmp_path, monkeypatch):
    secret = "sEcReT-from-the-environment-91"
    for name in ("AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(name, secret)
    session = LocalSession(tmp_path / "run")
    train(tiny_config("optim.epochs=1", "optim.warmup_epochs=0"), session)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "state.pt" for p in written) and any("tfevents" in p.name for p in written)
    assert not [p for p in written if secret.encode() in p.read_bytes()]


class Stop(Exception):
    pass


@pytest.mark.parametrize("command", ["train", "tune"])
def test_the_clis_start_ray_with_the_dashboard_on_localhost(command, tiny_dataset, tmp_path, monkeypatch):
    import ray

    calls = []

    def fake_init(*args, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(Stop):
        if command == "train":
            train_cli.main(["--set", f"data.path={tiny_dataset}", "--set", f"storage_path={tmp_path}"])
        else:
            (tmp_path / "s.yaml").write_text(yaml.safe_dump({
                "base": {"data": {"path": str(tiny_dataset), "batch_size": 16}, "optim": {"epochs": 2}},
                "search": {"paco.temperature": {"choice": [0.1]}}, "scheduler": {"max_t": 2},
                "storage_path": str(tmp_path)}))
            tune_cli.main([str(tmp_path / "s.yaml")])
    assert len(calls) == 1 and calls[0].get("dashboard_host") == "127.0.0.1"
