"""Jobs through the providers' own batch APIs (about half the price, answers within hours).

Which jobs go (`goes_to_batch`): a job's mode — its own, else its route's — is ``sync`` (a call
now), ``batch`` (always, where the provider has a batch API configured) or ``auto``: the batch
API when it is cheaper and its expected turnaround (observed, else configured) still meets the
job's deadline; synchronously otherwise. A job without a deadline is not sent by ``auto``.

A provider batch then takes three steps, each a Celery task on the provider's queue (nothing
sleeps in a thread): jobs are collected for `collect_s` (`hand_over`), sent as one provider
batch whose id is stored at once (`submit`), and polled with backoff until it ends, when every
result is applied once (`poll`): answers and final errors finish their jobs at the batch price;
expired, cancelled and retryable ones run synchronously. Every job's task message is then
published again under its task id, so a batch's chord counts it; the housekeeping thread
(`resume_overdue`) publishes again a step the broker lost.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from celery import Celery

from workers import dispatch
from workers.config import Candidate, Chain, ProviderConfig
from workers.constants import POLL_PROVIDER_BATCH_TASK, SUBMIT_PROVIDER_BATCH_TASK, queue_name
from workers.errors import InputError, ProviderError, RetryableError
from workers.keys import ApiKey
from workers.limiter import Costs, tenants
from workers.messages import ChatRequest
from workers.providers.batch import BatchItem, ItemResult, batch_adapter
from workers.runtime import Runtime
from workers.store import BATCHED, FAILED, SUCCEEDED, AttemptRecord, Job, ProviderBatch, aware, utcnow

log = logging.getLogger("spillway.provider_batch")

#: Polls back off to this (below the broker's visibility timeout, like every countdown).
POLL_MAX_S = 60.0
#: `auto` counts on a provider batch taking this many times its expected turnaround.
TURNAROUND_SAFETY = 1.5
#: A job that has moved this often (a provider batch left it unanswered, or a re-route) is
#: called synchronously: a batch API that keeps expiring cannot hold a job forever.
MAX_BATCH_ROUNDS = 2
#: A provider batch still running this close to its earliest job's deadline is cancelled; what
#: it has not answered is called synchronously in the time left.
CANCEL_BEFORE_DEADLINE_S = 300.0
#: A refused or failed submit is tried again this much later.
RESUBMIT_S = 30.0
#: A step this late is published again by the housekeeping thread (a second poll is harmless).
RESUME_LATE_S = 15.0
#: A batch still submitting after this long lost its worker mid-upload: it is sent again.
RESUBMIT_STUCK_S = 600.0
#: Learned turnarounds are read from the store at most this often per process.
_TURNAROUND_TTL_S = 60.0
_turnarounds: dict[str, tuple[float, float | None]] = {}


def mode_of(job: Job, chain: Chain | None) -> str:
    return job.mode or (chain.mode if chain else "sync")


def expected_turnaround_s(rt: Runtime, provider: ProviderConfig) -> float:
    """How long a provider batch takes, submit to results: the mean of its last batches,
    else the configured estimate (the providers promise 24 h; most take far less)."""
    assert provider.batch is not None
    now = time.monotonic()
    cached = _turnarounds.get(provider.name)
    if cached is None or now - cached[0] > _TURNAROUND_TTL_S:
        cached = (now, rt.store.turnaround_s(provider.name))
        _turnarounds[provider.name] = cached
    return cached[1] if cached[1] is not None else provider.batch.turnaround_s


def goes_to_batch(rt: Runtime, job: Job, candidate: Candidate, chain: Chain | None) -> bool:
    provider = rt.settings.providers.get(candidate.provider)
    if provider is None or provider.batch is None:
        return False
    mode = mode_of(job, chain)
    if job.hops >= MAX_BATCH_ROUNDS:
        return False
    if mode == "batch":
        return True
    if mode != "auto" or provider.batch.discount >= 1.0:
        return False
    deadline = aware(job.deadline_at)
    if deadline is None:
        return False
    wait_s = provider.batch.collect_s + TURNAROUND_SAFETY * expected_turnaround_s(rt, provider)
    return utcnow() + timedelta(seconds=wait_s) <= deadline


def hand_over(rt: Runtime, job: Job, candidate: Candidate) -> tuple[str, bool] | None:
    """Put a claimed job into the provider batch being collected: (its id, new)."""
    provider = rt.settings.providers[candidate.provider]
    assert provider.batch is not None
    return rt.store.hand_to_provider_batch(
        job.id,
        job.runs,
        candidate.provider,
        candidate.model,
        max_size=min(provider.batch.max_requests, batch_adapter(provider).max_requests),
        input_tokens=int(job.est_input_tokens or 0),
        deadline_at=aware(job.deadline_at),
    )


def send_submit(app: Celery, provider: str, batch_id: str, countdown_s: float) -> None:
    _send(app, SUBMIT_PROVIDER_BATCH_TASK, provider, batch_id, countdown_s)


def send_submit_when_collected(app: Celery, rt: Runtime, provider: str, batch_id: str) -> None:
    """The submit of a provider batch that began collecting just now, due once its jobs are
    gathered (`collect_s`)."""
    settings = rt.settings.providers[provider].batch
    send_submit(app, provider, batch_id, settings.collect_s if settings else 0.0)


def send_poll(app: Celery, provider: str, batch_id: str, countdown_s: float) -> None:
    _send(app, POLL_PROVIDER_BATCH_TASK, provider, batch_id, countdown_s)


def _send(app: Celery, task: str, provider: str, batch_id: str, countdown_s: float) -> None:
    """A step of a provider batch, on the provider's queue ahead of its jobs (priority 0),
    shown in Flower as `task[provider]`."""
    app.signature(
        task,
        kwargs={"batch_id": batch_id},
        queue=queue_name(provider),
        priority=0,
        countdown=countdown_s,
        shadow=f"{task}[{provider}]",
    ).apply_async(ignore_result=True)


def _items(jobs: list[Job]) -> list[BatchItem]:
    """In job id order: the order results of an inline batch (Gemini) come back in."""
    return [BatchItem(j.id, ChatRequest.from_json(j.request)) for j in sorted(jobs, key=lambda j: j.id)]


def _key(rt: Runtime, provider: str, batch_id: str, key_id: str | None = None) -> ApiKey | None:
    """The key a batch was sent with; for a new one, the provider's keys in turn (by batch id)."""
    if key_id is not None:
        return rt.keyring.get(provider, key_id)
    keys = rt.keyring.keys(provider)
    return keys[int(batch_id, 16) % len(keys)] if keys else None


