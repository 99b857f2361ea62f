"""Fault injection for reliability drills: a training worker that dies like a lost machine.

``PACO_RAY_KILL_WORKER=RANK:STEP:MARKER`` in the environment of ``python -m paco_ray.train`` makes
the worker of rank RANK send itself SIGKILL just before global training step STEP (1-based,
counted from the first step of the run), once: the kill first creates the file MARKER, and a
worker that finds MARKER already there trains on. ``fit`` passes the variable to the workers.
With ``max_failures >= 1`` the run restarts from its last checkpoint and completes.
``RANK:STEP:MARKER:hold`` makes that worker stop training there instead and wait for ever (its
process still answers Ray, so the epochs before are reported), so that a drill can take its node
away at a known step however fast the machine.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .config import ConfigError

KILL_WORKER_ENV = "PACO_RAY_KILL_WORKER"


@dataclass(frozen=True)
class KillPlan:
    rank: int
    step: int
    marker: Path
    action: str = "kill"  # or "hold"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "KillPlan | None":
        text = environ.get(KILL_WORKER_ENV, "")
        if not text:
            return None
        rank, step, marker = (text.split(":", 2) + ["", ""])[:3]
        marker, _, action = marker.partition(":") if marker.endswith((":hold", ":kill")) else (marker, "", "kill")
        if not (rank.isdigit() and step.isdigit() and int(step) >= 1 and marker):
            raise ConfigError(f"{KILL_WORKER_ENV}: expected RANK:STEP:MARKER[:hold] with STEP >= 1, got {text!r}")
        return cls(int(rank), int(step), Path(marker).expanduser().resolve(), action)

    def env(self) -> dict[str, str]:
        """The variable that recreates this plan in a worker process."""
        return {KILL_WORKER_ENV: f"{self.rank}:{self.step}:{self.marker}:{self.action}"}

    def maybe_kill(self, rank: int, global_step: int) -> None:
        """SIGKILL this process (or hold it for ever) if it is the planned rank and step and no earlier
        attempt did."""
        if rank != self.rank or global_step != self.step:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        if self.action == "hold":
            while True:
                time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)
