"""What the broker holds: queue lengths per provider queue, and the task ids of every
message (queued or unacked) — on Redis read directly, on RabbitMQ through a passive declare."""

from __future__ import annotations

import json
from typing import Any

from celery import Celery


def is_redis(app: Celery) -> bool:
    return str(app.conf.broker_url).startswith(("redis", "rediss", "redis+socket"))


def _priority_lists(app: Celery, queue: str) -> list[str]:
    options = app.conf.broker_transport_options or {}
    sep, steps = options.get("sep", "\x06\x16"), options.get("priority_steps", [0, 3, 6, 9])
    return [queue if not step else f"{queue}{sep}{step}" for step in steps]


def queue_lengths(app: Celery, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue (every priority level); -1 if the broker cannot say."""
    with app.connection_for_read() as conn:
        if is_redis(app):
            client = conn.default_channel.client
            pipe = client.pipeline(transaction=False)
            for queue in queues:
                for name in _priority_lists(app, queue):
                    pipe.llen(name)
            sizes = iter(pipe.execute())
            steps = len(_priority_lists(app, "q"))
            return {queue: sum(next(sizes) for _ in range(steps)) for queue in queues}
        out = {}
        for queue in queues:
            try:
                out[queue] = conn.default_channel.queue_declare(queue, passive=True).message_count
            except Exception:  # a queue nobody declared yet has no messages
                out[queue] = 0
        return out


def message_task_ids(app: Celery, queues: list[str]) -> set[str] | None:
    """Task ids of every message in the Redis broker (queued or unacked); None: not Redis."""
    if not is_redis(app):
        return None
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for name in _priority_lists(app, queue):
                pipe.lrange(name, 0, -1)
        pipe.hvals("unacked")
        *lists, unacked = pipe.execute()
    ids = {task_id_of(json.loads(raw)) for lst in lists for raw in lst}
    ids |= {task_id_of(json.loads(raw)[0]) for raw in unacked}
    return ids


def task_id_of(message: dict[str, Any]) -> str:
    return (message.get("headers") or {}).get("id") or ""
