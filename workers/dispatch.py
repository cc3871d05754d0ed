"""Every message Spillway publishes, built in one place and by task name.

A job's message is ``spillway.run_job(job_id, provider, model, hop)`` with the job id as its
task id, on the provider's queue ``llm.<provider>``, at its tier's priority: ids and names only,
never a prompt or a key. A batch chunk is a chord of such messages whose callback records the
batch summary; a job the broker lost is published again under the same task id and, in a
batch, back into its chord. Producers never import the tasks: they send by name
(`app.signature`), so publishing needs nothing but the Celery app.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, Signature, chord

from workers.constants import DELIVER_CALLBACK_TASK, FINISH_BATCH_TASK, RUN_JOB_TASK, queue_name


@dataclass(frozen=True)
class Target:
    """Where one job's message goes."""

    job_id: str
    provider: str
    model: str
    priority: int
    hop: int = 0
    task_id: str | None = None  # the job id unless the job runs again under a new one
    reservation: str | None = None  # budget already taken for it (`execution.Requeue`)


def message_priority(tier_priority: int, *, amqp: bool) -> int:
    """A tier's priority as a Celery message priority: on Redis 0 runs first, on AMQP 9 does."""
    level = min(9, tier_priority)
    return level if amqp else 9 - level


def job_kwargs(
    job_id: str, provider: str, model: str, hop: int = 0, reservation: str | None = None
) -> dict[str, Any]:
    """`run_job`'s arguments: what Flower and the broker see of a job (a reservation is an
    opaque id of budget already taken for it)."""
    kwargs: dict[str, Any] = {"job_id": job_id, "provider": provider, "model": model, "hop": hop}
    if reservation is not None:
        kwargs["reservation"] = reservation
    return kwargs


def shown_name(provider: str, model: str) -> str:
    """The name Flower, events and worker logs show for a job's message (Celery's `shadow`):
    `spillway.run_job[groq:llama-3.3-70b-versatile]`, so Flower's task list and its filters
    tell providers and models apart. The worker still runs it as `spillway.run_job`."""
    return f"{RUN_JOB_TASK}[{provider}:{model}]"


def job_signature(app: Celery, target: Target, **options: Any) -> Signature:
    return app.signature(
        RUN_JOB_TASK,
        kwargs=job_kwargs(target.job_id, target.provider, target.model, target.hop, target.reservation),
        task_id=target.task_id or target.job_id,
        queue=queue_name(target.provider),
        priority=target.priority,
        shadow=shown_name(target.provider, target.model),
        **options,
    )


def publish_jobs(app: Any, targets: Sequence[Target]) -> None:
    """Single jobs (no chord, no result kept); many go out in one pipelined round trip."""
    publishing = app.publishing_batch() if len(targets) > 1 else app.producer_or_acquire()
    with publishing as producer:
        for target in targets:
            job_signature(app, target).apply_async(producer=producer, ignore_result=True)


def chord_callback(app: Celery, batch_id: str, chunk: int, chord_id: str) -> Signature:
    """The callback of a batch chunk's chord: rebuilt the same way when a job is re-sent."""
    callback = app.signature(FINISH_BATCH_TASK, kwargs={"batch_id": batch_id, "chunk": chunk})
    callback.freeze(f"{chord_id}-done", group_id=chord_id)
    return callback


def publish_chunk(app: Any, targets: Sequence[Target], batch_id: str, chunk: int, chord_id: str) -> None:
    """One chunk of a batch as one chord, pipelined. The group id is ours (recorded on every
    job), so a lost job can be put back into its chord; the callback keeps its own id."""
    header = [job_signature(app, t) for t in targets]
    callback = chord_callback(app, batch_id, chunk, chord_id)
    with app.publishing_batch():
        chord(header, callback, task_id=chord_id, app=app).apply_async(task_id=callback.id)


def republish(
    app: Celery,
    target: Target,
    *,
    batch_id: str | None = None,
    chord_id: str | None = None,
    chord_index: int | None = None,
    chord_chunk: int | None = None,
) -> None:
    """A job the broker lost, again: same task id and, for a batch job, the same chord slot,
    so the chord's callback still counts it."""
    options: dict[str, Any] = {}
    if chord_id and batch_id is not None:
        options = {
            "group_id": chord_id,
            "group_index": chord_index,
            "chord": chord_callback(app, batch_id, chord_chunk or 0, chord_id),
        }
    job_signature(app, target).apply_async(**options)


def republish_job(app: Celery, job: Any, priority: int) -> None:
    """`republish` for a stored job (a `workers.store.Job`): its provider, hop, task id and
    chord slot as the store has them."""
    target = Target(job.id, job.provider or "", job.model or "", priority, job.hops, job.task_id)
    republish(
        app,
        target,
        batch_id=job.batch_id,
        chord_id=job.chord_id,
        chord_index=job.chord_index,
        chord_chunk=job.chord_chunk,
    )


def deliver_callback(app: Celery, job_id: str) -> None:
    """Queue the POST of a final job's result to its callback_url."""
    app.signature(DELIVER_CALLBACK_TASK, args=[job_id]).apply_async()
