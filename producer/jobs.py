"""Submit one job and read it back: the fire-and-forget path of web backends and scripts."""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import redis

from workers import cache, callbacks, dispatch
from workers.cache import CachedAnswer
from workers.config import MODES, Candidate
from workers.constants import queue_name
from workers.errors import IdempotencyConflict, InputError, ServiceUnavailable, SpillwayError
from workers.limiter import Costs, tenants
from workers.messages import MAX_PROMPT_CHARS, ChatRequest, build_request
from workers.results import JobResult
from workers.runtime import Runtime
from workers.store import SUCCEEDED, DuplicateJob, FirstRun, utcnow

if TYPE_CHECKING:
    from producer.client import Client

log = logging.getLogger("spillway.producer")


class Runner(Protocol):
    """Runs some of the jobs a submit stores in this process instead of publishing them
    (`spillway serve`: `producer.ops.openai.inline`)."""

    def reserve(self, candidate: Candidate) -> FirstRun | None:
        """A slot held for a job placed on `candidate`, and the claim of its first run (it is
        stored claimed); None: no slot is free, it is published."""

    def release(self) -> None:
        """Give back a slot `reserve` held for a job that was not stored."""

    def run(self, target: dispatch.Target, job: Any) -> None:
        """Run `target`, stored claimed for its first run (`job`, read like `claim`'s)."""


# What the store's columns hold (workers/store/models.py), checked here so that every backend
# refuses the same input with the same error; PostgreSQL would raise a DataError instead.
MAX_NAME_CHARS = 64  # task, tier, preferred_provider
MAX_IDEMPOTENCY_KEY = 256
MAX_CALLBACK_URL = 8192
#: More output tokens than any model generates: a bigger number is a mistake, not a request.
MAX_TOKENS = 1_000_000
MAX_DEADLINE_S = 365 * 86400


@dataclass(frozen=True)
class JobHandle:
    """A submitted job. ``handle.wait(30).text`` blocks until it is done (or the timeout)."""

    id: str
    client: Client = field(repr=False, compare=False)

    def result(self) -> JobResult:
        return get(self.client, self.id)

    def wait(self, timeout_s: float = 300.0) -> JobResult:
        deadline, pause = time.monotonic() + timeout_s, 0.01
        while True:
            result = get(self.client, self.id)
            if result.done:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} is still {result.status} after {timeout_s:g}s")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.25)


def get(client: Client, job_id: str) -> JobResult:
    """The job's current state; InputError if the store does not know the id."""
    job = client.runtime.store.job(job_id)
    if job is None:
        raise InputError(f"no job with id {job_id!r}")
    return JobResult.from_job(job)


def submit(
    client: Client,
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    task: str,
    tier: str,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    stop: list[str] | str | None = None,
    json_mode: bool = False,
    preferred_provider: str | None = None,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    deadline_s: float | None = None,
    idempotency_scope: str | None = None,
    tenant: str | None = None,
) -> JobHandle:
    """`Client.submit`: store one job and publish it to the provider queue that can finish it
    soonest; returns as soon as the job is stored and published.

    `idempotency_scope` (e.g. the caller `spillway serve` authenticated) is stored in front of
    the key, so the same key from two scopes names two jobs. A `tenant`'s job holds its worst
    case of the tenant's daily token budget (BudgetExhausted, nothing stored, when it cannot)."""
    admitted = _admit(
        client,
        prompt,
        messages=messages,
        task=task,
        tier=tier,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        stop=stop,
        json_mode=json_mode,
        preferred_provider=preferred_provider,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        deadline_s=deadline_s,
        idempotency_scope=idempotency_scope,
        tenant=tenant,
    )
    if isinstance(admitted, JobHandle):
        return admitted
    rt = client.runtime
    try:
        target = rt.router.place(task, tier, admitted.costs, preferred=preferred_provider).candidate
    except ServiceUnavailable:
        if not rt.env.keep_when_broker_down:
            raise
        target = rt.router.candidates(task, tier)[0]  # Redis is down: the reconciler sends it later
    result = _store_and_publish(client, [admitted], [target])[0]
    if isinstance(result, Exception):
        raise result
    return result


@dataclass
class Admitted:
    """A checked submit, ready to be placed, stored and published."""

    task: str
    tier: str
    request: ChatRequest
    costs: Costs
    row: dict[str, Any]  # job_row's keyword arguments but the target
    shown_key: str | None = None
    tenant: str | None = None