def submit(rt: Runtime, app: Celery, batch_id: str) -> None:
    """Send a collected provider batch (once); schedule its first poll."""
    taken = rt.store.take_for_submit(batch_id)
    if taken is None:
        return  # submitted already, or gone
    batch, jobs = taken
    if not jobs:
        rt.store.end_provider_batch(batch_id, state="applied")
        return
    provider = rt.settings.providers.get(batch.provider)
    key = _key(rt, batch.provider, batch.id)
    if provider is None or provider.batch is None or key is None:
        _give_back(rt, app, batch, jobs, f"{batch.provider} takes no provider batches here")
        return
    jobs = _within_batch_queue(rt, app, batch, provider, jobs)
    if not jobs:
        return
    adapter = batch_adapter(provider)
    first, *rest = adapter.split(_items(jobs), provider, batch.model)  # the API's size limits
    if rest:
        more = rt.store.split_provider_batch(batch.id, [item.custom_id for chunk in rest for item in chunk])
        if more is not None:
            send_submit(app, batch.provider, more, 0)
        sent = {item.custom_id for item in first}
        jobs = [j for j in jobs if j.id in sent]
    items = first
    try:
        ref = adapter.submit(
            rt.http, provider, key.secret, batch.model, items, metadata={"spillway": batch.id}
        )
    except RetryableError as exc:  # a full batch queue (429), an outage: try again later
        wait_s = max(RESUBMIT_S, exc.signal.retry_after_s or 0.0) if exc.signal else RESUBMIT_S
        if _too_late(batch, wait_s, rt, provider):
            _give_back(rt, app, batch, jobs, f"not accepted in time: {exc}")
            return
        log.warning("provider batch %s not accepted (%s); again in %.0f s", batch.id, exc, wait_s)
        rt.store.retake_for_submit(batch.id)
        send_submit(app, batch.provider, batch.id, min(wait_s, POLL_MAX_S))
        return
    except (ProviderError, InputError) as exc:  # refused for good (or too big for any batch)
        _give_back(rt, app, batch, jobs, f"refused: {exc}")
        return
    now = utcnow()
    rt.store.provider_batch_submitted(
        batch.id,
        ref=ref,
        key_id=key.key_id,
        expected_at=now + timedelta(seconds=expected_turnaround_s(rt, provider)),
        next_poll_at=now + timedelta(seconds=provider.batch.poll_s),
    )
    log.info("provider batch %s: %d jobs sent to %s:%s", batch.id, len(items), batch.provider, batch.model)
    send_poll(app, batch.provider, batch.id, provider.batch.poll_s)


