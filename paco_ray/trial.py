"""One Tune trial of ``paco-tune``: a Tune function trainable that runs a Ray Train TorchTrainer
on the trial's config (loop.train_loop_per_worker on every worker) and reports each epoch to Tune."""
from __future__ import annotations

from typing import Any

from .driver import run_trainer
from .loop import train_loop_per_worker
from .run_folder import trial_run_name
from .search_space import parse


def run_trial(config: dict[str, Any], space: dict[str, Any], autoscaling: bool = False) -> None:
    """The trial with the sampled ``config`` of the search ``space`` (SearchSpace.to_dict()).

    The Train run is named by the trial id, so a restored trial resumes from its own checkpoint.
    ``autoscaling``: its workers may wait for the autoscaler's nodes.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    search = parse(space)
    trial_id = ray.tune.get_context().get_trial_id()
    # raises ray.train.TrainingFailedError: Tune marks the trial as errored
    run_trainer(train_loop_per_worker, search.trial_config(config), name=trial_run_name(search.name, trial_id),
                storage_path=search.storage_path, keep=search.checkpoints.keep_per_trial,
                metric=search.scheduler.metric, callbacks=[TuneReportCallback()], autoscaling=autoscaling)
