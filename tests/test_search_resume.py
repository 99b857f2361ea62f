"""What a search selects, keeps, counts and resumes, without a Ray cluster: grids counted as the
trials they generate, errored trials never selected, ASHA's rungs restored on --resume, seeded TPE
repeating itself, a resume on another cluster, TensorBoard HParams, accurate rung comments."""
import copy
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from paco_ray import tune as tune_cli
from paco_ray.checkpoint import CheckpointError
from paco_ray.search_algorithms import ResumableASHA, reported_results, searcher
from paco_ray.search_results import TrialSummary, best_trial, prune_checkpoints, selectable, unfinished_trials
from paco_ray.search_space import load_space, param_space, parse

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {
    "base": {"optim": {"epochs": 4}},
    "search": {"paco": {"temperature": {"loguniform": [0.05, 0.3]}, "queue_size": {"choice": [37, 50]}}},
    "scheduler": {"max_t": 3},
    "name": "t",
}


def space(tmp_path=None, **changes):
    raw = {**copy.deepcopy(MINIMAL), **changes}
    if tmp_path is not None:
        raw["storage_path"] = str(tmp_path)
    return parse(raw)


def test_an_interrupted_grid_search_counts_the_trials_its_grid_generates():
    grid = space(search={"optim": {"lr": {"grid": [0.01, 0.02, 0.03]}}}, num_samples=1)
    assert grid.trial_count() == 3
    # one trial done and two running at Ctrl-C: two unfinished (num_samples alone would say 0)
    assert unfinished_trials(["TERMINATED", "RUNNING", "RUNNING"], grid) == 2
    assert unfinished_trials(["TERMINATED", "ERROR", "TERMINATED"], grid) == 0
    mixed = space(search={"optim": {"lr": {"grid": [0.01, 0.02]}}, "paco": {"alpha": {"uniform": [0.0, 0.1]}}},
                  num_samples=3)
    assert mixed.trial_count() == 6


def rows_of(*trials) -> list[TrialSummary]:
    return [TrialSummary(tid, {}, epochs, best, status, [(best, f"/x/{tid}/checkpoint_1")], best_epoch=at)
            for tid, best, status, epochs, at in trials]


def test_an_errored_trial_is_never_selected_and_ties_go_to_fewer_epochs(tmp_path):
    s = space(tmp_path)
    rows = rows_of(("a", 90.0, "error", 3, 3), ("b", 80.0, "completed", 3, 3))
    best, _ = best_trial(rows, s)
    assert best.trial_id == "b"
    # a tie on the metric: the trial that reached it in fewer epochs, then the one generated first
    tied = rows_of(("c", 80.0, "completed", 3, 3), ("d", 80.0, "stopped early", 2, 2), ("e", 80.0, "completed", 3, 2))
    assert [t.trial_id for t in selectable(tied)] == ["d", "e", "c"]
    with pytest.raises(CheckpointError, match=r"no trial without an error reported val_balanced_acc \(1 errored\)"):
        best_trial(rows_of(("a", 90.0, "error", 3, 3)), s)


def test_pruning_does_not_count_errored_trials_toward_the_kept_ones(tmp_path):
    s = space(tmp_path, checkpoints={"keep_per_trial": 1, "keep_trials": 1})
    rows = rows_of(("a", 90.0, "error", 3, 3), ("b", 80.0, "completed", 3, 3), ("c", 70.0, "completed", 3, 3))
    for t in rows:
        folder = tmp_path / "t" / "train" / t.trial_id / "checkpoint_1"
        folder.mkdir(parents=True)
        (folder / "state.pt").write_text("x")
        t.checkpoints = [(t.best, str(folder))]
    assert prune_checkpoints(rows, s) == (1, 1)
    left = sorted(p.parent.name for p in (tmp_path / "t" / "train").glob("*/checkpoint_1"))
    assert left == ["a", "b"]  # the best trial without an error, and the errored one (for --retry-errored)


def write_results(experiment: Path, rows: dict[str, list[tuple[int, float]]]) -> None:
    for trial_id, scores in rows.items():
        folder = experiment / f"run_trial_{trial_id}_0"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").write_text("".join(
            json.dumps({"trial_id": trial_id, "epoch": e, "val_balanced_acc": v}) + "\n" for e, v in scores))


def resumed_trial_decision(scheduler, experiment: Path) -> str:
    """A search resumed after the driver died: trial a (had passed rung 3 with 60) resumes at
    epoch 5; a new trial d has meanwhile reported a strong epoch 3."""
    write_results(experiment, {"a": [(1, 50), (2, 55), (3, 60), (4, 62)], "c": [(e, 70 + e) for e in range(1, 10)]})
    scheduler.set_search_properties("val_balanced_acc", "max")
    a, d = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="d")
    scheduler.on_trial_add(None, a)
    scheduler.on_trial_add(None, d)
    for epoch, score in [(1, 80.0), (2, 90.0), (3, 95.0)]:
        scheduler.on_trial_result(None, d, {"epoch": epoch, "val_balanced_acc": score})
    return scheduler.on_trial_result(None, a, {"epoch": 5, "val_balanced_acc": 63.0})