def _within_batch_queue(
    rt: Runtime, app: Celery, batch: ProviderBatch, provider: ProviderConfig, jobs: list[Job]
) -> list[Job]:
    """The jobs the provider's batch queue (`queue_tokens` of enqueued input per model) has room
    for now; the rest wait in a new batch, sent when earlier ones have ended (or called now if
    that would be too late for them)."""
    assert provider.batch is not None
    limit = provider.batch.queue_tokens
    if limit is None:
        return jobs
    room = limit - rt.store.enqueued_tokens(batch.provider, batch.model)
    now, later, used = [], [], 0
    for job in sorted(jobs, key=lambda j: j.id):
        tokens = int(job.est_input_tokens or 0)
        if used + tokens <= room:
            now.append(job)
            used += tokens
        else:
            later.append(job)
    if not later:
        return now
    wait_s = POLL_MAX_S
    if _too_late(batch, wait_s, rt, provider):
        if not now:
            _give_back(rt, app, batch, jobs, "the batch queue is full until after the deadline")
            return []
        _give_back_some(rt, app, later)
        return now
    if not now:  # nothing fits yet: the whole batch waits
        rt.store.retake_for_submit(batch.id)
        send_submit(app, batch.provider, batch.id, wait_s)
        return []
    waiting = rt.store.split_provider_batch(batch.id, [j.id for j in later])
    if waiting is not None:
        log.info("provider batch %s: %d job(s) wait for room in the batch queue", batch.id, len(later))
        send_submit(app, batch.provider, waiting, wait_s)
    return now


def _give_back_some(rt: Runtime, app: Celery, jobs: list[Job]) -> None:
    """Jobs out of a batch being submitted, queued again for a synchronous call."""
    rt.store.back_in_line([j.id for j in jobs], sync=True)
    _publish_again(rt, app, [job for j in jobs if (job := rt.store.job(j.id)) is not None])


def _too_late(batch: ProviderBatch, wait_s: float, rt: Runtime, provider: ProviderConfig) -> bool:
    deadline = aware(batch.deadline_at)
    if deadline is None:
        return False
    needed = wait_s + TURNAROUND_SAFETY * expected_turnaround_s(rt, provider)
    return utcnow() + timedelta(seconds=needed) > deadline


def poll(rt: Runtime, app: Celery, batch_id: str) -> None:
    """Look at a submitted provider batch once: schedule the next look, or apply its results."""
    batch = rt.store.provider_batch(batch_id)
    if batch is None or batch.state != "submitted" or not batch.ref:
        return
    provider = rt.settings.providers.get(batch.provider)
    key = _key(rt, batch.provider, batch.id, batch.key_id)
    if provider is None or provider.batch is None or key is None:
        log.error("provider batch %s: %s or its key is gone from the config", batch.id, batch.provider)
        return  # kept in the store: a worker that has them resumes it
    adapter = batch_adapter(provider)
    # back off from poll_s, but never past a tenth of the expected turnaround: a batch that
    # takes 30 s is seen done within a few seconds, one that takes hours once a minute
    ceiling = min(POLL_MAX_S, max(provider.batch.poll_s, expected_turnaround_s(rt, provider) / 10))
    next_s = min(ceiling, provider.batch.poll_s * 1.5 ** (batch.polls + 1))
    try:
        state = adapter.state(rt.http, provider, key.secret, batch.ref)
        results = None
        if state.ended:
            jobs = rt.store.provider_batch_jobs(batch.id)
            results = (
                []
                if state.failed_whole
                else adapter.results(rt.http, provider, key.secret, batch.ref, _items(jobs))
            )
    except ProviderError as exc:
        log.warning("provider batch %s: could not look (%s); again in %.0f s", batch.id, exc, next_s)
        rt.store.provider_batch_polled(
            batch.id,
            provider_status="unknown",
            done=batch.done,
            next_poll_at=utcnow() + timedelta(seconds=next_s),
        )
        send_poll(app, batch.provider, batch.id, next_s)
        return
    if results is None:
        _cancel_if_late(rt, batch, provider, key, state.status)
        rt.store.provider_batch_polled(
            batch.id,
            provider_status=state.status,
            done=state.done,
            next_poll_at=utcnow() + timedelta(seconds=next_s),
        )
        send_poll(app, batch.provider, batch.id, next_s)
        return
    apply(rt, app, batch, provider, results, failed_whole=state.failed_whole)


