"""What Flower sees: a thread that counts the workers' task events by type, from the broker.

`task-received` is what Flower counts as processed, `task-retried` a republish (a wait or a
re-route), `task-succeeded` a job done. Counted from outside, the way Flower counts them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any


class EventCounter:
    def __init__(self, app: Any, task: str = "spillway.run_job") -> None:
        self.app = app
        self.task = task
        self.counts: Counter[str] = Counter()
        self._names: dict[str, str] = {}  # task id -> name (only task-received carries it)
        self._receiver: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-events", daemon=True)

    def __enter__(self) -> EventCounter:
        self._thread.start()
        self._ready.wait(10)
        time.sleep(0.5)  # the receiver's queue is bound once it consumes
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True  # seen within a second (kombu's drain interval)
        self._thread.join(10)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind, uuid = event.get("type", ""), event.get("uuid")
        if kind == "task-received":
            self._names[uuid] = event.get("name", "")
        if uuid and self._names.get(uuid, "").split("[", 1)[0] == self.task:  # shadow names too
            self.counts[kind] += 1

    def _run(self) -> None:
        with self.app.connection() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self._ready.set()
            for _ in self._receiver.itercapture(limit=None, timeout=None, wakeup=False):
                pass
