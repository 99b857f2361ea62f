"""The .beton writer under its watchdog (pipelines/watchdog.py): the file is FFCV's own, and a
writer worker that raises or dies ends the pipeline at once with one line, leaving no temporary
directory, no process and no shared memory behind. FFCV's own writer waits for ever in these
cases, so they run in a subprocess under a timeout."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # generous: the script takes seconds, a hang would take for ever
CASES = {  # how the worker fails -> what the one line says after "error: writing train.beton: "
    "raise": r"writer worker [12] failed on /data/img50\.png: OSError: disk vanished",
    "kill": r"writer worker [12] \(pid \d+\) was killed by SIGKILL \(out of memory\?\) on /data/img50\.png",
    # --max-resolution 0 past the CLI's check: OpenCV's resize fails inside every worker
    "resize": r"writer worker [12] failed on /data/img(0|100|200)\.png: error: OpenCV.*in function 'resize'",
}

# Each case writes 250 samples in chunks of 100 with 2 workers into <dir>/<case>. Sample 50 is in
# the first chunk: when its worker dies holding the first page of the file, the other worker spins
# waiting for that page to be written. After each case the script prints its exit code and how
# many worker processes are left; at its exit the resource tracker would warn on stderr about
# shared memory left allocated.
SCRIPT = textwrap.dedent("""
    import json, multiprocessing, os, signal, sys
    from pathlib import Path
    import numpy as np
    from pipelines.writer import Sample, run_cli, write_prepared

    parent = os.getpid()

    def load(i, how):
        if i == 50 and os.getpid() != parent:  # only in a writer worker: the parent's checks pass
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "raise":
                raise OSError("disk vanished")
        return np.full((8, 8, 3), i % 256, np.uint8)

    for how in sys.argv[2:]:
        samples = [Sample(f"/data/img{i}.png", i % 2, lambda i=i, how=how: load(i, how)) for i in range(250)]
        code = run_cli(lambda _: write_prepared(
            Path(sys.argv[1]) / how, fingerprint={"pipeline": "test"}, class_names=["a", "b"], thresholds=(100, 20),
            splits={"train": samples, "val": samples[:10]}, write_mode="jpg",
            max_resolution=0 if how == "resize" else None, num_workers=2), None)
        sys.stderr.flush()
        print(json.dumps({"case": how, "code": code, "workers": len(multiprocessing.active_children())}), flush=True)
""")


def live_processes_in_group(group: int) -> list[str]:
    """Processes of the process group ``group`` that are not zombies, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 1:].split()
        if int(fields[2]) == group and fields[0] not in "ZX":
            found.append(f"{stat.parent.name} {name} {fields[0]}")
    return found


def run_cases(directory: Path, cases) -> tuple[str, str, int]:
    """The script in a session of its own, under TIMEOUT_S; (stdout, stderr, its session id)."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(directory), *cases], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)  # also waits for anything holding its pipes
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the writes did not end within {TIMEOUT_S} s; stdout: {out[-2000:]} stderr: {err[-2000:]}")
    assert proc.returncode == 0, err
    return out, err, proc.pid


def test_a_writer_worker_that_raises_or_dies_ends_the_pipeline_in_one_line(tmp_path):
    out, err, group = run_cases(tmp_path, CASES)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # no worker left running; bad data is exit 2, a worker killed by a signal (the machine) exit 1
    assert results == [{"case": case, "code": 1 if case == "kill" else 2, "workers": 0} for case in CASES]
    # one line per case: no worker traceback, no resource-tracker warning about leaked shared memory
    lines = err.splitlines()
    assert len(lines) == len(CASES), err
    for line, (case, message) in zip(lines, CASES.items()):
        assert line.startswith("error: writing train.beton: "), line
        assert re.fullmatch(message, line[len("error: writing train.beton: "):]), (case, line)
    assert list(tmp_path.iterdir()) == []  # no output and no temporary directory
    deadline = time.monotonic() + 5
    while (left := live_processes_in_group(group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def test_the_guarded_write_is_ffcv_s_own_file(tmp_path, capsys):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from pipelines.watchdog import write_guarded

    rng = np.random.default_rng(0)
    dataset = [(rng.integers(0, 256, (int(rng.integers(6, 20)), 14, 3), dtype=np.uint8), i % 7, i) for i in range(230)]

    def fields():
        return {"image": RGBImageField(write_mode="jpg", max_resolution=12), "label": IntField(), "index": IntField()}

    DatasetWriter(str(tmp_path / "ffcv.beton"), fields(), num_workers=1).from_indexed_dataset(dataset)
    children = set(multiprocessing.active_children())
    write_guarded(str(tmp_path / "guarded.beton"), fields(), dataset, num_workers=1, label="guarded.beton")
    assert (tmp_path / "guarded.beton").read_bytes() == (tmp_path / "ffcv.beton").read_bytes()
    assert capsys.readouterr().out.startswith("guarded.beton: 230 images written (")
    assert set(multiprocessing.active_children()) <= children  # its workers are reaped


def test_several_workers_write_every_sample_once(tmp_path):
    """Three workers share 5 chunks; each row holds its sample's pixels, label and index."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    from pipelines.watchdog import write_guarded

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (450, 9, 7, 3), dtype=np.uint8)
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    write_guarded(str(tmp_path / "x.beton"), fields, [(images[i], i % 5, i) for i in range(450)], num_workers=3,
                  label="x.beton")
    reader = Reader(str(tmp_path / "x.beton"))
    data = np.fromfile(tmp_path / "x.beton", dtype=np.uint8)
    image, label, index = (reader.metadata[f"f{k}"] for k in range(3))
    assert index.tolist() == list(range(450)) and label.tolist() == [i % 5 for i in range(450)]
    assert (image["height"] == 9).all() and (image["width"] == 7).all()
    pixels = np.stack([data[p:p + 9 * 7 * 3] for p in image["data_ptr"]]).reshape(images.shape)
    assert np.array_equal(pixels, images)
