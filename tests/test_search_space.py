"""Search-space files and the Tune command's logic that runs before any trial (no Ray cluster)."""
import copy
import math
from pathlib import Path

import pytest
import yaml

from paco_ray import tune as tune_cli
from paco_ray.config import ConfigError
from paco_ray.data.augment import view_names
from paco_ray.search_space import load_space, parse, resolve_trials
from paco_ray.capacity import Capacity, present
from paco_ray.search_results import TrialSummary, prune_checkpoints, unfinished_trials
from paco_ray.tune import concurrency, scale_to_cluster

SPACES = sorted(Path(__file__).parent.parent.joinpath("search_spaces").glob("*.yaml"))
MINIMAL = {
    "base": {"optim": {"epochs": 4}},
    "search": {"paco": {"temperature": {"loguniform": [0.05, 0.3]}, "queue_size": {"choice": [37, 50]}}},
    "scheduler": {"max_t": 3},
    "num_samples": 2,
    "name": "t",
}


def test_every_shipped_space_parses_and_resolves_its_trials(capsys):
    names = {p.stem for p in SPACES}
    assert {"imagenet_lt", "places_lt", "inat2018", "cifar100_lt", "cifar10_lt", "fashion_mnist_lt"} <= names
    for path in SPACES:
        space = load_space(path)
        assert space.name == path.stem and {"paco.temperature", "paco.alpha", "paco.queue_size"} <= set(space.search)
        trials = resolve_trials(space)
        assert len(trials) == space.num_samples
        for trial in trials:  # every sampled trial is a valid training config inside the declared bounds
            cfg = space.trial_config(trial)
            low, high = space.search["paco.temperature"][1]
            assert low <= cfg.paco.temperature <= high
            assert cfg.optim.epochs == space.scheduler.max_t <= space.base_epochs
        code = tune_cli.main([str(path), "--dry-run"])
        out, err = capsys.readouterr()
        # the trials are listed; a dataset that is not prepared here then ends the dry run in one line
        data = space.full_config().data.path
        assert (code, err) == (0, "") if not data else (code == 2 and f"data.path: {data} is not a directory" in err)
        assert f"{space.num_samples} trials" in out and "paco.queue_size" in out
        query, key = view_names(space.full_config().data)
        assert (query, key) != ("crop_flip", "crop_flip") or path.stem == "fashion_mnist_lt"  # the published views
    places = load_space(SPACES[0].parent / "places_lt.yaml").full_config()
    assert places.model.backbone == "resnet152" and Path(places.model.pretrained).is_absolute()  # Tune moves cwd


def test_imagenet_dry_run_describes_gpu_trials(capsys):
    assert tune_cli.main([str(SPACES[0].parent / "imagenet_lt.yaml"), "--dry-run"]) == 2  # data not prepared here
    out = capsys.readouterr().out
    assert "4 workers x (8 CPU + 1 GPU) + 0.5 CPU trial driver = 32.5 CPU, 4 GPU" in out
    assert "ASHA on val_balanced_acc (max): max_t=90 epochs, grace_period=10, reduction_factor=3" in out
    assert "full budget  400 epochs" in out and "12 trials" in out


def test_sampling_is_seeded_and_grids_multiply():
    space = parse(copy.deepcopy(MINIMAL))
    assert resolve_trials(space) == resolve_trials(parse(copy.deepcopy(MINIMAL)))
    other = parse({**copy.deepcopy(MINIMAL), "search_seed": 1})
    assert resolve_trials(other) != resolve_trials(space)
    raw = copy.deepcopy(MINIMAL)
    raw["search"]["optim"] = {"lr": {"grid": [0.1, 0.01, 0.001]}}
    trials = resolve_trials(parse(raw))
    assert len(trials) == 2 * 3 and [t["optim"]["lr"] for t in trials[:3]] == [0.1, 0.01, 0.001]


def test_nested_and_dotted_keys_are_the_same_space():
    dotted = copy.deepcopy(MINIMAL)
    dotted["search"] = {"paco.temperature": {"loguniform": [0.05, 0.3]}, "paco.queue_size": {"choice": [37, 50]}}
    assert parse(dotted).search == parse(copy.deepcopy(MINIMAL)).search


def test_scientific_notation_reads_as_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("search:\n  optim:\n    lr: {loguniform: [1e-4, 1e-1]}\nbase:\n  optim: {weight_decay: 5e-4}\n")
    space = load_space(path)
    assert space.search["optim.lr"] == ("loguniform", [1e-4, 1e-1])
    assert space.full_config().optim.weight_decay == 5e-4