def _admit(
    client: Client,
    prompt: str | None = None,
    *,
    task: str,
    tier: str,
    preferred_provider: str | None = None,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    deadline_s: float | None = None,
    idempotency_scope: str | None = None,
    tenant: str | None = None,
    **fields: Any,
) -> Admitted | JobHandle:
    """Check a submit; the job it names already (an idempotency key, a cached answer), or
    what is left to do."""
    rt = client.runtime
    key = None
    if idempotency_key is not None:
        prefix = f"{idempotency_scope}:" if idempotency_scope else ""
        check_text(idempotency_key, "idempotency_key", max_chars=MAX_IDEMPOTENCY_KEY - len(prefix))
        key = prefix + idempotency_key
    deadline_s = check_deadline(deadline_s)
    request = prepare(rt, task, tier, prompt=prompt, preferred_provider=preferred_provider, **fields)
    if key is not None:
        existing = rt.store.by_idempotency_key(key)
        if existing is not None:
            return JobHandle(_same_request(existing, task, tier, request, idempotency_key or ""), client)
    if callback_url is not None:
        _check_url(callback_url)
        callbacks.secret(rt.env)  # signing needs it: fail now, not when the result is ready
    extra = {
        "preferred_provider": preferred_provider,
        "idempotency_key": key,
        "callback_url": callback_url,
        "deadline_s": deadline_s,
    }
    answer = cached_answer(rt, task, tier, request)
    if answer is not None:
        return _store_cached(client, task, tier, request, answer, shown_key=idempotency_key, **extra)
    costs = Costs.estimate(request.estimated_input_tokens(), request.max_tokens)
    return Admitted(task, tier, request, costs, {**extra, "tenant": tenant}, idempotency_key, tenant)


def submit_many(
    client: Client, submits: list[dict[str, Any]], *, runner: Runner | None = None
) -> list[JobHandle | Exception]:
    """Many `submit`s at once (`spillway serve` under load): each is checked on its own and gets
    its job or its error; the rest are placed with one limiter read per route, stored in one
    transaction and published in one pipelined round trip — but for those `runner` has a slot
    for, which are stored claimed and run by it (`workers.inline`)."""
    results: list[JobHandle | Exception | None] = [None] * len(submits)
    admitted: list[tuple[int, Admitted]] = []
    for i, fields in enumerate(submits):
        try:
            done = _admit(client, **fields)
        except SpillwayError as exc:
            results[i] = exc
            continue
        if isinstance(done, JobHandle):
            results[i] = done
        else:
            admitted.append((i, done))
    groups: dict[tuple[str, str, str | None], list[tuple[int, Admitted]]] = {}
    for i, a in admitted:
        groups.setdefault((a.task, a.tier, a.row["preferred_provider"]), []).append((i, a))
    for (task, tier, preferred), members in groups.items():
        try:
            placed = client.runtime.router.place_many(
                task, tier, [a.costs for _, a in members], preferred=preferred, count_queued=runner is None
            )
        except SpillwayError as exc:  # no usable provider for the route, or Redis away
            for i, _ in members:
                results[i] = exc
            continue
        stored = _store_and_publish(client, [a for _, a in members], placed, runner)
        for (i, _), result in zip(members, stored, strict=True):
            results[i] = result
    return [r if r is not None else InputError("not submitted") for r in results]