def _cancel_if_late(
    rt: Runtime, batch: ProviderBatch, provider: ProviderConfig, key: ApiKey, status: str
) -> None:
    """Cancel a provider batch that is still running close to its earliest job's deadline:
    what it answered stays, the rest is called synchronously in the time left."""
    deadline = aware(batch.deadline_at)
    if deadline is None or "cancel" in status.lower():
        return
    if utcnow() + timedelta(seconds=CANCEL_BEFORE_DEADLINE_S) < deadline:
        return
    log.warning(
        "provider batch %s is not done %.0f s before its deadline: cancelling it",
        batch.id,
        CANCEL_BEFORE_DEADLINE_S,
    )
    try:
        batch_adapter(provider).cancel(rt.http, provider, key.secret, batch.ref or "")
    except ProviderError as exc:
        log.warning("provider batch %s: the cancel failed (%s); asked again at the next poll", batch.id, exc)


def _late(job: Job) -> bool:
    """Too close to its deadline for another provider batch."""
    deadline = aware(job.deadline_at)
    return deadline is not None and utcnow() + timedelta(seconds=CANCEL_BEFORE_DEADLINE_S) >= deadline


def apply(
    rt: Runtime,
    app: Celery,
    batch: ProviderBatch,
    provider: ProviderConfig,
    results: list[ItemResult],
    *,
    failed_whole: str | None = None,
) -> None:
    """Write each answer once (a result applied before is skipped by the store), hand the
    rest to synchronous calls, then publish every job's task again for its chord."""
    assert provider.batch is not None
    waiting = {j.id: j for j in rt.store.provider_batch_jobs(batch.id) if j.status == BATCHED}
    jobs_by_id = dict(waiting)
    model = provider.models.get(batch.model)
    discount = provider.batch.discount
    started = aware(batch.submitted_at) or utcnow()
    latency_ms = (utcnow() - started).total_seconds() * 1000
    back: list[str] = []
    for result in results:
        job = waiting.pop(result.custom_id, None)
        if job is None:
            continue
        common: dict[str, Any] = {
            "provider": batch.provider,
            "model": batch.model,
            "started_at": started,
            "task_type": job.task_type,
            "tier": job.tier,
            "key_id": batch.key_id,
            "latency_ms": latency_ms,
            "provider_batch_id": batch.id,
        }
        if result.outcome == "succeeded":
            list_price = model.cost_usd(result.input_tokens, result.output_tokens) if model else 0.0
            cost = list_price * discount
            tokens = {"input_tokens": result.input_tokens, "output_tokens": result.output_tokens}
            stored = rt.store.finish(
                job.id,
                job.runs,
                AttemptRecord(
                    outcome=SUCCEEDED, cost_usd=cost, saved_usd=list_price - cost, **tokens, **common
                ),
                status=SUCCEEDED,
                provider=batch.provider,
                model=batch.model,
                key_id=batch.key_id,
                text=result.text,
                finish_reason=result.finish_reason,
                cost_usd=cost,
                **tokens,
            )
            if stored:
                _ended(rt, app, job, result.input_tokens + result.output_tokens)
        elif (
            result.outcome == "failed"
            and result.error is not None
            and not isinstance(result.error, RetryableError)
        ):
            error = f"{batch.provider} (provider batch): {result.error.message}"
            stored = rt.store.finish(
                job.id,
                job.runs,
                AttemptRecord(outcome=result.error.kind, error=error, **common),
                status=FAILED,
                provider=batch.provider,
                model=batch.model,
                error=error,
                error_kind=result.error.kind,
            )
            if stored:
                _ended(rt, app, job, 0)
        else:  # expired, cancelled, or a failure worth another try: a synchronous call
            back.append(job.id)
    back += list(waiting)  # never answered at all
    if back:
        why = failed_whole or "expired, cancelled or failed for now"
        log.warning("provider batch %s: %d job(s) go synchronous (%s)", batch.id, len(back), why)
    late = {job_id for job_id in back if _late(jobs_by_id[job_id])}
    rt.store.back_in_line([j for j in back if j not in late])
    rt.store.back_in_line(sorted(late), sync=True)
    # Only the apply that ends the batch publishes: a duplicate message for a job would count
    # twice in its chord. (One that dies first leaves the reconciler to send the jobs sent back
    # and to complete the batch.)
    if rt.store.end_provider_batch(batch.id, state="applied", error=failed_whole):
        _publish_again(rt, app, rt.store.provider_batch_jobs(batch.id))


