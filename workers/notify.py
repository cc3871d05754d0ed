"""A final job's id, told at once to the `spillway serve` processes that may be waiting on it.

A worker that has written a job's final state calls `finished(rt, job_id)`: one Redis PUBLISH
of the id alone (never a prompt or an answer) on ``Keyspace.finished_channel``. `spillway serve`
subscribes (`producer.ops.openai.chat.Waiters`) and reads the job from the store as soon as
its id is heard, instead of at its next poll. The store stays the source of truth: a
notification that is lost (Redis restarting, a serve reconnecting, a worker without this
call) only means the waiting request is answered by serve's slower poll of the store.

`finished` never raises and costs at most one Redis command; after a failure it stays quiet
for `QUIET_S`, so a Redis that is away does not slow every job down. When nobody heard the
last one (no `spillway serve` waits: batches, fire-and-forget) it stays quiet for `UNHEARD_S`:
a worker then sends a couple of commands a second, not one per job. A serve that starts
listening meanwhile finds its first jobs by polling, as after any lost notification.

A serve that runs jobs itself (`workers.inline`) is told instead, in the thread that ran the
job (`listen_here`), with the final job as it was just written: its waiting request is
answered without reading the store back, and nothing is published (no other process waits
for a job one serve runs; another serve's request for it — the same idempotency key — is
answered by that serve's poll of the store).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the types: a worker has its runtime already
    from workers.runtime import Runtime
    from workers.store import Job

log = logging.getLogger("spillway.notify")

#: After a failed publish, no more tries for this long (the waiters' poll answers meanwhile).
QUIET_S = 5.0
#: After a notification nobody was subscribed to hear, none for this long.
UNHEARD_S = 0.5
_quiet_until = 0.0
_here = threading.local()


def listen_here(hook: Callable[[Job], bool] | None) -> None:
    """Have `hook` told of every final job this thread writes (None: no more); when it
    returns True, the job is not published."""
    _here.hook = hook


def finished(rt: Runtime, job_id: str, final: Callable[[], Job] | None = None) -> None:
    """Tell the serve processes that `job_id` is final (its result is in the store already);
    `final()` builds the job as written, for a listener in this process."""
    global _quiet_until
    hook = getattr(_here, "hook", None)
    if hook is not None and final is not None:
        try:
            if hook(final()):
                return
        except Exception:  # published below, as from any worker
            log.exception("job %s: the in-process listener failed", job_id)
    now = time.monotonic()
    if now < _quiet_until:
        return
    try:
        heard = rt.redis.publish(rt.keys.finished_channel(), job_id)
    except Exception as exc:  # a lost notification costs a poll, never the job
        _quiet_until = now + QUIET_S
        log.debug("could not notify job %s: %s", job_id, type(exc).__name__)
        return
    if not heard:
        _quiet_until = now + UNHEARD_S
