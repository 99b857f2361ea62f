"""The worker-loss drill (PACO_RAY_KILL_WORKER): parsed strictly, fires once, in the planned worker
only. Its use against a real Ray run is in test_ray_train.py."""
import re
import subprocess
import sys

import pytest

from paco_ray import train as train_cli
from paco_ray.config import ConfigError
from paco_ray.faults import KILL_WORKER_ENV, KillPlan


def test_plan_round_trips_through_the_worker_environment(tmp_path):
    plan = KillPlan.from_env({KILL_WORKER_ENV: f"1:17:{tmp_path / 'marker'}"})
    assert (plan.rank, plan.step, plan.marker) == (1, 17, tmp_path / "marker")
    assert KillPlan.from_env(plan.env()) == plan
    assert KillPlan.from_env({}) is None and KillPlan.from_env({KILL_WORKER_ENV: ""}) is None
    frozen = KillPlan.from_env({KILL_WORKER_ENV: f"0:5:{tmp_path / 'marker'}:hold"})
    assert (frozen.action, frozen.marker, plan.action) == ("hold", tmp_path / "marker", "kill")
    assert KillPlan.from_env(frozen.env()) == frozen


@pytest.mark.parametrize("value", ["1", "1:17", "a:17:/tmp/m", "1:0:/tmp/m", "1:-3:/tmp/m", "1:17:"])
def test_malformed_plans_are_refused(value):
    with pytest.raises(ConfigError, match=re.escape(f"{KILL_WORKER_ENV}: expected RANK:STEP:MARKER[:hold] with STEP >= 1")):
        KillPlan.from_env({KILL_WORKER_ENV: value})


def test_the_train_cli_refuses_a_malformed_drill_before_starting_ray(monkeypatch, capsys):
    import ray

    monkeypatch.setenv(KILL_WORKER_ENV, "one:two:three")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    assert train_cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {KILL_WORKER_ENV}: expected RANK:STEP:MARKER[:hold] with STEP >= 1, got 'one:two:three'"


DRILL = """
import sys
from paco_ray.faults import KillPlan
plan = KillPlan.from_env({"PACO_RAY_KILL_WORKER": sys.argv[1]})
for step in range(1, 6):
    for rank in (0, 1):
        plan.maybe_kill(rank, step)
print("trained on")
"""


def test_the_planned_worker_is_killed_at_its_step_once(tmp_path):
    def attempt(plan):
        return subprocess.run([sys.executable, "-c", DRILL, plan], capture_output=True, text=True)

    marker = tmp_path / "killed"
    assert attempt(f"0:9:{marker}").stdout == "trained on\n" and not marker.exists()  # step never reached
    first = attempt(f"1:3:{marker}")
    assert first.returncode == -9 and first.stdout == "" and marker.exists()  # SIGKILL, no clean exit
    again = attempt(f"1:3:{marker}")
    assert again.returncode == 0 and again.stdout == "trained on\n"  # the restarted attempt trains on


def test_a_hold_plan_keeps_the_worker_at_its_step(tmp_path):
    """The worker trains no further (no later step, no clean exit) until its node is killed."""
    import signal
    import time

    marker = tmp_path / "held"
    process = subprocess.Popen([sys.executable, "-c", DRILL, f"1:3:{marker}:hold"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert process.poll() is None and time.time() < deadline, "the worker did not reach its step"
            time.sleep(0.05)
        time.sleep(1)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
    assert process.wait() == -9 and process.stdout.read() == ""
