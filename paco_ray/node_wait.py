"""While a run's workers wait to be placed (the autoscaler adding nodes, or other work holding the
resources): one line every ``progress_every_s`` seconds, printed by Ray Train's controller (the
process that waits on the workers' placement group; Ray forwards its output to the driver):

    waiting for the autoscaler: 4 x {GPU: 1, CPU: 8} pending (0 of 4 placed, 2m10s); the autoscaler is launching 1 gpu_large

A worker group is placed all at once, so the count stays 0 until every worker has its node. How
long one attempt waits is Ray Train's worker-group start timeout, which ``driver.run_trainer`` sets
from ``node_wait_s``."""
from __future__ import annotations

import sys
import threading
import time

from ray.train.v2._internal.execution.callback import ControllerCallback

from .capacity import autoscaler_activity, autoscaler_report, format_resources
from .progress import duration, labelled

WAITING = ("SCHEDULING", "RESCHEDULING")  # controller states in which no worker group runs yet
DONE = ("RUNNING", "ERRORED", "FINISHED", "ABORTED", "SHUTTING_DOWN")


def waiting_line(workers: int, bundle: dict[str, float], seconds: float, autoscaling: bool,
                 activity: str) -> str:
    what = "the autoscaler" if autoscaling else "resources"
    return (f"waiting for {what}: {workers} x {format_resources(bundle)} pending (0 of {workers} placed, "
            f"{duration(seconds)}); {activity}")


class WaitingLine(ControllerCallback):
    """A Train controller callback that prints ``waiting_line`` while the controller schedules."""

    def __init__(self, workers: int, bundle: dict[str, float], every_s: float, autoscaling: bool, trial_id: str = ""):
        self.workers, self.bundle, self.every_s = workers, bundle, every_s
        self.autoscaling, self.trial_id = autoscaling, trial_id
        self.since: float | None = None  # when the current wait began (None: not waiting)

    def __getstate__(self):  # travels to the controller before any thread exists
        return {k: v for k, v in self.__dict__.items() if k not in ("_thread", "_stop")}

    def after_controller_start(self, train_run_context) -> None:
        if self.every_s <= 0:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="paco_waiting_line", daemon=True)
        self._thread.start()

    def after_controller_state_update(self, previous_state, current_state) -> None:
        name = current_state._state_type.name
        if name in WAITING and self.since is None:
            self.since = time.monotonic()
        elif name in DONE:
            self.since = None
            if name != "RUNNING" and hasattr(self, "_stop"):
                self._stop.set()

    def _tick(self) -> None:
        printed = 0.0
        while not self._stop.wait(0.5):
            since = self.since
            if since is None:
                printed = 0.0
                continue
            now = time.monotonic()
            if now - since >= self.every_s and now - max(printed, since) >= self.every_s:
                printed = now
                line = waiting_line(self.workers, self.bundle, now - since, self.autoscaling,
                                    autoscaler_activity(autoscaler_report()))
                sys.stdout.write(labelled(self.trial_id, line) + "\n")
                sys.stdout.flush()
