"""Config loading: YAML, overrides, and a one-line error naming the key for each bad value."""
import pytest

from paco_ray import train as train_cli
from paco_ray.config import ConfigError, TrainConfig, apply_overrides, load_config


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert cfg.loss == "paco" and cfg.data.path == "" and cfg.default_data.imbalance_factor == 100
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.storage_path.startswith("/")


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: gpaco\npaco:\n  temperature: 0.1\n  queue_size: 1000\noptim: {epochs: 3}\n")
    cfg = load_config(path, ["paco.alpha=0.2", "data.batch_size=64", "optim.nesterov=true"])
    assert (cfg.loss, cfg.paco.temperature, cfg.paco.queue_size, cfg.paco.alpha) == ("gpaco", 0.1, 1000, 0.2)
    assert cfg.data.batch_size == 64 and cfg.optim.epochs == 3 and cfg.optim.nesterov is True
    assert isinstance(load_config(None, ["paco.alpha=1"]).paco.alpha, float)  # int accepted for float
    # YAML 1.1 reads 1e-6 (no dot) as a string; a float key still takes it as a number
    assert load_config(None, ["optim.lr=1e-6"]).optim.lr == 1e-6
    with pytest.raises(ConfigError, match="optim.lr: expected float, got '1e-6x'"):
        load_config(None, ["optim.lr=1e-6x"])


@pytest.mark.parametrize("override,key", [
    ("paco.alpha=-0.1", "paco.alpha"),
    ("paco.temperature=0", "paco.temperature"),
    ("paco.temperature=-1", "paco.temperature"),
    ("paco.queue_size=0", "paco.queue_size"),
    ("paco.gamma=-1", "paco.gamma"),
    ("paco.momentum=1.0", "paco.momentum"),
    ("loss=focal", "loss"),
    ("model.projector=mlp3", "model.projector"),
    ("default_data=3", "default_data"),
    ("workers=0", "workers"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=129", "data.batch_size"),  # not divisible by 2 workers
    ("default_data.imbalance_factor=0.5", "default_data.imbalance_factor"),
    ("data.imbalance_factor=0.5", "default_data.imbalance_factor"),  # the old name still works
    ("data.dataset=imagenet", "data.dataset"),
    ("model.backbone=vgg16", "model.backbone"),
    ("optim.lr=0", "optim.lr"),
    ("optim.warmup_epochs=15", "optim.warmup_epochs"),
    ("optim.epochs=2.5", "optim.epochs"),
    ("optim.nesterov=maybe", "optim.nesterov"),
    ("paco.queue_size=big", "paco.queue_size"),
    ("paco.alpah=0.1", "paco.alpah"),
    ("amp_dtype=float8", "amp_dtype"),
    ("log_level=LOUD", "log_level"),
    ("optim.momentum=0 optim.nesterov=true", "optim.nesterov"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split())
    message = str(err.value)
    assert key in message and "\n" not in message


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key paco\.alpah \(did you mean paco\.alpha\?\)"):
        load_config(None, ["paco.alpah=0.1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("paco: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)
    section = tmp_path / "section.yaml"
    section.write_text("paco: 3\n")
    with pytest.raises(ConfigError, match="paco: expected a mapping"):
        load_config(section)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["paco.alpha"])
    with pytest.raises(ConfigError, match="loss is not a section"):
        apply_overrides({"loss": "ce"}, ["loss.x=1"])


def test_cli_prints_one_line_error_and_exit_code_2(capsys):
    assert train_cli.main(["--set", "paco.temperature=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: paco.temperature: must be > 0")


def test_shipped_example_config_is_the_embedded_default():
    from pathlib import Path
    example = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_lt.yaml"
    assert load_config(example) == load_config()


def test_renamed_keys_still_work_with_one_deprecation_line_each(capsys, tmp_path):
    cfg = load_config(None, ["data.imbalance_factor=10", "data.cache_dir=/tmp/c", "data.dataset=fashion_mnist_lt"])
    assert cfg.default_data.imbalance_factor == 10 and cfg.default_data.cache_dir == "/tmp/c"
    assert cfg == load_config(None, ["default_data.imbalance_factor=10", "default_data.cache_dir=/tmp/c"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: data.dataset is deprecated and ignored (an empty data.path means the embedded default)",
                   "warning: data.imbalance_factor is deprecated; use default_data.imbalance_factor",
                   "warning: data.cache_dir is deprecated; use default_data.cache_dir"]
    # a checkpoint written before the rename still loads, silently
    old = load_config().to_dict()
    old["data"].update(old.pop("default_data"), dataset="fashion_mnist_lt")
    assert TrainConfig.from_dict(old) == load_config() and capsys.readouterr().err == ""
