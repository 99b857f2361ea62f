"""Checkpoint files: atomic writes that survive a killed writer or a full disk."""
import pytest
import torch

from paco_ray.checkpoint import load_state, save_state

WRITER = """
import sys, torch
from paco_ray.checkpoint import save_state
for i in range(1, 10_000):
    save_state(sys.argv[1], {"config": {}, "classes": {}, "epoch": i, "model": {"w": torch.full((4_000_000,), float(i))}})
"""


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_whole(delay, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "state.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # somewhere inside a later 16 MB write
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    state = load_state(tmp_path)  # whole: every value of the tensor is the same epoch's
    assert state["epoch"] >= 1 and torch.equal(state["model"]["w"], torch.full((4_000_000,), float(state["epoch"])))
    # at most the killed writer's temp file beside it, which no reader opens
    assert all(p.name == "state.pt" or p.name.startswith(".state.pt.tmp-") for p in tmp_path.iterdir())
    save_state(tmp_path, {**state, "epoch": state["epoch"] + 1})  # the next save clears the killed one's temp file
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_failed_save_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    save_state(tmp_path, {"config": {}, "classes": {}, "epoch": 1, "model": {}})
    before = (tmp_path / "state.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_state(tmp_path, {"config": {}, "classes": {}, "epoch": 2, "model": {}})
    assert (tmp_path / "state.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
