"""The Celery tasks. Thin on purpose: unpack ids, call the plain function, hand the job on.

Arguments are ids and names only (job id, provider, model, hop): Flower and the broker
never see a prompt or a key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.exceptions import Retry

from workers import batches, execution, parking
from workers.app import app
from workers.config import Candidate
from workers.constants import FINISH_BATCH_TASK, RUN_JOB_TASK, queue_name
from workers.runtime import runtime


@app.task(bind=True, name=RUN_JOB_TASK, max_retries=None)
def run_job(self: Task, job_id: str, provider: str, model: str, hop: int = 0) -> dict[str, Any]:
    """Run one job on `provider`; on its way elsewhere it is retried under the same task id."""
    rt = runtime()
    outcome = execution.run_job(rt, job_id, Candidate(provider, model), hop)
    if isinstance(outcome, execution.Done):
        return outcome.summary
    target = outcome.candidate
    kwargs = {"job_id": job_id, "provider": target.provider, "model": target.model, "hop": outcome.hop}
    if outcome.park_until_s is not None:
        sig = self.signature_from_request(
            kwargs=kwargs, queue=queue_name(target.provider), priority=outcome.priority
        )
        parking.park(rt.redis, dict(sig), outcome.park_until_s, job_id)
        due = datetime.fromtimestamp(outcome.park_until_s, UTC)
        raise Retry(f"parked until {due:%Y-%m-%d %H:%M:%S} UTC (quota gone until then)", when=due)
    raise self.retry(
        kwargs=kwargs,
        queue=queue_name(target.provider),
        countdown=outcome.countdown_s,
        max_retries=None,
        priority=outcome.priority,
    )


@app.task(name=FINISH_BATCH_TASK)
def finish_batch(results: list[dict[str, Any]], batch_id: str, chunk: int = 0) -> dict[str, Any]:
    """A chord's callback: record the batch summary once every job of the batch is final."""
    return batches.finish_chunk(runtime().store, batch_id, chunk, results)
