"""Chat completions that `spillway serve` runs itself while it has a free slot (`workers.inline`).

A slot is a thread that makes one provider call; `$SPILLWAY_SERVE_INLINE_CALLS` of them, 0
for none. A job is run here only when a slot is free at once; every other job is published to
its queue as before, so a burst beyond the slots is queued, never refused. (Serve places jobs
with its own key ring, so it holds the key of every provider it places a job on.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from producer.client import Client
from workers import dispatch, inline, notify
from workers.store import Job

log = logging.getLogger("spillway.openai")


class InlineRunner:
    """`take` runs a job in a free slot; `finished(job)` is told of each job that ends final
    here, as written (`workers.notify.listen_here`; True: nobody else needs telling)."""

    def __init__(self, client: Client, slots: int, finished: Callable[[Job], bool] | None = None) -> None:
        self.client, self.finished = client, finished
        self.free = threading.BoundedSemaphore(max(1, slots))
        self.pool = ThreadPoolExecutor(max(1, slots), "spillway-serve-inline") if slots else None

    def take(self, target: dispatch.Target) -> bool:
        """Run `target` (stored, not published) in a free slot; False: publish it instead."""
        pool = self.pool
        if pool is None or not self.free.acquire(blocking=False):
            return False
        try:
            pool.submit(self._run, target)
        except RuntimeError:  # closed meanwhile
            self.free.release()
            return False
        return True

    def _run(self, target: dispatch.Target) -> None:
        notify.listen_here(self.finished)
        try:
            inline.run_here(self.client.app, self.client.runtime, target)
        except Exception:  # run_here hands on what it can; nothing may kill the slot's thread
            log.exception("job %s: running it here failed", target.job_id)
        finally:
            notify.listen_here(None)
            self.free.release()
