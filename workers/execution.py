"""One run of one job on one provider: the job's state machine.

This is the one large function of Spillway, on purpose: every way a run can end is here,
in order, and `tests/test_execution.py` walks each of them. A run:

1. claims the job in the store (a lease: one worker at a time; a dead worker's lease runs
   out; a job whose workers keep dying is failed as poison);
2. acquires the tokens right before the call (waiting inline if the bucket refills soon,
   else moving on: another provider with room, a countdown, or parking until a daily reset —
   `workers.router.next_hop` decides which, here it is carried out);
3. calls the provider and settles: real usage charged, the rest refunded, the provider's
   headers learned, a 429's retry time turned into a block for every process;
4. records the attempt and either finishes the job or hands it on (`Requeue`; after an error,
   `next_hop` again decides where).

It never raises for a provider error, so a chord's callback always runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import redis

from workers import cache, notify, parking, provider_batch
from workers.alerts import quota_crossed
from workers.config import Candidate, Chain
from workers.errors import (
    AuthError,
    InputError,
    NoRouteError,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    RetryableError,
    ServiceUnavailable,
)
from workers.limiter import DIMENSIONS, RESERVED, Costs, Lease, Reserved, Settled, Wait, tenants
from workers.messages import ChatRequest
from workers.providers.transport import complete
from workers.router import AfterError, Fail, JobFacts, Move, NoRoom, Park, Reason, next_hop
from workers.runtime import Runtime
from workers.store import (
    FAILED,
    IN_DOUBT,
    SUCCEEDED,
    AttemptRecord,
    FirstRun,
    Job,
    as_finished,
    aware,
    utcnow,
)
from workers.strategies import Option

log = logging.getLogger("spillway.execution")

#: A billing quota (insufficient_quota, spend cap) without a stated end blocks its account this long.
QUOTA_BLOCK_S = 86_400.0


@dataclass(frozen=True)
class Done:
    """The job is final; `summary` is what the task returns (small, same on every redelivery).
    `notify`: this run made it final and its submitter asked for a callback."""

    summary: dict[str, Any]
    notify: bool = False


@dataclass(frozen=True)
class Requeue:
    """Publish the job again: to `candidate`'s queue after `countdown_s`, or park it until
    `park_until_s` (epoch seconds) when the wait is longer than a countdown may be.
    `reservation`: the budget it waits for is already its own (redeemed when it runs)."""

    candidate: Candidate
    hop: int
    priority: int
    countdown_s: float = 0.0
    park_until_s: float | None = None
    reservation: str | None = None


@dataclass(frozen=True)
class InBatch:
    """The job waits in a provider batch (`workers.provider_batch`); `created`: this run began
    collecting that batch, so its submit is to be scheduled."""

    batch_id: str
    provider: str
    created: bool = False


Outcome = Done | Requeue | InBatch


def summary(job: Job) -> dict[str, Any]:
    """A pure function of the job's final state, so a redelivered task returns the same value."""
    return summary_of(
        job.id,
        job.status,
        job.provider,
        job.model,
        job.input_tokens,
        job.output_tokens,
        job.cost_usd,
        job.error_kind,
    )


def summary_of(
    job_id: str,
    status: str,
    provider: str | None,
    model: str | None,
    input_tokens: int | None,
    output_tokens: int | None,
    cost_usd: float | None,
    error_kind: str | None,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": status,
        "provider": provider,
        "model": model,
        "input_tokens": input_tokens or 0,
        "output_tokens": output_tokens or 0,
        "cost_usd": round(cost_usd or 0.0, 8),
        "error_kind": error_kind,
    }


def lease_seconds(rt: Runtime, provider: str) -> float:
    config = rt.settings.providers.get(provider)
    timeout = config.timeout_s + config.connect_timeout_s if config else 60.0
    return timeout + rt.settings.inline_wait_s + rt.settings.lease_margin_s


def _chain(rt: Runtime, job: Job) -> Chain | None:
    try:
        return rt.settings.chain(job.task_type, job.tier)
    except InputError:  # the config changed since the job was submitted
        return None


