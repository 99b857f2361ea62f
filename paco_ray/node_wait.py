"""While a run's workers wait to be placed (the autoscaler adding nodes, or other work holding the
resources): one line every ``progress_every_s`` seconds, printed by Ray Train's controller (the
process that waits on the workers' placement group; Ray forwards its output to the driver), with
what the autoscaler says it is doing (autoscaler_status.py):

    waiting for the autoscaler: 4 x {GPU: 1, CPU: 8} pending (0 of 4 placed, 2m10s); the autoscaler is launching 1 gpu_large

A worker group is placed all at once, so the count stays 0 until every worker has its node. How
long one attempt waits is Ray Train's worker-group start timeout, which ``driver.run_trainer`` sets
from ``node_wait_s``. An attempt ends sooner where the autoscaler (v2) has reported the workers'
placement group infeasible for ``node_infeasible_s`` with no launch in progress: the group's
request is withdrawn, the attempt fails like a timeout, and the driver's one-line error gives the
autoscaler's words (``unplaceable_reason``)."""
from __future__ import annotations

import hashlib
import sys
import threading
import time

from ray.train.v2._internal.execution.callback import ControllerCallback

from .autoscaler_status import AutoscalerStatus, read_status
from .resources import format_resources
from .progress import duration, labelled

WAITING = ("SCHEDULING", "RESCHEDULING")  # controller states in which no worker group runs yet
DONE = ("RUNNING", "ERRORED", "FINISHED", "ABORTED", "SHUTTING_DOWN")
STATUS_EVERY_S = 2.0  # how often the autoscaler's status is read while waiting
KV_NAMESPACE = "paco_ray"


def waiting_line(workers: int, bundle: dict[str, float], seconds: float, autoscaling: bool,
                 activity: str) -> str:
    what = "the autoscaler" if autoscaling else "resources"
    return (f"waiting for {what}: {workers} x {format_resources(bundle)} pending (0 of {workers} placed, "
            f"{duration(seconds)}); {activity}")


def run_key(storage_path: str, name: str) -> bytes:
    """The key under which a run's waiting controller leaves the autoscaler's reason for the driver."""
    return b"unplaceable:" + hashlib.sha1(f"{storage_path}/{name}".encode()).hexdigest().encode()


def unplaceable_reason(key: bytes) -> str | None:
    """Why the controller ended an attempt early (the autoscaler's report), or None."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    try:
        value = _internal_kv_get(key, namespace=KV_NAMESPACE)
    except Exception:  # a courtesy for the failure line
        return None
    return value.decode() if value else None


def forget_reason(key: bytes) -> None:
    """Clear a reason an earlier run of the same name left."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized

    if _internal_kv_initialized():
        _internal_kv_del(key, namespace=KV_NAMESPACE)


def pending_groups(bundles: list[dict[str, float]], strategy: str) -> set[str]:
    """Ids of the pending placement groups of exactly these bundles and strategy."""
    from ray.util import placement_group_table

    wanted = sorted(sorted((k, float(v)) for k, v in b.items()) for b in bundles)
    found = set()
    for pg_id, info in placement_group_table().items():
        have = sorted(sorted((k, float(v)) for k, v in b.items()) for b in (info.get("bundles") or {}).values())
        if info.get("state") == "PENDING" and info.get("strategy") == strategy and have == wanted:
            found.add(pg_id)
    return found


def withdraw(pg_ids: set[str]) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in pg_ids:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


class WaitingLine(ControllerCallback):
    """A Train controller callback that prints ``waiting_line`` while the controller schedules,
    and ends an attempt the autoscaler reports it cannot place (module docstring)."""

    def __init__(self, workers: int, bundle: dict[str, float], every_s: float, autoscaling: bool, trial_id: str = "",
                 strategy: str = "PACK", infeasible_s: float = 0.0, key: bytes = b""):
        self.workers, self.bundle, self.every_s = workers, bundle, every_s
        self.autoscaling, self.trial_id = autoscaling, trial_id
        self.strategy, self.infeasible_s, self.key = strategy, infeasible_s, key
        self.since: float | None = None  # when the current wait began (None: not waiting)
        self.before: set[str] = set()  # pending groups of this shape that were there before this wait
        self.reported: str | None = None  # the autoscaler's report that ended an attempt (later ones end at once)

    def __getstate__(self):  # travels to the controller before any thread exists
        return {k: v for k, v in self.__dict__.items() if k not in ("_thread", "_stop")}

    def after_controller_start(self, train_run_context) -> None:
        if self.every_s <= 0 and self.infeasible_s <= 0:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="paco_waiting_line", daemon=True)
        self._thread.start()

    def after_controller_state_update(self, previous_state, current_state) -> None:
        name = current_state._state_type.name
        if name in WAITING and self.since is None:
            try:
                self.before = pending_groups([self.bundle] * self.workers, self.strategy) if self.infeasible_s else set()
            except Exception:
                self.before = set()
            self.since = time.monotonic()
        elif name in DONE:
            self.since = None
            if name != "RUNNING" and hasattr(self, "_stop"):
                self._stop.set()

    def _tick(self) -> None:
        printed = read_at = 0.0
        status, infeasible_since = AutoscalerStatus(), None
        while not self._stop.wait(0.5):
            since = self.since
            if since is None:
                printed, infeasible_since = 0.0, None
                continue
            now = time.monotonic()
            if now - read_at >= STATUS_EVERY_S:
                status, read_at = read_status(), now
                infeasible = status.reports_infeasible([self.bundle] * self.workers) and not status.launching
                infeasible_since = (infeasible_since or now) if infeasible else None
            if self.every_s > 0 and now - since >= self.every_s and now - max(printed, since) >= self.every_s:
                printed = now
                self._say(waiting_line(self.workers, self.bundle, now - since, self.autoscaling, status.activity()))
            if self.infeasible_s > 0 and infeasible_since is not None and (
                    self.reported or now - infeasible_since >= self.infeasible_s):
                self._end_attempt(status, now - infeasible_since)
                infeasible_since = None

    def _end_attempt(self, status: AutoscalerStatus, seconds: float) -> None:
        """Withdraw this wait's placement group, so the attempt fails now rather than at node_wait_s."""
        from ray.experimental.internal_kv import _internal_kv_put

        try:
            ours = pending_groups([self.bundle] * self.workers, self.strategy) - self.before
            if not ours:
                return
            self.reported = self.reported or (f"{status.activity()}, reported for {duration(seconds)} with no launch "
                                              "in progress")
            _internal_kv_put(self.key, self.reported.encode(), overwrite=True, namespace=KV_NAMESPACE)
            self._say(f"ending this attempt: {self.reported}")
            withdraw(ours)
        except Exception as err:  # the wait then ends at node_wait_s as usual
            self._say(f"could not end the attempt early ({type(err).__name__}); waiting node_wait_s")

    def _say(self, line: str) -> None:
        sys.stdout.write(labelled(self.trial_id, line) + "\n")
        sys.stdout.flush()
