"""What a person sees: the progress and epoch lines, the run folder's own files, the commands'
help and --print-config, the console scripts, and the checks that fail before Ray starts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from paco_ray import driver
from paco_ray.config import TrainConfig, load_config
from paco_ray.progress import EpochProgress, epoch_line
from paco_ray.schema import ConfigError
from paco_ray.session import LocalSession
from paco_ray.loop import train


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Lines:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


def test_progress_line_every_interval_with_eta_and_trial_label():
    clock, out = Clock(), Lines()
    progress = EpochProgress(30, epoch=1, epochs=5, steps=100, trial_id="a1b2", clock=clock, logger=out)
    written = []
    for step in range(1, 101):
        clock.now += 1.0  # one step per second, 128 images each
        written.append(progress.step(step, step * 128, torch.tensor(0.5), 0.01))
    assert [i + 1 for i, w in enumerate(written) if w] == [30, 60, 90]  # never on the last step
    assert out.lines[0] == "[a1b2] epoch 2/5  step 30/100  128 img/s  loss 0.5000  lr 0.01  ETA 1m10s"
    assert out.lines[2].endswith("ETA 10s")
    slow_start, out = Clock(), Lines()  # a first step that compiles for 60 s does not count
    progress = EpochProgress(10, epoch=0, epochs=1, steps=50, clock=slow_start, logger=out)
    slow_start.now = 60.0
    assert not progress.step(1, 256, torch.tensor(2.0), 0.1)  # no rate from one step
    for step in range(2, 13):
        slow_start.now += 1.0
        progress.step(step, step * 256, torch.tensor(2.0), 0.1)
    assert out.lines == ["epoch 1/1  step 2/50  256 img/s  loss 2.0000  lr 0.1  ETA 48s",  # due since the start
                         "epoch 1/1  step 12/50  256 img/s  loss 2.0000  lr 0.1  ETA 38s"]
    silent = Lines()
    quiet = EpochProgress(0, epoch=0, epochs=1, steps=10, clock=clock, logger=silent)
    clock.now += 1000
    assert not quiet.step(5, 640, torch.tensor(1.0), 0.1) and silent.lines == []


def test_lines_of_a_search_carry_the_trial_id_and_plain_runs_none():
    from paco_ray.run_folder import trial_id_of, trial_run_name

    assert trial_id_of(trial_run_name("cifar100_lt", "3f9a2_00004")) == "3f9a2_00004"  # tune.run_trial's names
    assert trial_id_of("fashion_mnist_lt-if100-max5000-val500-paco-seed0") == ""


def test_epoch_line_shows_the_shot_groups_and_top1_only_where_it_differs():
    metrics = {"epoch": 3, "train_loss": 0.41234, "val_top1": 83.16, "val_balanced_acc": 83.16, "val_many": 90.12,
               "val_medium": 80.0, "val_few": float("nan"), "epoch_time_s": 21.04, "images_per_s": 560.2,
               "skipped_steps": 0}
    line = epoch_line(metrics, 15)
    assert line == "epoch 3/15  loss 0.4123  val balanced 83.16  many 90.1  medium 80.0  (21.0 s, 560 img/s)"
    imbalanced = epoch_line({**metrics, "val_top1": 88.5, "skipped_steps": 2}, 15, "t7")
    assert imbalanced.startswith("[t7] epoch 3/15") and "top1 88.50" in imbalanced and "skipped 2" in imbalanced


def test_run_folder_holds_config_and_metrics_and_resume_rewrites_later_epochs(tiny_config, tmp_path, capsys):
    cfg = tiny_config("loss=paco", "optim.epochs=3", "progress_every_s=0")
    session = LocalSession(tmp_path / "run", tensorboard=False)
    train(cfg, session)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("paco: starting, 118 training images of 10 classes, 1 worker(s) on cpu")
    assert [line.split("  ")[0] for line in out[1:]] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert TrainConfig.from_dict(saved) == cfg  # the resolved config round-trips
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for line, report in zip(lines, session.reports):
        assert line["val_balanced_acc"] == report["val_balanced_acc"] and line["train_loss"] == report["train_loss"]
    # a run resumed from epoch 1 into the same folder keeps line 1 and writes epochs 2-3 again
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps({**m, "marker": m["epoch"]})
                                                              for m in lines) + "\n")
    resumed = LocalSession(tmp_path / "run", resume_from=session.reports[0]["checkpoint_path"], tensorboard=False)
    train(cfg, resumed)
    assert "paco: resuming at epoch 2" in capsys.readouterr().out
    again = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m.get("marker")) for m in again] == [(1, 1), (2, None), (3, None)]


def test_tensorboard_reads_what_training_writes(tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    session = LocalSession(tmp_path / "run")
    train(tiny_config("loss=ce", "progress_every_s=0"), session)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert any("balanced" in tag for tag in scalars), scalars
    tag = next(tag for tag in scalars if tag.endswith("val_balanced_acc") or tag.endswith("balanced_acc"))
    values = [e.value for e in events.Scalars(tag)]
    assert values == pytest.approx([r["val_balanced_acc"] for r in session.reports], abs=1e-4)


def run_python(code, timeout=120):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", ["train", "tune", "evaluate"])
def test_help_is_for_users_and_loads_nothing_heavy(command):
    done = run_python(f"""
