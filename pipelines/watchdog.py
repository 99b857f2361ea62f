"""FFCV's DatasetWriter under a watchdog: a writer worker that raises or dies ends the write at
once, in one line, with no worker process and no shared memory left behind.

FFCV 1.0.2 (``DatasetWriter._write_common``) starts its worker processes, then polls a shared
counter until every sample is counted. A worker that raises (an encoder error: its traceback
goes to stderr) or is killed (out of memory) never counts its samples, so that wait never ends,
and the other workers may spin for ever waiting for its page of the file to be written.
``write_guarded`` keeps FFCV's file layout, its worker job and its ``prepare``/``finalize``, and
replaces the wait: each worker sends its exception to the parent as one line and exits 1; the
parent polls every worker's exit code and the error queue, and on the first failure kills the
workers, frees the shared memory and raises ``WriterFailed``. Work is handed out from a list the
forked workers inherit, so nothing is left queued in a pipe when they are gone.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import queue
import signal
import sys
from typing import Callable, Mapping

from ffcv.memory_allocator import MemoryAllocator

from .beton_progress import BetonProgress

POLL_S = 0.1  # how often the parent looks at the workers and the progress counter


class WriterFailed(Exception):
    """A writer worker raised or died; the message is one line naming the worker and its sample."""


class WriterKilled(WriterFailed):
    """A writer worker was killed by a signal (out of memory, an operator): not the data's fault."""


def write_guarded(fname: str, fields: Mapping, dataset, *, num_workers: int, label: str,
                  describe: Callable[[int], str] = lambda i: f"sample {i}", chunksize: int = 100) -> None:
    """``DatasetWriter(fname, fields, num_workers=...).from_indexed_dataset(dataset)``, watched.
    ``label`` names the file in progress output, ``describe(i)`` sample i in errors. On failure
    the partial file stays for the caller to remove."""
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset

    writer = DatasetWriter(fname, fields, num_workers=num_workers)
    writer.num_samples = len(dataset)
    writer.prepare()  # header and field descriptors on disk, the metadata table in shared memory
    context = multiprocessing.get_context("fork")  # the workers inherit the samples: nothing is pickled
    tracked = _Tracked(dataset, writer.num_workers, context)
    done, allocations, errors = context.Value(ctypes.c_uint64, 0), context.Queue(), context.Queue()
    args = (_Chunks(len(dataset), chunksize, context), writer.metadata_sm, writer.metadata_type, writer.fields,
            _Allocator(fname, writer.data_region_start, writer.page_size), done, allocations, tracked)
    workers = [context.Process(target=_work, args=(worker_job_indexed_dataset, args, errors, slot), daemon=True)
               for slot in range(writer.num_workers)]
    progress, complete = None, False
    try:
        for worker in workers:
            worker.start()
        progress = BetonProgress(label, len(dataset))

        def failure() -> str | None:
            return _failure(workers, errors, lambda slot: _position(tracked.positions[slot], describe))

        writer.finalize(_wait(workers, allocations, failure, lambda: progress.update(done.value)))
        complete = True
    finally:
        if progress is not None:
            progress.close(complete)
        _stop(workers)
        allocations.close()
        errors.close()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def _position(sample: int, describe: Callable[[int], str]) -> str:
    return f"on {describe(sample)}" if sample >= 0 else "before its first sample"


class _Tracked:
    """The dataset as the workers read it: each records, in shared memory, the sample it is on."""

    def __init__(self, dataset, workers: int, context):
        self.dataset, self.slot = dataset, 0  # slot: set in each worker to its own number
        self.positions = context.Array(ctypes.c_int64, [-1] * workers, lock=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        self.positions[self.slot] = i
        return self.dataset[i]


class _Chunks:
    """The work list FFCV's workers ``get()`` from: chunks of (row, sample) pairs, inherited by the
    forked workers and handed out by a shared counter; ``None`` once all are taken."""

    def __init__(self, total: int, chunksize: int, context):
        self.chunks = [[(i, i) for i in range(start, min(start + chunksize, total))]
                       for start in range(0, total, chunksize)]
        self.taken = context.Value(ctypes.c_uint64, 0)

    def get(self):
        with self.taken.get_lock():
            index = self.taken.value
            self.taken.value = index + 1
        return self.chunks[index] if index < len(self.chunks) else None


class _Allocator(MemoryAllocator):
    """FFCV's page allocator, except that a failing worker leaves at once: FFCV's would first wait
    its turn to write its last page, a turn that never comes when an earlier page's worker died."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return super().__exit__(exc_type, exc, tb)
        self.fp.close()
        return None


def _work(job, args, errors, slot: int) -> None:
    """One writer worker: FFCV's job; an exception goes to the parent as one line, and the worker
    exits 1 without printing a traceback."""
    args[-1].slot = slot  # the _Tracked dataset, FFCV's last worker argument
    try:
        job(*args)
    except BaseException as err:
        errors.put((slot, " ".join(f"{type(err).__name__}: {err}".split())))
        sys.exit(1)


def _wait(workers, allocations, failure: Callable[[], str | None], tick: Callable[[], None]) -> list:
    """Every worker's page allocations, once all have sent theirs; WriterFailed as soon as
    ``failure()`` names one."""
    sent = []
    while len(sent) < len(workers):
        if (message := failure()) is not None:
            raise (WriterKilled if " was killed by " in message else WriterFailed)(message)
        try:
            sent.append(allocations.get(timeout=POLL_S))
        except queue.Empty:
            pass
        tick()
    return [allocation for worker in sent for allocation in worker]


def _failure(workers, errors, where: Callable[[int], str]) -> str | None:
    """One line about the first worker that raised or ended with a non-zero exit code; None if none."""
    ended = [slot for slot, worker in enumerate(workers) if worker.exitcode]  # None: running, 0: done
    try:  # a worker that raised sent its error before exiting
        slot, reason = errors.get(block=bool(ended), timeout=1.0)
        return f"writer worker {slot + 1} failed {where(slot)}: {reason}"
    except queue.Empty:
        if not ended:
            return None
    slot = ended[0]
    worker = workers[slot]
    return f"writer worker {slot + 1} (pid {worker.pid}) {_how(worker.exitcode)} {where(slot)}"


def _how(exitcode: int) -> str:
    if exitcode > 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"was killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")


def _stop(workers) -> None:
    """Kill the workers still running and reap them all."""
    started = [worker for worker in workers if worker.pid is not None]
    for worker in started:
        if worker.is_alive():
            worker.kill()
    for worker in started:
        worker.join()
