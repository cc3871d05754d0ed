"""Celery's Redis result backend without its pub/sub bookkeeping.

Celery subscribes to the result channel of every task a process publishes (and of every
member of a group), so that `AsyncResult.get()` can wake up. Spillway never waits on Celery
results — producers read the store — so those subscriptions would cost one Redis command
per job at enqueue and leave a pending result per task behind. Chords are unaffected: the
worker that finishes the last header task counts and joins the stored results itself.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend


class QuietRedisBackend(RedisBackend):
    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None

    def add_pending_result(self, result: Any, weak: bool = False, start_drainer: bool = True) -> Any:
        return result

    def remove_pending_result(self, result: Any) -> Any:
        return result

    def wait_for_pending(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "Spillway keeps results in its store: use producer.get(job_id), not AsyncResult.get()"
        )