import sys
sys.argv = ["paco-{command.replace('evaluate', 'eval')}", "--help"]
from paco_ray import {command}
try:
    {command}.main()
except SystemExit as exit:
    assert exit.code == 0
assert "torch" not in sys.modules and "ray" not in sys.modules, "heavy import"
""")
    assert done.returncode == 0, done.stderr[-1500:]
    assert "examples:" in done.stdout and "train_loop_per_worker" not in done.stdout
    module = subprocess.run([sys.executable, "-m", f"paco_ray.{command}", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0 and module.stdout == done.stdout
    script = Path(sys.executable).parent / f"paco-{command.replace('evaluate', 'eval')}"  # pyproject's entry point
    installed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0 and installed.stdout == done.stdout


def test_print_config_is_the_resolved_config(capsys):
    from paco_ray.train import main

    assert main(["--set", "loss=ce", "--workers", "4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert TrainConfig.from_dict(printed) == load_config(None, ["loss=ce", "workers=4"])


def test_prepare_names_its_pipelines(capsys):
    from pipelines.prepare import main as prepare

    assert prepare(["--help"]) == 0 and "fashion_mnist,cifar,txt_list" in capsys.readouterr().out
    assert prepare(["imagenet"]) == 2 and "got imagenet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        prepare(["cifar", "--help"])
    assert exit.value.code == 0 and "--imbalance-factor" in capsys.readouterr().out


def test_bad_data_and_impossible_gpu_requests_fail_before_ray_starts(tmp_path, monkeypatch, capsys):
    from paco_ray.train import main

    monkeypatch.setattr(driver, "start_ray", lambda: pytest.fail("Ray started"))
    assert main(["--set", f"data.path={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(driver, "RAY_CURRENT_CLUSTER", str(tmp_path / "no_cluster"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="use_gpu: GPU workers requested"):
        driver.check_gpu_request(True)
    driver.check_gpu_request(False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    driver.check_gpu_request(True)  # a cluster to join: its GPUs are checked once connected


def test_ray_noise_is_dropped_and_everything_else_printed():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))
    try:
        driver.filter_ray_noise()
        driver.filter_ray_noise()  # idempotent
        noise = ("[2026-11-26 14:58:11,708 E 12117 12177] core_worker.cc:2465: Actor with class name: "
                 "'PreemptionWatcher' and ID: '2c2d' has constructor arguments in the object store and max_restarts > 0.")
        dispatcher.emit({"lines": [noise, "epoch 1/2  loss 0.5"], "pid": 1})
        dispatcher.emit({"lines": [noise], "pid": 1})
        dispatcher.emit({"lines": ["WARNING: a worker died"], "pid": 2})
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert printed == [["epoch 1/2  loss 0.5"], ["WARNING: a worker died"]]


def test_tune_given_a_training_config_says_so(capsys):
    from paco_ray.tune import main

    assert main(["configs/fashion_mnist_lt.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a training config" in err and "paco-train configs/fashion_mnist_lt.yaml" in err


def test_a_space_whose_base_names_a_config_file_equals_the_file_inline(tmp_path):
    from paco_ray.search_space import load_space

    space = load_space("search_spaces/cifar100_lt.yaml")
    inline = yaml.safe_load(open("search_spaces/cifar100_lt.yaml"))
    inline["base"] = yaml.safe_load(open("configs/cifar100_lt.yaml"))
    (tmp_path / "inline.yaml").write_text(yaml.safe_dump({**inline, "name": "cifar100_lt"}))
    assert load_space(tmp_path / "inline.yaml").to_dict() == space.to_dict()
    trained, searched = load_config("configs/cifar100_lt.yaml").to_dict(), space.full_config().to_dict()
    for section in ("loss", "data", "model", "paco", "optim"):  # paco-train trains the same recipe
        assert trained[section] == searched[section], section
    over = load_space("search_spaces/cifar100_lt.yaml", ["base.optim.lr=0.07"])  # --set reaches into the file
    assert over.full_config().optim.lr == 0.07
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\nsearch: {paco: {alpha: {choice: [0.1]}}}\n")
    with pytest.raises(ConfigError, match=r"base: training config '.*/nowhere.yaml' does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_dry_run_checks_the_dataset(tmp_path, capsys):
    from paco_ray.tune import main

    assert main(["search_spaces/cifar100_lt.yaml", "--set", f"base.data.path={tmp_path / 'gone'}", "--dry-run"]) == 2
    assert "gone" in capsys.readouterr().err
