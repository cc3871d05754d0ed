"""A worker that stopped consuming is ended, so whatever runs it (`spillway worker`'s
supervisor, Docker's restart policy, systemd) starts a fresh one.

After the broker vanishes, a threads-pool worker on Redis can stay up but never take another
message (celery/celery#8030, #8091). From outside the sign is plain: messages wait in this
worker's queues, none of its threads is busy, and no task has started for `stuck_s`
(``$SPILLWAY_STUCK_S``) — longer than any countdown a job may wait in the worker. Messages
must be seen waiting for `GRACE_S` before that counts, so a message that just arrived at an
idle worker is not mistaken for one it ignores.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery.signals import task_prerun
from celery.worker import state

from workers.broker import queue_lengths

log = logging.getLogger("spillway.watchdog")

GRACE_S = 10.0
EXIT_STUCK = 75  # EX_TEMPFAIL: try again

_last_start = time.monotonic()  # set by every task thread; one float, so no lock needed


@task_prerun.connect
def _task_started(**_: Any) -> None:
    global _last_start
    _last_start = time.monotonic()


class Watchdog:
    """Checked now and then by the worker's housekeeping thread."""

    def __init__(self, app: Any, queues: list[str], *, stuck_s: float) -> None:
        self.app = app
        self.queues = queues
        self.stuck_s = stuck_s
        self._waiting_since: float | None = None

    def stuck_for_s(self, now: float | None = None) -> float:
        """Seconds this worker has ignored waiting messages with threads free; 0 if it has not."""
        now = time.monotonic() if now is None else now
        idle_s = now - _last_start
        if idle_s < self.stuck_s or state.active_requests or not self._messages_wait():
            self._waiting_since = None
            return 0.0
        if self._waiting_since is None:
            self._waiting_since = now
        return idle_s if now - self._waiting_since >= GRACE_S else 0.0

    def _messages_wait(self) -> bool:
        try:
            return any(n > 0 for n in queue_lengths(self.app, self.queues).values())
        except Exception:  # the broker is away: that is an outage, not a stuck worker
            return False

    def check(self) -> None:
        """Exit the process if the worker is stuck."""
        if not self.queues:
            return
        stuck = self.stuck_for_s()
        if stuck:
            log.error(
                "worker stuck: messages wait in %s but no task started for %.0f s; exiting so it restarts",
                ",".join(self.queues),
                stuck,
            )
            logging.shutdown()
            os._exit(EXIT_STUCK)