def _cached(rt: Runtime, key: str) -> cache.CachedAnswer | None:
    try:
        return cache.lookup(rt.redis, key)
    except redis.RedisError:
        return None  # a cache that does not answer is a miss


def _priority(rt: Runtime, job: Job) -> int:
    return rt.priority(job.tier) if job.tier in rt.settings.tiers else 5


def _estimate(job: Job) -> Costs:
    """What admission reserves for a job: its input estimate and its max_tokens (stored with
    its request, which need not be parsed for it)."""
    return Costs.estimate(job.est_input_tokens, job.request["max_tokens"])


def _at_estimate(rt: Runtime, job: Job, candidate: Candidate) -> AttemptRecord:
    """A run's call on `candidate` at the estimate (the input estimate and max_tokens): what
    the ledger charges for a run whose worker died (`JobStore.claim` puts it in doubt)."""
    estimate = _estimate(job)
    provider = rt.settings.providers.get(candidate.provider)
    model = provider.models.get(candidate.model) if provider else None
    return AttemptRecord(
        provider=candidate.provider,
        model=candidate.model,
        outcome=IN_DOUBT,
        started_at=utcnow(),
        task_type=job.task_type,
        tier=job.tier,
        input_tokens=int(estimate.input),
        output_tokens=int(estimate.output),
        cost_usd=model.cost_usd(int(estimate.input), int(estimate.output)) if model else 0.0,
    )


def run_job(
    rt: Runtime,
    job_id: str,
    candidate: Candidate,
    hop: int = 0,
    reservation: str | None = None,
    *,
    queued: bool = True,
) -> Outcome:
    """Run one delivery of a job on `candidate`. `queued=False`: the job was never counted as
    queued there (`workers.inline`), so its first acquire takes nothing off that count."""
    claim = rt.store.claim(
        job_id,
        lease_s=lease_seconds(rt, candidate.provider),
        max_crashes=rt.settings.max_crashes,
        estimate=lambda job: _at_estimate(rt, job, candidate),
    )
    if reservation is not None and claim.state in ("missing", "final", "poison", "batched"):
        release_reservation(rt, candidate, reservation)  # this delivery will not redeem it
    if claim.state == "missing":
        log.warning("job %s is not in the store; dropping its message", job_id)
        return Done({"job_id": job_id, "status": "missing"})
    job = claim.job
    if claim.state == "poison":
        log.error("job %s failed: %s", job_id, job.error)
        notify.finished(rt, job_id)
    if claim.state in ("final", "poison"):
        return Done(summary(job), notify=claim.state == "poison" and bool(job.callback_url))
    if claim.state == "busy":  # another delivery of this job is running it right now
        wait_s = min(claim.busy_for_s + 1, rt.settings.max_countdown_s)
        return Requeue(candidate, hop, _priority(rt, job), countdown_s=wait_s, reservation=reservation)
    if claim.state == "batched":  # a stray delivery: the provider batch's poller answers for it
        return InBatch(job.provider_batch_id or "", job.provider or candidate.provider)
    return run_claimed(rt, job, candidate, hop, reservation, queued=queued)


def release_reservation(rt: Runtime, candidate: Candidate, reservation: str) -> None:
    """Give back the budget a job reserved on `candidate` and will not use (it is final, or
    cancelled): jobs behind it need not wait for its turn. Left to expire if Redis is away."""
    try:
        rt.limiter.release(candidate, reservation)
    except ServiceUnavailable as exc:
        log.warning("could not give back reservation %s on %s: %s", reservation, candidate.provider, exc)


def first_run(rt: Runtime, candidate: Candidate) -> FirstRun:
    """The claim of a job's first run on `candidate`, for a job stored already claimed by the
    process that runs it (`JobStore.add_jobs(running=)`, `workers.inline`)."""
    return FirstRun(lease_seconds(rt, candidate.provider))


