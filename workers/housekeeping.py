"""Work every worker does in the background: say it is alive and what it holds, publish parked
jobs that are due, put dead workers' messages back, run the reconciler now and then, and end
the process if its consumer is stuck (the watchdog). Runs in one daemon thread per worker
process; registered through the app's ``include``."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from workers import liveness, parking, provider_batch, reconciler, watchdog
from workers.errors import SpillwayError
from workers.logs import install_redaction
from workers.runtime import runtime

log = logging.getLogger("spillway.housekeeping")

_stop = threading.Event()
_node: list[str] = []  # this worker's node name, once it is ready


def _loop(app: Any, queues: list[str]) -> None:
    try:
        env = runtime().env
    except SpillwayError:  # already said at start-up: this worker cannot run jobs
        return
    next_recover = time.monotonic() + env.recover_every_s
    next_orphans = time.monotonic() + env.unacked_restore_s
    next_batches = time.monotonic()
    dog = watchdog.Watchdog(app, queues, stuck_s=env.stuck_s)
    while not _stop.wait(env.parked_every_s):
        try:
            dog.check()
            rt = runtime()
            now_s = rt.limiter.now_s()
            parking.release_due(rt.redis, rt.keys, app, now_s)
            if time.monotonic() >= next_orphans:
                next_orphans = time.monotonic() + env.unacked_restore_s
                liveness.restore_orphans(rt.redis, rt.keys, rt.store, app, now_s)
            if env.recover_every_s > 0 and time.monotonic() >= next_recover:
                next_recover = time.monotonic() + env.recover_every_s
                reconciler.recover_once(rt, app, idle_for_s=env.recover_idle_s)
            if time.monotonic() >= next_batches:  # provider batches whose next step is late
                next_batches = time.monotonic() + provider_batch.RESUME_LATE_S
                provider_batch.resume_overdue(rt, app)
        except SpillwayError as exc:
            log.warning("housekeeping skipped a round: %s", exc)
        except Exception:
            log.exception("housekeeping round failed")


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    try:
        install_redaction(runtime().keyring.secrets())
    except SpillwayError as exc:
        log.error("spillway cannot run jobs here: %s", exc)
    _stop.clear()
    app = sender.app if sender is not None else None
    queues = [q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", [])]
    node = str(getattr(sender, "hostname", None) or f"worker-{os.getpid()}")
    _node[:] = [node]
    log.info("housekeeping started; the watchdog watches %s", ",".join(queues) or "no queue")
    threading.Thread(target=_loop, args=(app, queues), name="spillway-housekeeping", daemon=True).start()
    threading.Thread(target=_beat, args=(node,), name="spillway-beat", daemon=True).start()


def _beat(node: str) -> None:
    """Say every BEAT_EVERY_S that this worker lives and what it holds. A thread of its own:
    a slow housekeeping round must never make a live worker look dead."""
    failing = False
    while not _stop.wait(liveness.BEAT_EVERY_S):
        try:
            rt = runtime()
            liveness.beat(rt.redis, rt.keys, node, rt.limiter.now_s(), *liveness.held_here())
            failing = False
        except Exception as exc:  # Redis down: the next beat tries again (said once)
            if not failing:
                log.warning("liveness beat failed: %s", type(exc).__name__)
            failing = True


@worker_shutdown.connect
def _stop_loop(**_: Any) -> None:
    _stop.set()
    if _node:
        with contextlib.suppress(Exception):  # a Redis that is down: the entry just goes stale
            rt = runtime()
            liveness.leave(rt.redis, rt.keys, _node[0])