def _with(path: str, value):
    raw = copy.deepcopy(MINIMAL)
    node = raw
    *parents, last = path.split("/")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


BAD = [
    (_with("serach", {}), "unknown key serach (did you mean search?)"),
    (_with("search/paco/temprature", {"uniform": [0.1, 0.2]}), "unknown key search.paco.temprature (did you mean search.paco.temperature?)"),
    (_with("search/paco/temperature", {"normal": [0.1, 0.2]}), "search.paco.temperature: expected one sampling primitive"),
    (_with("search/paco/temperature", {"uniform": [0.1]}), "search.paco.temperature: uniform takes a list of 2 numbers"),
    (_with("search/paco/temperature", {"uniform": [0.3, 0.1]}), "search.paco.temperature: uniform needs low < high"),
    (_with("search/paco/temperature", {"loguniform": [0, 0.3]}), "search.paco.temperature: loguniform needs low > 0"),
    (_with("search/paco/temperature", {"uniform": ["a", 0.3]}), "search.paco.temperature: uniform takes numbers"),
    (_with("search/paco/temperature", 0.1), "search.paco.temperature: expected a sampling primitive"),
    (_with("search/paco/temperature", {"choice": []}), "search.paco.temperature: choice takes a non-empty list"),
    (_with("search/paco/queue_size", {"uniform": [100, 200]}), "search.paco.queue_size: uniform samples floats but paco.queue_size is int"),
    (_with("search/paco/queue_size", {"choice": [1024, 0]}), "search.paco.queue_size: choice value 0 is invalid (paco.queue_size: must be >= 1"),
    (_with("search/paco/alpha", {"uniform": [-0.1, 0.1]}), "search.paco.alpha: uniform value -0.1 is invalid (paco.alpha: must be >= 0"),
    (_with("search/loss", {"uniform": [0, 1]}), "search.loss: uniform samples floats but loss is str"),
    (_with("search/loss", {"choice": ["paco", "focal"]}), "search.loss: choice value 'focal' is invalid"),
    (_with("search/paco", {"choice": [1, 2]}), "search.paco: is a section"),
    (_with("search/workers", {"choice": [1, 2]}), "search.workers: not searchable (set it in resources.workers)"),
    (_with("search/optim/epochs", {"choice": [1, 2]}), "search.optim.epochs: trial length is scheduler.max_t"),
    (_with("search", {}), "search: expected a mapping of config keys"),
    (_with("base/workers", 2), "base.workers: set it as resources.workers in a search space"),
    (_with("base/paco/tau", 2), "base: unknown key paco.tau"),
    (_with("scheduler/metric", "test_top1"), "scheduler.metric: must be one of val_balanced_acc"),
    (_with("scheduler/mode", "min"), "scheduler.mode: val_balanced_acc is an accuracy and is maximised"),
    (_with("scheduler/max_t", 5), "scheduler.max_t: must be in [1, base.optim.epochs=4]"),
    (_with("scheduler/grace_period", 4), "scheduler.grace_period: must be in [1, scheduler.max_t=3]"),
    (_with("scheduler/reduction_factor", 1), "scheduler.reduction_factor: must be > 1"),
    (_with("scheduler/patience", 1), "unknown key scheduler.patience"),
    (_with("num_samples", 0), "num_samples: must be >= 1"),
    (_with("num_samples", "many"), "num_samples: expected int"),
    (_with("max_concurrent_trials", -1), "max_concurrent_trials: must be >= 0"),
    (_with("resources/workers", 0), "resources.workers: must be >= 1"),
    (_with("resources/gpus", 1), "unknown key resources.gpus"),
    (_with("resources/trial_driver_cpus", 0), "resources.trial_driver_cpus: must be > 0"),
    (_with("resources/workers", 3), "data.batch_size: must be divisible by workers=3, got 128 (with resources.workers=3)"),
    (_with("checkpoints/keep_trials", 0), "checkpoints.keep_trials: must be >= 1"),
    (_with("name", "a/b"), "name: must be a non-empty name without '/'"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_spaces_fail_with_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert tune_cli.main([str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [\n")
    assert tune_cli.main([str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    assert tune_cli.main([str(good), "--set", "num_samples=0", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: num_samples: must be >= 1, got 0"


def test_existing_experiment_is_never_overwritten_and_resume_needs_one(tmp_path, capsys):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({**MINIMAL, "storage_path": str(tmp_path / "runs")}))
    assert tune_cli.main([str(space_file), "--resume"]) == 2
    assert "--resume: no experiment at" in capsys.readouterr().err
    existing = tmp_path / "runs" / "t"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("results")
    assert tune_cli.main([str(space_file)]) == 2
    assert "experiment" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "results"
    # resuming with changed settings is refused: the experiment's own snapshot wins
    (existing / "search_space.yaml").write_text(yaml.safe_dump(load_space(space_file).to_dict()))
    assert tune_cli.main([str(space_file), "--resume", "--set", "scheduler.grace_period=2"]) == 2
    assert "--resume: scheduler.grace_period differs" in capsys.readouterr().err


def one_node(**resources) -> Capacity:
    """A cluster of one head node with these resources."""
    return present([{"NodeID": "h" * 56, "NodeManagerAddress": "10.0.0.1",
                     "Resources": {**resources, "node:__internal_head__": 1.0}}])


def test_one_trial_must_fit_the_cluster():
    space = load_space(SPACES[0].parent / "imagenet_lt.yaml")
    with pytest.raises(ConfigError, match=r"resources: one trial can never be placed: workers: 4 workers x "
                                          r"\{GPU: 1, CPU: 8\} exceed what the cluster can hold \(1\)"):
        concurrency(space, one_node(CPU=64, GPU=1))
    with pytest.raises(ConfigError, match=r"4 workers x \{GPU: 1, CPU: 8\} exceed what the cluster can hold \(2\)"):
        concurrency(space, one_node(CPU=16, GPU=8))
    assert concurrency(space, one_node(CPU=200, GPU=16)) == 4
    auto = parse({**copy.deepcopy(MINIMAL), "resources": {"workers": 1, "cpus_per_worker": 0.5}})
    assert concurrency(auto, one_node(CPU=2)) == 3  # 0.6 CPU per trial


def test_then_train_scales_workers_batch_and_lr_to_the_cluster():
    space = load_space(SPACES[0].parent / "fashion_mnist_lt.yaml")
    cfg = scale_to_cluster(space.full_config(), one_node(CPU=4))
    assert (cfg.workers, cfg.data.batch_size, cfg.optim.epochs) == (4, 512, 15)  # 0.9 CPU per worker
    assert cfg.optim.lr == pytest.approx(0.4)
    gpu = load_space(SPACES[0].parent / "imagenet_lt.yaml").full_config()
    cfg = scale_to_cluster(gpu, one_node(CPU=64, GPU=16))
    assert (cfg.workers, cfg.data.batch_size, cfg.cpus_per_worker) == (16, 512, 4)
    assert cfg.optim.lr == pytest.approx(0.02 * 4)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pruning_keeps_the_best_checkpoints_of_the_best_trials(where, tmp_path, request):
    from paco_ray.storage import filesystem, subdirectories

    storage = str(tmp_path) if where == "local" else request.getfixturevalue("s3").uri("prune")
    fs, root = filesystem(storage)
    space = parse({**copy.deepcopy(MINIMAL), "storage_path": storage,
                   "checkpoints": {"keep_per_trial": 1, "keep_trials": 2}})
    rows = []
    for trial, scores in {"a": [30, 50], "b": [60, 40], "c": [20, 10], "d": [], "e": [5]}.items():
        run = f"{root}/t/train/{trial}"
        checkpoints = []
        for name, score in [(f"checkpoint_{epoch}", score) for epoch, score in enumerate(scores)] + \
                [("checkpoint_unreported", None)]:  # the last one written after the trial was stopped
            fs.create_dir(f"{run}/{name}")
            with fs.open_output_stream(f"{run}/{name}/state.pt") as stream:  # object stores have no empty folders
                stream.write(b"x")
            if score is not None:
                checkpoints.append((score, f"{run}/{name}"))
        status = "error" if trial == "e" else "completed"  # an errored trial keeps its checkpoints
        rows.append(TrialSummary(trial, {}, len(scores), max(scores, default=math.nan), status,
                                 sorted(checkpoints, key=lambda c: -c[0])))
    rows.sort(key=lambda t: -t.best if math.isfinite(t.best) else math.inf)
    assert prune_checkpoints(rows, space) == (2, 8)
    left = sorted(c.split("/t/train/", 1)[1] for run in subdirectories(fs, f"{root}/t/train")
                  for c in subdirectories(fs, run))
    assert left == ["a/checkpoint_1", "b/checkpoint_0", "e/checkpoint_0", "e/checkpoint_unreported"]


def test_an_interrupted_search_counts_its_never_started_trials_as_unfinished():

    space = parse({**copy.deepcopy(MINIMAL), "num_samples": 6})
    saved = ["TERMINATED", "TERMINATED", "ERROR", "RUNNING"]  # 1 running, 2 never began
    assert unfinished_trials(saved, space) == 3
    assert unfinished_trials(["TERMINATED"] * 5 + ["ERROR"], space) == 0
