"""Jobs that must wait longer than a countdown may (a daily quota is gone) wait in a Redis
sorted set, scored by when they are due, and are published again from there.

A countdown longer than the broker's visibility timeout would run a task again and again
(kombu#337); a parked job holds no broker message at all. The whole task signature is kept,
so a job inside a chord keeps its task id and its chord slot.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from celery import Celery, signature

from workers.keyspace import Keyspace

log = logging.getLogger("spillway.parking")


def park(
    client: redis.Redis, keys: Keyspace, task_signature: dict[str, Any], due_s: float, job_id: str
) -> None:
    member = json.dumps({"job_id": job_id, "signature": task_signature}, sort_keys=True)
    client.zadd(keys.parked(), {member: due_s})


def parked_job_ids(client: redis.Redis, keys: Keyspace) -> set[str]:
    return {json.loads(m)["job_id"] for m in client.zrange(keys.parked(), 0, -1)}


def due_now(client: redis.Redis, keys: Keyspace, job_ids: set[str], now_s: float) -> list[dict[str, Any]]:
    """Make the parked messages of `job_ids` (cancelled jobs) due now: published at the next
    release, each finds its job final and completes its chord slot. Returns the task arguments
    of each (a reservation among them, to give back now)."""
    found = []
    parked = keys.parked()
    for member in client.zrange(parked, 0, -1):
        entry = json.loads(member)
        if entry["job_id"] in job_ids and client.zadd(parked, {member: now_s}, xx=True, ch=True):
            found.append(entry["signature"].get("kwargs") or {})
    return found


def release_due(client: redis.Redis, keys: Keyspace, app: Celery, now_s: float, limit: int = 500) -> int:
    """Publish every parked job that is due. ZREM decides who publishes, so each goes once."""
    released = 0
    parked = keys.parked()
    for member in client.zrangebyscore(parked, "-inf", now_s, start=0, num=limit):
        if not client.zrem(parked, member):
            continue  # another worker took it
        entry = json.loads(member)
        try:
            signature(entry["signature"], app=app).apply_async()
        except Exception:
            client.zadd(parked, {member: now_s})  # publish failed: keep it parked
            log.exception("could not publish parked job %s; it stays parked", entry["job_id"])
            continue
        released += 1
    return released


def wake(client: redis.Redis, keys: Keyspace, provider: str, due_s: float, limit: int = 10_000) -> int:
    """Make every job parked for `provider` due at `due_s` at the latest: now when its circuit
    closed (it is back), or at its next probe when a probe failed (jobs parked behind a probe
    in flight look again then). ZADD XX leaves alone one that was taken meanwhile."""
    parked, woken = keys.parked(), 0
    for member, due in client.zrangebyscore(parked, due_s, "+inf", start=0, num=limit, withscores=True):
        kwargs = json.loads(member)["signature"].get("kwargs") or {}
        if kwargs.get("provider") == provider and due > due_s:
            woken += client.zadd(parked, {member: due_s}, xx=True, ch=True)
    if woken:
        log.info("%d job(s) parked for %s are due again at %.0f", woken, provider, due_s)
    return woken
