"""Chat completions that `spillway serve` runs itself while it has a free slot (`workers.inline`).

A slot is a thread that makes one provider call; `$SPILLWAY_SERVE_INLINE_CALLS` of them, 0
for none. A job is run here only when a slot is free at once; every other job is published to
its queue as before, so a burst beyond the slots is queued, never refused. (Serve places jobs
with its own key ring, so it holds the key of every provider it places a job on.) Stopping
(SIGTERM), serve takes no more (`stop_taking`) and answers its calls in flight first
(`calls_in_flight`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from producer.client import Client
from workers import dispatch, execution, inline, notify
from workers.config import Candidate
from workers.store import FirstRun, Job

log = logging.getLogger("spillway.openai")


_runners: weakref.WeakSet[InlineRunner] = weakref.WeakSet()


def stop_taking() -> None:
    """Every runner of this process runs no more jobs (serve is stopping); calls in flight go on."""
    for runner in list(_runners):
        runner.stop()


def calls_in_flight() -> int:
    return sum(runner.busy for runner in list(_runners))


class InlineRunner:
    """Runs jobs in free slots (`producer.jobs.Runner`: a slot is reserved before the job is
    stored, claimed for this run); `finished(job)` is told of each job that ends final here,
    as written (`workers.notify.listen_here`; True: nobody else needs telling)."""

    def __init__(self, client: Client, slots: int, finished: Callable[[Job], bool] | None = None) -> None:
        self.client, self.slots, self.finished = client, slots, finished
        self.lock = threading.Lock()
        self.busy = 0  # calls in flight
        self.pool = ThreadPoolExecutor(slots, "spillway-serve-inline") if slots else None
        _runners.add(self)

    def reserve(self, candidate: Candidate) -> FirstRun | None:
        with self.lock:
            if self.pool is None or self.busy >= self.slots:
                return None
            self.busy += 1
        return execution.first_run(self.client.runtime, candidate)

    def release(self) -> None:
        self._done()

    def run(self, target: dispatch.Target, job: Job) -> None:
        with self.lock:
            pool = self.pool
        if pool is not None:
            try:
                pool.submit(self._run, target, job)
                return
            except RuntimeError:  # stopped meanwhile
                pass
        self._run(target, job)  # it is claimed for this process: run it in this thread

    def stop(self) -> None:
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _done(self) -> None:
        with self.lock:
            self.busy -= 1

    def _run(self, target: dispatch.Target, job: Job) -> None:
        notify.listen_here(self.finished)
        try:
            inline.run_here(self.client.app, self.client.runtime, target, job)
        except Exception:  # run_here hands on what it can; nothing may kill the slot's thread
            log.exception("job %s: running it here failed", target.job_id)
        finally:
            notify.listen_here(None)
            self._done()
