"""Work every worker does in the background: publish parked jobs that are due, run the
reconciler now and then, and end the process if its consumer is stuck (the watchdog). Runs in
one daemon thread per worker process; registered through the app's ``include``."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from workers import parking, reconciler, watchdog
from workers.errors import SpillwayError
from workers.logs import install_redaction
from workers.runtime import runtime

log = logging.getLogger("spillway.housekeeping")

_stop = threading.Event()


def _loop(app: Any, queues: list[str]) -> None:
    try:
        env = runtime().env
    except SpillwayError:  # already said at start-up: this worker cannot run jobs
        return
    next_recover = time.monotonic() + env.recover_every_s
    dog = watchdog.Watchdog(app, queues, stuck_s=env.stuck_s)
    while not _stop.wait(env.parked_every_s):
        try:
            dog.check()
            rt = runtime()
            parking.release_due(rt.redis, rt.keys, app, rt.limiter.now_s())
            if env.recover_every_s > 0 and time.monotonic() >= next_recover:
                next_recover = time.monotonic() + env.recover_every_s
                reconciler.recover_once(rt, app, idle_for_s=env.recover_idle_s)
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
    log.info("housekeeping started; the watchdog watches %s", ",".join(queues) or "no queue")
    threading.Thread(target=_loop, args=(app, queues), name="spillway-housekeeping", daemon=True).start()


@worker_shutdown.connect
def _stop_loop(**_: Any) -> None:
    _stop.set()
