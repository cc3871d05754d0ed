"""A job run by the process that submitted it, when its provider has room at once.

`spillway serve` answers a chat completion fastest by making the call itself: no broker hop,
no worker thread to wake, no second process to hear from. It is the same run as a worker's
(`execution.run_claimed`: the store's claim and lease, the limiter, the ledger, the
finished-job announcement), so every limit and every promise holds; only the message is
missing, and the claim is written with the job (`JobStore.add_jobs(running=)`). What
cannot finish here goes on as any job does: a job that must wait, move to another provider
or join a provider batch is published to its queue (or parked) by this process, as the worker
task would have done. A process that dies mid-call leaves a claimed job whose lease runs out;
with no message carrying it, the reconciler publishes it again (`workers.reconciler`) and its
next run charges the lost call at its estimate, once.

Flower shows only what goes through the broker: jobs finished here appear in the store, in
`spillway status`, `spillway usage` and the metrics, not as Flower tasks.
"""

from __future__ import annotations

import logging

from celery import Celery

from workers import dispatch, execution, parking, provider_batch
from workers.config import Candidate
from workers.runtime import Runtime
from workers.store import Job

log = logging.getLogger("spillway.inline")


def run_here(app: Celery, rt: Runtime, target: dispatch.Target, job: Job) -> None:
    """Run the unpublished job `target`, stored claimed for this run (`job`), now; hand it to
    the broker if it cannot finish here. A run that fails unexpectedly (the store or Redis went
    away) is published for a worker, or left for the reconciler when that fails too."""
    try:
        # never counted as queued (`producer.jobs.submit_many`): its acquire takes nothing off
        outcome = execution.run_claimed(
            rt, job, Candidate(target.provider, target.model), target.hop, queued=False
        )
    except Exception as exc:  # a worker's task would be retried by Celery: here, a worker takes it
        # Published uncounted: the worker's first acquire takes its costs off the provider's
        # queued count, which stops at zero, so placement may see the queue a job short.
        log.warning("job %s: running it here failed (%s); publishing it", target.job_id, type(exc).__name__)
        _publish(app, target)
        return
    try:
        _hand_on(app, rt, target, outcome)
    except Exception as exc:  # the job is stored: the reconciler publishes it
        log.error("job %s: could not hand it on (%s); the reconciler will publish it", target.job_id, exc)


def _hand_on(app: Celery, rt: Runtime, target: dispatch.Target, outcome: execution.Outcome) -> None:
    """What the worker task does with an outcome, for a job that has no message yet."""
    if isinstance(outcome, execution.Done):
        if outcome.notify:
            dispatch.deliver_callback(app, target.job_id)
        return
    if isinstance(outcome, execution.InBatch):
        if outcome.created:  # the provider batch's poller publishes the job when it is done
            provider_batch.send_submit_when_collected(app, rt, outcome.provider, outcome.batch_id)
        return
    moved = dispatch.Target(
        target.job_id,
        outcome.candidate.provider,
        outcome.candidate.model,
        outcome.priority,
        outcome.hop,
        target.task_id,
        outcome.reservation,
    )
    if outcome.park_until_s is not None:
        signature = dict(dispatch.job_signature(app, moved, ignore_result=True))
        parking.park(rt.redis, rt.keys, signature, outcome.park_until_s, target.job_id)
    else:
        countdown = outcome.countdown_s or None
        dispatch.job_signature(app, moved).apply_async(countdown=countdown, ignore_result=True)


def _publish(app: Celery, target: dispatch.Target) -> None:
    try:
        dispatch.publish_jobs(app, [target])
    except Exception as exc:  # the job is stored: the reconciler publishes it
        log.error("job %s: the broker refused it (%s); the reconciler will publish it", target.job_id, exc)