def test_a_resumed_trial_above_its_rung_is_not_stopped_there(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    options = dict(time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
    # Tune's own ASHA starts empty on restore: trial a is judged at rung 3 against d's epoch-3 score
    assert resumed_trial_decision(ASHAScheduler(**options), tmp_path / "plain") == TrialScheduler.STOP
    resumable = ResumableASHA(str(tmp_path / "kept"), **options)
    assert resumed_trial_decision(resumable, tmp_path / "kept") == TrialScheduler.CONTINUE
    # the records are those ASHA made: each trial's metric at the first result at or past each rung
    rungs = {milestone: recorded for milestone, recorded in resumable._brackets[0]._rungs}
    assert rungs[1]["a"] == 50 and rungs[3]["a"] == 60 and rungs[3]["c"] == 73 and rungs[3]["d"] == 95.0
    assert reported_results(str(tmp_path / "kept"))["a"][-1]["epoch"] == 4


def test_a_seeded_tpe_search_repeats_its_configs():
    s = space(search_alg="optuna", num_samples=14)

    def run(seed: int) -> list[dict]:
        tpe = searcher("optuna", seed, max_concurrent=1, tpe_startup_trials=4)
        tpe.set_search_properties("val_balanced_acc", "max", param_space(s))
        suggested = []
        for i in range(14):  # past TPE's 4 random start-up trials: later ones follow the results
            config = tpe.suggest(f"t{i}")
            suggested.append(config)
            score = -abs(math.log(config["paco"]["temperature"] / 0.1)) + (config["paco"]["queue_size"] == 50)
            tpe.on_trial_complete(f"t{i}", {"val_balanced_acc": score})
        return suggested

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert len({json.dumps(c, sort_keys=True) for c in first}) == 14


def test_tpe_refuses_grids_and_unknown_searchers():
    from paco_ray.schema import ConfigError

    with pytest.raises(ConfigError, match=r"search.optim.lr: grid is not a distribution TPE samples"):
        space(search_alg="optuna", search={"optim": {"lr": {"grid": [0.1, 0.2]}}})
    with pytest.raises(ConfigError, match=r"search_alg: must be one of random, optuna, got 'hyperopt'"):
        space(search_alg="hyperopt")


def test_resume_may_change_concurrency_and_resources_but_not_the_search(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "storage_path": str(tmp_path / "runs"), "max_concurrent_trials": 4}))
    experiment = tmp_path / "runs" / "t"
    experiment.mkdir(parents=True)
    (experiment / "search_space.yaml").write_text(yaml.safe_dump(load_space(path).to_dict()))
    smaller = load_space(path, ["max_concurrent_trials=1", "resources.cpus_per_worker=0.5"])
    assert tune_cli.open_experiment(smaller, resume=True)[1] == str(experiment)
    err = capsys.readouterr().err
    assert "resuming with max_concurrent_trials 1 (the experiment started with 4)" in err
    assert "resuming with resources" in err and "'cpus_per_worker': 0.5" in err
    with pytest.raises(Exception, match="--resume: search.paco.temperature.loguniform differs"):
        tune_cli.open_experiment(load_space(path, ["search.paco.temperature={uniform: [0.1, 0.2]}"]), resume=True)


def test_trials_hparams_are_readable_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    s = space(tmp_path)
    rows = rows_of(("a", 81.5, "completed", 3, 2), ("b", 40.0, "stopped early", 1, 1))
    rows[0].config, rows[1].config = {"paco.temperature": 0.12, "paco.queue_size": 50}, \
        {"paco.temperature": 0.3, "paco.queue_size": 37}
    tune_cli.write_hparams(s, rows)
    seen = {}
    for trial in ("a", "b"):
        events = EventAccumulator(str(tmp_path / "t" / "hparams" / trial))
        events.Reload()
        for content in events.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                seen[trial] = {k: v.number_value for k, v in data.session_start_info.hparams.items()}
        assert events.Scalars("val_balanced_acc")[0].value == pytest.approx(rows[0 if trial == "a" else 1].best)
    assert seen == {"a": {"paco.temperature": 0.12, "paco.queue_size": 50.0},
                    "b": {"paco.temperature": 0.3, "paco.queue_size": 37.0}}


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_rung_comments_of_the_shipped_spaces_are_the_rungs_asha_uses(path):
    s = load_space(path)
    comment = re.search(r"ASHA stops weak trials at epochs? ([\d, and]+)", path.read_text())
    assert comment, f"{path.name}: no rung comment"
    said = [int(n) for n in re.findall(r"\d+", comment[1])]
    asha = ResumableASHA("/nonexistent", time_attr="epoch", max_t=s.scheduler.max_t,
                         grace_period=s.scheduler.grace_period, reduction_factor=s.scheduler.reduction_factor)
    assert said == asha.rungs()