def _store_and_publish(
    client: Client, admitted: list[Admitted], targets: list[Candidate], runner: Runner | None = None
) -> list[JobHandle | Exception]:
    """Hold each tenant's tokens, store the jobs in one transaction, publish them pipelined
    (those `runner` runs are stored claimed and handed to it); what fails gives its hold (and
    slot) back. A concurrent submit with the same idempotency key wins."""
    rt = client.runtime
    out: list[JobHandle | Exception] = []
    rows, held, ready = [], [], []
    running: dict[str, FirstRun] = {}
    for a, target in zip(admitted, targets, strict=True):
        try:
            hold = hold_for_tenant(rt, a.tenant, int(a.costs.tokens))
        except SpillwayError as exc:
            out.append(exc)
            continue
        job_id = uuid.uuid4().hex
        rows.append(job_row(job_id, a.task, a.tier, a.request, target=target, **a.row))
        held.append(hold)
        ready.append((len(out), a, job_id, target))
        out.append(JobHandle(job_id, client))
        first = runner.reserve(target) if runner is not None else None
        if first is not None:
            running[job_id] = first
    if not rows:
        return out
    try:
        claimed = rt.store.add_jobs(rows, running=running)
    except Exception as exc:
        for hold in held:
            hold.give_back()
        for _ in running:
            runner.release()  # type: ignore[union-attr]
        if not isinstance(exc, DuplicateJob):
            raise
        if len(rows) > 1:  # one of them lost an idempotency race: each on its own
            for place, a, _, target in ready:
                out[place] = _store_and_publish(client, [a], [target], runner)[0]
            return out
        a = ready[0][1]
        existing = rt.store.by_idempotency_key(a.row["idempotency_key"] or "")
        if existing is None:
            raise
        # a concurrent submit with the same key won
        shown = a.shown_key or ""
        out[ready[0][0]] = JobHandle(_same_request(existing, a.task, a.tier, a.request, shown), client)
        return out
    sent = []
    queued: dict[Candidate, Costs] = {}
    for (place, a, job_id, t), hold in zip(ready, held, strict=True):
        target = dispatch.Target(job_id, t.provider, t.model, rt.priority(a.tier))
        if job_id in claimed:
            runner.run(target, claimed[job_id])  # type: ignore[union-attr]
        else:
            sent.append((place, hold, target))
            queued[t] = queued.get(t, Costs(0, 0, 0, 0)) + a.costs
    if not sent:
        return out
    try:
        if runner is not None:  # placed uncounted: what runs here now is never queued (one round trip less)
            rt.limiter.add_pending(queued)
        publish(client, [target for _, _, target in sent])
    except ServiceUnavailable as exc:
        for place, hold, _ in sent:
            hold.give_back()
            out[place] = exc
    return out


@dataclass(frozen=True)
class Held:
    """Tokens a tenant's submit holds of its day's budget, to give back if it does not happen."""

    rt: Runtime | None = None
    tenant: str = ""
    tokens: int = 0
    at: datetime | None = None

    def give_back(self) -> None:
        if self.rt is not None and self.at is not None:
            rt = self.rt
            tenants.give_back(rt.redis, rt.keys, rt.settings, self.tenant, self.tokens, self.at)


def hold_for_tenant(rt: Runtime, tenant: str | None, tokens: int) -> Held:
    """Hold `tokens` of the tenant's daily budget (none for a submit with no tenant)."""
    if tenant is None:
        return Held()
    now = utcnow()
    tenants.hold(rt.redis, rt.keys, tenant, tokens, tenants.budget(rt.settings, tenant), now)
    return Held(rt, tenant, tokens, now)


def _same_request(existing: Any, task: str, tier: str, request: ChatRequest, key: str) -> str:
    """The job an idempotency key already names — if it names this very request."""
    if (existing.task_type, existing.tier, existing.request) != (task, tier, request.to_json()):
        raise IdempotencyConflict(
            f"idempotency_key: {key!r} was already used for a different request "
            "(task, tier, messages or options differ); use a new key for a new request"
        )
    return existing.id


def cached_answer(rt: Runtime, task: str, tier: str, request: ChatRequest) -> CachedAnswer | None:
    """The route's cached answer to this exact request, if the route caches and one is there."""
    chain = rt.settings.chain(task, tier)
    if not chain.cache_ttl_s:
        return None
    try:
        return cache.lookup(rt.redis, cache.cache_key(rt.keys, chain, task, tier, request))
    except redis.RedisError:
        return None


def _store_cached(
    client: Client,
    task: str,
    tier: str,
    request: ChatRequest,
    answer: CachedAnswer,
    shown_key: str | None = None,
    **extra: Any,
) -> JobHandle:
    """A cache hit is a job that is done when it is stored: no message, no quota."""
    rt = client.runtime
    job_id = uuid.uuid4().hex
    target = Candidate(answer.provider, answer.model)
    row = {
        **job_row(job_id, task, tier, request, target=target, **extra),
        **answer.result_columns(),
        "status": SUCCEEDED,
        "finished_at": utcnow(),
    }
    try:
        rt.store.add_jobs([row])
    except DuplicateJob:
        existing = rt.store.by_idempotency_key(extra.get("idempotency_key") or "")
        if existing is None:
            raise
        return JobHandle(_same_request(existing, task, tier, request, shown_key or ""), client)
    if extra.get("callback_url"):
        dispatch.deliver_callback(client.app, job_id)
    return JobHandle(job_id, client)


