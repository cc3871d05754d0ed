"""The Celery tasks. Thin on purpose: unpack ids, call the plain function, hand the job on.

Arguments are ids and names only (job id, provider, model, hop): Flower and the broker
never see a prompt or a key. Registered by the worker through the app's ``include``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from celery import Task
from celery.exceptions import Retry

from workers import batches, callbacks, dispatch, execution, parking, provider_batch
from workers.celery import app
from workers.config import Candidate
from workers.constants import (
    DELIVER_CALLBACK_TASK,
    FINISH_BATCH_TASK,
    POLL_PROVIDER_BATCH_TASK,
    RUN_JOB_TASK,
    SUBMIT_PROVIDER_BATCH_TASK,
    queue_name,
)
from workers.errors import ConfigError
from workers.results import JobResult
from workers.runtime import runtime

log = logging.getLogger("spillway.tasks")


@app.task(bind=True, name=RUN_JOB_TASK, max_retries=None)
def run_job(
    self: Task, job_id: str, provider: str, model: str, hop: int = 0, reservation: str | None = None
) -> dict[str, Any]:
    """Run one job on `provider`; on its way elsewhere it is retried under the same task id."""
    rt = runtime()
    outcome = execution.run_job(rt, job_id, Candidate(provider, model), hop, reservation)
    if isinstance(outcome, execution.Done):
        if outcome.notify:
            dispatch.deliver_callback(self.app, job_id)
        return outcome.summary
    if isinstance(outcome, execution.InBatch):
        if outcome.created:
            provider_batch.send_submit_when_collected(self.app, rt, outcome.provider, outcome.batch_id)
        # no message is kept: the provider batch's poller publishes this task again when done
        raise Retry(f"waits in provider batch {outcome.batch_id} ({outcome.provider})")
    target = outcome.candidate
    kwargs = dispatch.job_kwargs(job_id, target.provider, target.model, outcome.hop, outcome.reservation)
    if outcome.park_until_s is not None:
        sig = self.signature_from_request(
            kwargs=kwargs,
            queue=queue_name(target.provider),
            priority=outcome.priority,
            shadow=dispatch.shown_name(target.provider, target.model),
        )
        parking.park(rt.redis, rt.keys, dict(sig), outcome.park_until_s, job_id)
        due = datetime.fromtimestamp(outcome.park_until_s, UTC)
        raise Retry(f"parked until {due:%Y-%m-%d %H:%M:%S} UTC (quota gone until then)", when=due)
    raise self.retry(
        kwargs=kwargs,
        queue=queue_name(target.provider),
        countdown=outcome.countdown_s,
        max_retries=None,
        priority=outcome.priority,
        shadow=dispatch.shown_name(target.provider, target.model),
    )


@app.task(bind=True, name=DELIVER_CALLBACK_TASK, max_retries=None, ignore_result=True)
def deliver_callback(self: Task, job_id: str, waits: int = 0) -> None:
    """POST a final job's result to its callback_url, signed; back off while the backend is down.
    A worker without the signing secret does not drop it: the delivery waits (`waits` counts
    those rounds, which are no deliveries) until a worker that has the secret takes it."""
    rt = runtime()
    job = rt.store.job(job_id)
    if job is None or not job.callback_url:
        return
    try:
        key = callbacks.secret(rt.env)
    except ConfigError as exc:
        log.warning("callback for job %s waits for a worker that can sign it: %s", job_id, exc)
        countdown = min(callbacks.backoff_s(waits), callbacks.SECRET_WAIT_MAX_S)
        raise self.retry(args=(job_id,), kwargs={"waits": waits + 1}, countdown=countdown, exc=None) from None
    payload = JobResult.from_job(job).to_json()
    try:
        callbacks.deliver(job.callback_url, job_id, payload, rt.http, key)
    except httpx.HTTPError as exc:
        delivery = self.request.retries - waits
        if delivery >= callbacks.MAX_DELIVERIES:
            log.error(
                "callback for job %s given up after %d tries (%s)", job_id, delivery + 1, type(exc).__name__
            )
            return
        raise self.retry(countdown=callbacks.backoff_s(delivery), exc=None) from None


@app.task(bind=True, name=SUBMIT_PROVIDER_BATCH_TASK, ignore_result=True)
def submit_provider_batch(self: Task, batch_id: str) -> None:
    """Send the jobs collected for one provider batch to the provider's batch API."""
    provider_batch.submit(runtime(), self.app, batch_id)


@app.task(bind=True, name=POLL_PROVIDER_BATCH_TASK, ignore_result=True)
def poll_provider_batch(self: Task, batch_id: str) -> None:
    """Look at a provider batch once; its results are applied when it has ended."""
    provider_batch.poll(runtime(), self.app, batch_id)


@app.task(name=FINISH_BATCH_TASK)
def finish_batch(results: list[dict[str, Any]], batch_id: str, chunk: int = 0) -> dict[str, Any]:
    """A chord's callback: record the batch summary once every job of the batch is final."""
    return batches.finish_chunk(runtime().store, batch_id, chunk, results)
