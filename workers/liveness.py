"""Dead workers' messages, back within a minute on the Redis broker.

kombu's Redis transport keeps every message a worker took in the `unacked` hash until the
worker acks it, and hands it back only after the visibility timeout (15 minutes here, so that a
countdown held by a live worker is never handed out twice). A worker that dies by SIGKILL
leaves its messages there for that long. So every worker says, every few seconds, which
messages it holds (`beat`: a field of one Redis hash, with the time). A message in `unacked`
that no live worker holds, delivered more than a moment ago, is an orphan: `restore_orphans`
puts it back at the front of its queue (kombu's own restore, atomic against a late ack) and
lets go of the store lease its job's dead run left, so the next worker runs it at once.

Safe against a worker that is alive but slow to beat: its job keeps its store lease unless
its task id is held by no live worker, and the store's conditional claim never lets two
deliveries run one job at the same time. RabbitMQ returns a dead consumer's messages itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from redis import Redis

from workers.broker import is_redis, task_id_of
from workers.keyspace import Keyspace
from workers.store import Store

log = logging.getLogger("spillway.liveness")

#: Every worker beats this often, from a thread that does nothing else ...
BEAT_EVERY_S = 2.0
#: ... and one whose last beat is older than this is dead.
DEAD_AFTER_S = 20.0
#: A message delivered (or a job claimed) this recently may not be in its worker's last beat
#: yet (it beats every 2 s): such a message is not an orphan, such a run keeps its lease. Not
#: DEAD_AFTER_S: a run claimed a second before its worker died must lose its lease too.
DELIVERY_GRACE_S = 10.0
LOCK_TTL_S = 60  # a restorer that dies holding the lock blocks the others this long


@dataclass
class Holdings:
    """What the live workers hold: delivery tags and task ids."""

    tags: set[str] = field(default_factory=set)
    task_ids: set[str] = field(default_factory=set)


def held_here() -> tuple[list[str], list[str]]:
    """(delivery tags, task ids) of every message this worker process holds: reserved,
    running, or waiting for its ETA. Celery's own registries, read from the beat thread."""
    from celery.worker import state  # the worker's registry: only a worker process has one

    tags, ids = [], []
    held: set[Any] = set()
    for registry in (
        state.requests.values(),
        state.reserved_requests,
        state.active_requests,
        state.scheduled_requests,  # waiting for an ETA: not in `requests` on every Celery version
    ):
        held |= _snapshot(registry)
    for request in held:
        ids.append(request.id)
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            tags.append(str(tag))
    return tags, ids


def _snapshot(registry: Iterable[Any]) -> set[Any]:
    """A copy of a registry the worker's consumer thread changes while we read it."""
    for _ in range(10):
        try:
            return set(registry)
        except RuntimeError:  # changed size during iteration: read it again
            continue
    return set(registry)


def beat(redis: Redis, keys: Keyspace, node: str, now_s: float, tags: list[str], ids: list[str]) -> None:
    """Say that `node` is alive and holds these messages."""
    redis.hset(keys.alive(), node, json.dumps({"t": now_s, "tags": tags, "ids": ids}))


def leave(redis: Redis, keys: Keyspace, node: str) -> None:
    """A worker that stops cleanly takes its entry out (kombu restores its messages itself)."""
    redis.hdel(keys.alive(), node)


def live_holdings(redis: Redis, keys: Keyspace, now_s: float) -> Holdings:
    """Everything live workers hold; entries of dead workers are removed."""
    held, dead = Holdings(), []
    for node, raw in redis.hgetall(keys.alive()).items():
        record = json.loads(raw)
        if record["t"] < now_s - DEAD_AFTER_S:
            dead.append(node)
            continue
        held.tags.update(record["tags"])
        held.task_ids.update(record["ids"])
    if dead:
        redis.hdel(keys.alive(), *dead)
        log.warning("%d worker(s) stopped beating: %s", len(dead), ", ".join(_text(n) for n in dead))
    return held


def restore_orphans(redis: Redis, keys: Keyspace, store: Store, app: Celery, now_s: float) -> list[str]:
    """Put back every message no live worker holds; returns their task ids. One process at a
    time (a Redis lock); another that finds it taken does nothing."""
    if not is_redis(app) or not redis.set(keys.orphans_lock(), "1", nx=True, ex=LOCK_TTL_S):
        return []
    try:
        return _restore_orphans(redis, keys, store, app, now_s)
    finally:
        redis.delete(keys.orphans_lock())


def _restore_orphans(redis: Redis, keys: Keyspace, store: Store, app: Celery, now_s: float) -> list[str]:
    held = live_holdings(redis, keys, now_s)
    restored: list[str] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client, qos = channel.client, channel.qos
        settled_before = time.time() - DELIVERY_GRACE_S  # kombu scores deliveries by wall clock
        tags = [_text(t) for t in client.zrangebyscore(qos.unacked_index_key, "-inf", settled_before)]
        orphans = [t for t in tags if t not in held.tags]
        if not orphans:
            return []
        found = zip(orphans, client.hmget(qos.unacked_key, orphans), strict=True)
        orphaned = {tag: task_id_of(json.loads(raw)[0]) for tag, raw in found if raw is not None}
        # the dead runs' store leases first: once a message is back, a live worker may claim
        lapsed = {t for t in orphaned.values() if t and t not in held.task_ids}
        if lapsed:
            store.end_leases(sorted(lapsed), untouched_for_s=DELIVERY_GRACE_S)
        for tag, task_id in orphaned.items():
            qos.restore_by_tag(tag)  # to the front of its queue; nothing if acked meanwhile
            restored.append(task_id)
    if restored:
        log.warning("restored %d message(s) of dead workers", len(restored))
    return restored


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