def run_claimed(
    rt: Runtime,
    job: Job,
    candidate: Candidate,
    hop: int = 0,
    reservation: str | None = None,
    *,
    queued: bool = True,
) -> Outcome:
    """Run a job this process has claimed (`run_job`, or stored claimed: `first_run`)."""
    if provider_batch.goes_to_batch(rt, job, candidate, _chain(rt, job)):
        handed = provider_batch.hand_over(rt, job, candidate)
        if handed is not None:
            return InBatch(handed[0], candidate.provider, created=handed[1])
    return _Run(rt, job, candidate, hop, reservation).start(queued=queued)


class _Run:
    """The state of one claimed run; methods are the steps of `run_job`."""

    def __init__(
        self, rt: Runtime, job: Job, candidate: Candidate, hop: int, reservation: str | None
    ) -> None:
        self.rt = rt
        self.job = job
        self.candidate = candidate
        self.hop = hop
        self.reservation = reservation
        self.request = ChatRequest.from_json(job.request)
        self.costs = _estimate(job)
        self.share = rt.settings.tiers[job.tier].budget_share if job.tier in rt.settings.tiers else 1.0
        self.chain = _chain(rt, job)
        ttl = self.chain.cache_ttl_s if self.chain else None
        self.cache_key = (
            cache.cache_key(rt.keys, self.chain, job.task_type, job.tier, self.request) if ttl else None
        )

    # -- admission ----------------------------------------------------------------------------

    def start(self, *, queued: bool = True) -> Outcome:
        rt, candidate = self.rt, self.candidate
        if not self._servable(candidate):
            return self._move_on(NoRoom(Wait.never(f"{candidate.provider} is not usable here")))
        if self.cache_key is not None:
            answer = _cached(rt, self.cache_key)
            if answer is not None:
                return self._answer_from_cache(answer)
        give_up_at = time.monotonic() + rt.settings.inline_wait_s
        reservation = self.reservation
        # A job counted as queued is taken off that count at its first acquire; a reserved one
        # was never counted (its budget is already taken).
        dequeue: Costs | None = self.costs if queued and not reservation else None
        while True:
            try:
                grant = rt.limiter.acquire(
                    candidate,
                    self.costs,
                    share=self.share,
                    lease_ttl_s=lease_seconds(rt, candidate.provider),
                    dequeue=dequeue,
                    reservation=reservation,
                )
            except ServiceUnavailable as exc:
                # Never call a provider unlimited: wait for the limiter to come back.
                log.warning("job %s waits: %s", self.job.id, exc)
                return self._requeue(None, candidate, countdown_s=5.0, hop=False, reservation=reservation)
            dequeue = None
            if isinstance(grant, Lease):
                if grant.crossed:
                    quota_crossed(grant, rt.env.alert_webhook_url)
                return self._call(grant)
            left_s = give_up_at - time.monotonic()
            if reservation is not None and grant.wait.why == RESERVED:  # it came early
                if grant.wait.seconds <= left_s:
                    time.sleep(grant.wait.seconds)
                    continue
                wait_s = grant.wait.seconds
                return self._requeue(None, candidate, countdown_s=wait_s, hop=False, reservation=reservation)
            if grant.wait.is_never or grant.wait.seconds > left_s:
                return self._move_on(NoRoom(grant.wait))
            reservation = None
            if grant.wait.why in DIMENSIONS:  # the budget is short: take the next of it, then wait
                held = self._reserve(candidate, within_s=left_s)
                if held is not None:
                    time.sleep(held.wait_s)
                    reservation = held.reservation_id
                    continue
            time.sleep(max(grant.wait.seconds, 0.005))

    def _servable(self, candidate: Candidate) -> bool:
        provider = self.rt.settings.providers.get(candidate.provider)
        return (
            provider is not None
            and candidate.model in provider.models
            and self.rt.keyring.usable(candidate.provider)
        )

    def _move_on(self, reason: Reason, record: AttemptRecord | None = None) -> Outcome:
        """The job cannot run here now: gather what the router needs, let `next_hop` decide
        (`workers.router`), and carry it out. `record`: the failed call's attempt, if any."""
        options = self._options(reason)
        decision = next_hop(
            self.candidate,
            options,
            self._facts(),
            reason,
            clock=self.rt.limiter.now_s,
            turns=self.rt.router.turns,
        )
        if isinstance(decision, Fail):  # it waits nowhere: not counted as queued
            return self._fail(record, decision.reason, decision.kind)
        if (
            isinstance(decision, Move)
            and decision.countdown_s > 0
            and self._worth_reserving(reason, decision)
        ):
            # It waits for budget: take the slot it waits for now, so it waits once.
            held = self._reserve(decision.target, within_s=self.rt.settings.max_countdown_s)
            if held is not None:
                hopped = decision.hop_increment > 0
                return self._requeue(
                    record,
                    held.candidate,
                    countdown_s=held.wait_s,
                    hop=hopped,
                    reservation=held.reservation_id,
                )
        self._count_queued(decision.target)
        if isinstance(decision, Park):
            return self._requeue(
                record, decision.target, park_until_s=decision.until_s, hop=decision.hop_increment > 0
            )
        if decision.rerouted is not None:
            record = self._attempt("rerouted", called=False, error=decision.rerouted)
        return self._requeue(
            record, decision.target, countdown_s=decision.countdown_s, hop=decision.hop_increment > 0
        )

    def _options(self, reason: Reason) -> list[Option]:
        """The candidates' expected waits: after no room, the others'; after an error, every
        one's (none to read when the error ends the job anyway)."""
        rt, job = self.rt, self.job
        if isinstance(reason, AfterError) and reason.ends_the_job(self.hop, rt.settings.max_hops):
            return []
        try:
            candidates = rt.router.candidates(job.task_type, job.tier)
            if isinstance(reason, NoRoom):
                candidates = [c for c in candidates if c != self.candidate]
            return rt.router.options(candidates, self.costs, self.share) if candidates else []
        except (NoRouteError, ServiceUnavailable):
            return []

    def _facts(self) -> JobFacts:
        deadline = aware(self.job.deadline_at)
        return JobFacts(
            strategy=self.chain.strategy if self.chain else "ordered",
            hop=self.hop,
            max_hops=self.rt.settings.max_hops,
            max_countdown_s=self.rt.settings.max_countdown_s,
            deadline_s=deadline.timestamp() if deadline is not None else None,
        )

    # -- the call -----------------------------------------------------------------------------

    def _call(self, lease: Lease) -> Outcome:
        rt, candidate = self.rt, self.candidate
        provider = rt.settings.providers[candidate.provider]
        started, clock = utcnow(), time.monotonic()
        try:
            completion = complete(rt.http, provider, candidate.model, self.request, lease.key.secret)
        except ProviderError as exc:
            return self._after_error(lease, exc, started, (time.monotonic() - clock) * 1000)
        latency_ms = (time.monotonic() - clock) * 1000
        cost = rt.settings.model(candidate).cost_usd(completion.input_tokens, completion.output_tokens)
        record = self._attempt(
            SUCCEEDED,
            called=True,
            key_id=lease.key.key_id,
            latency_ms=latency_ms,
            started=started,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=cost,
        )
        result = {
            "status": SUCCEEDED,
            "provider": candidate.provider,
            "model": candidate.model,
            "key_id": lease.key.key_id,
            "text": completion.text,
            "finish_reason": completion.finish_reason,
            "input_tokens": completion.input_tokens,
            "output_tokens": completion.output_tokens,
            "cost_usd": cost,
            "error": None,
            "error_kind": None,
        }
        stored = rt.store.finish(self.job.id, self.job.runs, record, **result)
        if stored:  # a waiting `spillway serve` answers now, before the limiter is settled
            notify.finished(rt, self.job.id, lambda: as_finished(self.job, record, **result))
        # the ledger first (above), then the limiter: a crash in between costs a refund, not a record
        estimated = self.job.est_input_tokens
        self._settle(
            lease,
            actual=Costs(
                1,
                completion.input_tokens + completion.output_tokens,
                completion.input_tokens,
                completion.output_tokens,
            ),
            outcome="alive",
            signal=completion.signal,
            input_ratio=completion.input_tokens / estimated if estimated > 0 else None,
        )
        if not stored:  # another run of this job finished first: its result is the one
            return Done(summary(rt.store.job(self.job.id)))
        self._give_back_to_tenant(completion.input_tokens + completion.output_tokens)
        if self.cache_key is not None and completion.finish_reason != "error":
            answer = cache.CachedAnswer(
                candidate.provider, candidate.model, completion.text, completion.finish_reason
            )
            with contextlib.suppress(redis.RedisError):
                cache.store(rt.redis, self.cache_key, answer, self.chain.cache_ttl_s)
        return Done(
            notify=bool(self.job.callback_url),
            summary=summary_of(
                self.job.id,
                SUCCEEDED,
                candidate.provider,
                candidate.model,
                completion.input_tokens,
                completion.output_tokens,
                cost,
                None,
            ),
        )

    def _settle(self, lease: Lease, **kwargs: Any) -> Settled | None:
        rt = self.rt
        try:
            settled = rt.limiter.settle(lease, **kwargs)
            # a probe decided the circuit: jobs parked behind it look again now (it is back) or
            # at the next probe (still down), not at the end of the probe's own long lease
            due_s = rt.limiter.now_s() if settled.recovered else settled.reprobe_at_s
            if due_s:
                with contextlib.suppress(redis.RedisError):  # they wake at their time anyway
                    parking.wake(rt.redis, rt.keys, lease.provider, due_s)
            return settled
        except ServiceUnavailable as exc:  # the lease expires on its own; the result still counts
            log.warning("could not settle lease of job %s: %s", self.job.id, exc)
            return None

    def _after_error(self, lease: Lease, exc: ProviderError, started: Any, latency_ms: float) -> Outcome:
        """Tell the limiter what the error means, record the attempt, decide where to go."""
        signal = exc.signal
        nothing = Costs(0, 0, 0, 0)
        one_request = Costs(1, 0, 0, 0)
        if isinstance(exc, RateLimited):
            now = signal.received_at_s if signal else time.time()
            block_s = (exc.retry_at_s or now + 1) - now
            window = "daily" if exc.per_day else "per-minute"
            self._settle(
                lease,
                actual=one_request,
                outcome="alive",
                signal=signal,
                block_s=block_s,
                block_why=f"429 ({window} quota) until the provider's retry time",
                # A provider that sends no rate-limit headers says only "too many": learn a
                # lower limit from it (AIMD). One that sends them is read from its headers.
                learn_lower=self.rt.settings.providers[lease.provider].signals == "none"
                and not exc.per_day
                and not (signal and signal.windows),
            )
        elif isinstance(exc, QuotaExhausted):
            now = signal.received_at_s if signal else time.time()
            block_s = (exc.retry_at_s - now) if exc.retry_at_s else QUOTA_BLOCK_S
            self._settle(
                lease,
                actual=nothing,
                outcome="alive",
                block_s=block_s,
                block_account=True,
                block_why=f"billing quota exhausted ({exc.message[:80]})",
            )
        elif isinstance(exc, AuthError):
            settled = self._settle(
                lease,
                actual=nothing,
                outcome="alive",
                disable_why=f"rejected by the provider (HTTP {exc.status})",
            )
            if settled is not None and settled.newly_disabled:  # one line per key, however many calls
                log.error(
                    "%s key %s disabled: the provider rejected it (%s)",
                    lease.provider,
                    lease.key.key_id,
                    exc.status,
                )
        elif isinstance(exc, RetryableError):  # 5xx, 529/503, timeouts, resets, malformed bodies
            self._settle(lease, actual=one_request, outcome="failed", signal=signal)
        else:
            self._settle(lease, actual=nothing, outcome="alive", signal=signal)
        record = self._attempt(
            exc.kind,
            called=True,
            error=str(exc),
            key_id=lease.key.key_id,
            latency_ms=latency_ms,
            started=started,
        )
        return self._move_on(AfterError(exc), record)

    def _answer_from_cache(self, answer: cache.CachedAnswer) -> Outcome:
        """An identical request was answered lately: no quota spent, no call made."""
        stored = self.rt.store.finish(
            self.job.id, self.job.runs, None, status=SUCCEEDED, **answer.result_columns()
        )
        if not stored:
            return Done(summary(self.rt.store.job(self.job.id)))
        notify.finished(self.rt, self.job.id)
        return Done(
            summary_of(self.job.id, SUCCEEDED, answer.provider, answer.model, 0, 0, 0.0, None),
            notify=bool(self.job.callback_url),
        )

    def _worth_reserving(self, reason: Reason, move: Move) -> bool:
        """Only budget is reserved: here, when a bucket is what lacks (a concurrency wait is a
        moment and is checked when the job runs); elsewhere, the limiter checks it."""
        return move.target != self.candidate or (isinstance(reason, NoRoom) and reason.wait.why in DIMENSIONS)

    def _reserve(self, target: Candidate, *, within_s: float) -> Reserved | None:
        """The next budget `target` has for this job, if it is back within `within_s`."""
        try:
            held = self.rt.limiter.reserve(
                target,
                self.costs,
                share=self.share,
                within_s=within_s,
                lease_ttl_s=lease_seconds(self.rt, target.provider),
            )
        except ServiceUnavailable as exc:
            log.warning("could not reserve for job %s: %s", self.job.id, exc)
            return None
        return held if isinstance(held, Reserved) else None

    def _count_queued(self, target: Candidate) -> None:
        """The job waits in `target`'s queue again: placement must see it there."""
        try:
            self.rt.limiter.add_pending({target: self.costs})
        except ServiceUnavailable as exc:
            log.warning("could not count job %s as queued: %s", self.job.id, exc)

    # -- endings ------------------------------------------------------------------------------

    def _attempt(
        self,
        outcome: str,
        *,
        called: bool,
        error: str | None = None,
        key_id: str | None = None,
        latency_ms: float | None = None,
        started: Any = None,
        **usage: Any,
    ) -> AttemptRecord:
        return AttemptRecord(
            provider=self.candidate.provider,
            model=self.candidate.model,
            outcome=outcome,
            started_at=started or utcnow(),
            task_type=self.job.task_type,
            tier=self.job.tier,
            key_id=key_id,
            called=called,
            error=error,
            latency_ms=latency_ms,
            **usage,
        )

    def _requeue(
        self,
        record: AttemptRecord | None,
        target: Candidate,
        *,
        countdown_s: float = 0.0,
        park_until_s: float | None = None,
        hop: bool,
        reservation: str | None = None,
    ) -> Outcome:
        if record is not None:
            record = replace(record, moved_to=target.provider)
        self.rt.store.requeue(
            self.job.id,
            self.job.runs,
            record,
            provider=target.provider,
            model=target.model,
            parked=park_until_s is not None,
            hop=hop,
        )
        return Requeue(
            target,
            self.hop + int(hop),
            _priority(self.rt, self.job),
            countdown_s=max(0.0, countdown_s),
            park_until_s=park_until_s,
            reservation=reservation,
        )

    def _give_back_to_tenant(self, used: int) -> None:
        """This run ended the job: its tenant gets back what the job held and did not use."""
        job = self.job
        if job.tenant is not None:
            unused = int(_estimate(job).tokens) - used
            rt = self.rt
            tenants.give_back(rt.redis, rt.keys, rt.settings, job.tenant, unused, aware(job.created_at))

    def _fail(self, record: AttemptRecord | None, message: str, kind: str) -> Outcome:
        stored = self.rt.store.finish(
            self.job.id,
            self.job.runs,
            record,
            status=FAILED,
            error=message,
            error_kind=kind,
            provider=self.candidate.provider,
            model=self.candidate.model,
        )
        if not stored:
            return Done(summary(self.rt.store.job(self.job.id)))
        notify.finished(self.rt, self.job.id)
        self._give_back_to_tenant(0)
        summary_now = summary_of(
            self.job.id, FAILED, self.candidate.provider, self.candidate.model, 0, 0, 0.0, kind
        )
        return Done(summary_now, notify=bool(self.job.callback_url))