def _ended(rt: Runtime, app: Celery, job: Job, used_tokens: int) -> None:
    """This apply made the job final: its tenant gets back what it held and did not use, and
    its callback is sent (the run that handed it over could not)."""
    if job.tenant is not None:
        held = int(Costs.estimate(job.est_input_tokens, job.request["max_tokens"]).tokens)
        submitted = aware(job.created_at) or utcnow()
        tenants.give_back(rt.redis, rt.keys, rt.settings, job.tenant, held - used_tokens, submitted)
    if job.callback_url:
        dispatch.deliver_callback(app, job.id)


def _give_back(rt: Runtime, app: Celery, batch: ProviderBatch, jobs: list[Job], why: str) -> None:
    log.warning("provider batch %s: %s; its %d job(s) are called synchronously", batch.id, why, len(jobs))
    rt.store.back_in_line([j.id for j in jobs], sync=True)
    if rt.store.end_provider_batch(batch.id, state="refused", error=why):
        _publish_again(rt, app, rt.store.provider_batch_jobs(batch.id))


def _publish_again(rt: Runtime, app: Celery, jobs: list[Job]) -> None:
    """Each job's own task message again: a final one completes its chord slot, one sent back
    runs synchronously."""
    for job in jobs:
        dispatch.republish_job(app, job, rt.priority(job.tier))


def resume_overdue(rt: Runtime, app: Celery) -> int:
    """Publish again the next step of provider batches whose task the broker lost (a Redis
    that restarted empty) or whose worker died: a late submit or a late poll. A batch stuck
    in submitting is sent again only long after any upload could still be running."""
    collect_s = max((p.batch.collect_s for p in rt.settings.providers.values() if p.batch), default=0.0)
    overdue = rt.store.overdue_provider_batches(
        collecting_s=collect_s + RESUME_LATE_S, submitting_s=RESUBMIT_STUCK_S, poll_late_s=RESUME_LATE_S
    )
    for batch in overdue:
        if batch.state == "submitting" and _found_at_provider(rt, app, batch):
            continue
        if batch.state == "submitting":
            # its worker died while sending it and the provider does not list it: send it again
            rt.store.retake_for_submit(batch.id)
        if batch.state in ("collecting", "submitting"):
            send_submit(app, batch.provider, batch.id, 0)
        else:
            send_poll(app, batch.provider, batch.id, 0)
    return len(overdue)


def _found_at_provider(rt: Runtime, app: Celery, batch: ProviderBatch) -> bool:
    """A batch whose worker died after the provider took it but before its id was stored: the
    provider lists it by Spillway's batch id (OpenAI's metadata, Gemini's display name), so it
    is polled, not paid for twice. Anthropic's batches carry no such mark."""
    provider = rt.settings.providers.get(batch.provider)
    key = _key(rt, batch.provider, batch.id)
    if provider is None or provider.batch is None or key is None:
        return False
    try:
        ref = batch_adapter(provider).find(rt.http, provider, key.secret, batch.id)
    except ProviderError as exc:
        log.warning("provider batch %s: could not ask %s for it (%s)", batch.id, batch.provider, exc)
        return True  # not now: asked again at the next round, never sent twice blind
    if ref is None:
        return False
    now = utcnow()
    rt.store.provider_batch_submitted(
        batch.id,
        ref=ref,
        key_id=key.key_id,
        expected_at=now + timedelta(seconds=expected_turnaround_s(rt, provider)),
        next_poll_at=now,
    )
    log.warning("provider batch %s was at %s already (%s): polling it", batch.id, batch.provider, ref)
    send_poll(app, batch.provider, batch.id, 0)
    return True


def in_flight(rt: Runtime) -> list[dict[str, Any]]:
    """Provider batches not yet applied, for `spillway status`."""
    now = utcnow()
    rows = []
    for b in rt.store.provider_batches():
        created = aware(b.created_at) or now
        expected: datetime | None = aware(b.expected_at)
        rows.append(
            {
                "id": b.id,
                "provider": b.provider,
                "model": b.model,
                "state": b.state,
                "provider_status": b.provider_status or "",
                "jobs": b.size,
                "done": b.done,
                "age_s": (now - created).total_seconds(),
                "expected_in_s": (expected - now).total_seconds() if expected else None,
            }
        )
    return rows