def prepare(
    rt: Runtime, task: object, tier: object, *, preferred_provider: object = None, **fields: Any
) -> ChatRequest:
    """Validate a job's fields against the config; errors name the field that is wrong."""
    check_text(task, "task", max_chars=MAX_NAME_CHARS)
    check_text(tier, "tier", max_chars=MAX_NAME_CHARS)
    chain = rt.settings.chain(task, tier)
    max_tokens = fields.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and abs(max_tokens) > MAX_TOKENS:
        raise InputError(
            f"max_tokens: expected a positive integer of at most {MAX_TOKENS:,}, got {_shown(max_tokens)}"
        )
    request = build_request(default_max_tokens=rt.settings.default_max_tokens, **fields)
    for i, sequence in enumerate(request.stop):
        check_text(sequence, f"stop[{i}]", max_chars=MAX_PROMPT_CHARS, blank=True)
    candidates = rt.router.candidates(task, tier)
    if preferred_provider is not None:
        check_text(preferred_provider, "preferred_provider", max_chars=MAX_NAME_CHARS)
    if preferred_provider is not None and preferred_provider not in {c.provider for c in chain.candidates}:
        raise InputError(f"preferred_provider: {preferred_provider!r} is not in the {task}/{tier} chain")
    limits = [rt.settings.model(c).max_output_tokens for c in candidates]
    if all(limit is not None and request.max_tokens > limit for limit in limits):
        raise InputError(
            f"max_tokens: {request.max_tokens} is more than any model of the {task}/{tier} chain "
            f"allows (at most {max(limits)})"
        )
    return request


def job_row(
    job_id: str,
    task: str,
    tier: str,
    request: ChatRequest,
    *,
    target: Candidate,
    deadline_s: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    deadline_s = check_deadline(deadline_s)
    return {
        "id": job_id,
        "task_type": task,
        "tier": tier,
        "request": request.to_json(),
        "est_input_tokens": request.estimated_input_tokens(),
        "provider": target.provider,
        "model": target.model,
        "queue": queue_name(target.provider),
        "task_id": job_id,
        "deadline_at": utcnow() + timedelta(seconds=deadline_s) if deadline_s else None,
        "published_at": utcnow(),
        **extra,
    }


def publish(client: Client, targets: list[dispatch.Target]) -> None:
    """Send `run_job` for each target, pipelined; when the broker fails, undo (or keep, if the
    environment says so: the reconciler publishes them later)."""
    try:
        dispatch.publish_jobs(client.app, targets)
    except Exception as exc:  # kombu/redis/amqp connection errors come in many classes
        ids = [t.job_id for t in targets]
        if client.env.keep_when_broker_down:
            log.warning("broker down: %d job(s) stored; the reconciler will publish them", len(ids))
            return
        client.runtime.store.delete_jobs(ids)
        raise ServiceUnavailable(
            f"the broker does not answer ({type(exc).__name__}); nothing was submitted"
        ) from exc


def check_text(value: object, what: str, *, max_chars: int, blank: bool = False) -> str:
    """A string every store backend keeps as given: at most `max_chars` (its column), no NUL
    (PostgreSQL text cannot hold one) and valid UTF-8 (no lone surrogate); not blank, unless
    `blank`. The error names `what` and the limit."""
    if not isinstance(value, str) or not (blank or value.strip()):
        raise InputError(f"{what}: expected a non-empty string, got {_shown(value)}")
    if len(value) > max_chars:
        raise InputError(f"{what}: at most {max_chars} characters, got {len(value):,}")
    if "\x00" in value:
        raise InputError(f"{what}: must not contain NUL (\\x00), found at character {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what}: not valid UTF-8 (a lone surrogate at character {exc.start})") from None
    return value


def check_deadline(deadline_s: object) -> float | None:
    """`deadline_s` as a float, or None; a bool, NaN, infinity or more than a year is refused
    (the deadline is a timestamp: a huge number overflows it)."""
    if deadline_s is None:
        return None
    if (
        isinstance(deadline_s, bool)
        or not isinstance(deadline_s, int | float)
        or not math.isfinite(deadline_s)
        or not 0 < deadline_s <= MAX_DEADLINE_S
    ):
        raise InputError(
            f"deadline_s: expected a number of seconds above 0 and at most {MAX_DEADLINE_S:,} "
            f"(365 days), got {_shown(deadline_s)}"
        )
    return float(deadline_s)


def check_mode(mode: object) -> str | None:
    """A submission's own mode (None: its route's)."""
    if mode is not None and mode not in MODES:
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {_shown(mode)}")
    return mode  # type: ignore[return-value]


def _shown(value: object) -> str:
    """A short repr for an error message (an int of thousands of digits cannot even be printed)."""
    if isinstance(value, int) and abs(value) > 10**18:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "…"


def _check_url(url: object) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InputError(f"callback_url: expected an http:// or https:// URL, got {_shown(url)}")
    check_text(url, "callback_url", max_chars=MAX_CALLBACK_URL)
