"""The reconciler: the store cannot lose a job, so jobs the broker lost are published again.

A job is lost when the store says it is queued or running, nothing touched it for a while,
no worker holds its lease, it is not parked, and no broker message carries its id — not in
a queue, not unacked (the Redis transport keeps unacked messages in a hash). It must be
missing in two looks a moment apart (a message moves from a queue to the unacked hash in two
steps). A conditional update makes each republish happen once, and a Redis lock keeps two
reconcilers apart. Batches whose jobs are all final get their summary here too, if their
chord's callback was lost with the broker's state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from celery import Celery

from workers import dispatch, parking
from workers.broker import message_task_ids
from workers.runtime import Runtime
from workers.store import BATCHED, OPEN, RUNNING, Job, aware, utcnow

log = logging.getLogger("spillway.reconciler")

LOCK_TTL_S = 60


@dataclass
class Recovery:
    republished: list[str]
    batches_completed: list[str]
    skipped_live: int = 0
    too_recent: int = 0  # open jobs touched within `idle_for_s`: not looked at
    busy: bool = False  # another reconciler held the lock: nothing was done


def recover_once(
    rt: Runtime,
    app: Celery,
    *,
    idle_for_s: float = 30.0,
    confirm_s: float = 1.0,
    batch_id: str | None = None,
) -> Recovery:
    """Republish lost jobs (each once) and complete finished batches; see the module doc."""
    lock = rt.keys.recover_lock()
    if not rt.redis.set(lock, "1", nx=True, ex=LOCK_TTL_S):
        return Recovery([], [], busy=True)
    try:
        return _recover(rt, app, idle_for_s, confirm_s, batch_id)
    finally:
        rt.redis.delete(lock)


def _lost(rt: Runtime, app: Celery, idle_for_s: float, batch_id: str | None) -> tuple[dict[str, Job], int]:
    now = utcnow()
    queues = [p.queue for p in rt.settings.providers.values()]
    live = message_task_ids(app, queues)
    if live is None:
        idle_for_s = max(idle_for_s, 600.0)  # RabbitMQ keeps messages; only very old jobs are suspect
        live = set()
    parked = parking.parked_job_ids(rt.redis, rt.keys)
    lost, skipped = {}, 0
    for job in rt.store.open_jobs(idle_for_s=idle_for_s, batch_id=batch_id):
        lease = aware(job.lease_until)
        held = job.status == RUNNING and lease is not None and lease > now
        if held or (job.task_id or job.id) in live or job.id in parked:
            skipped += 1
            continue
        lost[job.id] = job
    return lost, skipped


def _recover(rt: Runtime, app: Celery, idle_for_s: float, confirm_s: float, batch_id: str | None) -> Recovery:
    first, skipped = _lost(rt, app, idle_for_s, batch_id)
    counts = rt.store.count_by_status(batch_id)
    waiting = sum(counts.get(status, 0) for status in OPEN if status != BATCHED)  # batched: see poller
    too_recent = max(0, waiting - skipped - len(first))
    if first and confirm_s > 0:
        time.sleep(confirm_s)
        second, _ = _lost(rt, app, idle_for_s, batch_id)
        first = {k: v for k, v in first.items() if k in second and second[k].updated_at == v.updated_at}
    republished = []
    for job in first.values():
        if not rt.store.take_for_republish(job):  # only if nobody touched it since we looked
            continue
        if not job.provider or job.provider not in rt.settings.providers:
            log.warning("lost job %s has no provider; leaving it for `spillway recover`", job.id)
            continue
        dispatch.republish_job(app, job, rt.priority(job.tier))
        republished.append(job.id)
    if republished:
        log.warning("republished %d job(s) the broker had lost", len(republished))
    return Recovery(republished, complete_batches(rt), skipped, too_recent)


def complete_batches(rt: Runtime) -> list[str]:
    """Batches with every job final but no summary (their chord callback was lost)."""
    return [b for b in rt.store.unfinished_batch_ids() if rt.store.complete_batch(b) is not None]
