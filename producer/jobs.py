"""Submit one job and read it back: the fire-and-forget path of web backends and scripts."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import redis

from workers import cache, callbacks, dispatch
from workers.cache import CachedAnswer
from workers.config import Candidate
from workers.constants import queue_name
from workers.errors import IdempotencyConflict, InputError, ServiceUnavailable
from workers.limiter import Costs
from workers.messages import ChatRequest, build_request
from workers.results import JobResult
from workers.runtime import Runtime
from workers.store import SUCCEEDED, DuplicateJob, utcnow

if TYPE_CHECKING:
    from producer.client import Client

log = logging.getLogger("spillway.producer")


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
) -> JobHandle:
    """`Client.submit`: store one job and publish it to the provider queue that can finish it
    soonest; returns as soon as the job is stored and published."""
    rt = client.runtime
    if idempotency_key is not None:
        _check_str(idempotency_key, "idempotency_key")
    request = prepare(
        rt,
        task,
        tier,
        prompt=prompt,
        messages=messages,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        stop=stop,
        json_mode=json_mode,
        preferred_provider=preferred_provider,
    )
    if idempotency_key is not None:
        existing = rt.store.by_idempotency_key(idempotency_key)
        if existing is not None:
            return JobHandle(_same_request(existing, task, tier, request, idempotency_key), client)
    if callback_url is not None:
        _check_url(callback_url)
        callbacks.secret(rt.env)  # signing needs it: fail now, not when the result is ready
    extra = {
        "preferred_provider": preferred_provider,
        "idempotency_key": idempotency_key,
        "callback_url": callback_url,
        "deadline_s": deadline_s,
    }
    answer = cached_answer(rt, task, tier, request)
    if answer is not None:
        return _store_cached(client, task, tier, request, answer, **extra)
    costs = Costs.estimate(request.estimated_input_tokens(), request.max_tokens)
    try:
        target = rt.router.place(task, tier, costs, preferred=preferred_provider).candidate
    except ServiceUnavailable:
        if not rt.env.keep_when_broker_down:
            raise
        target = rt.router.candidates(task, tier)[0]  # Redis is down: the reconciler sends it later
    job_id = uuid.uuid4().hex
    row = job_row(
        job_id,
        task,
        tier,
        request,
        preferred_provider=preferred_provider,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        deadline_s=deadline_s,
        target=target,
    )
    try:
        rt.store.add_jobs([row])
    except DuplicateJob:
        existing = rt.store.by_idempotency_key(idempotency_key or "")
        if existing is None:
            raise
        # a concurrent submit with the same key won
        return JobHandle(_same_request(existing, task, tier, request, idempotency_key or ""), client)
    publish(client, [dispatch.Target(job_id, target.provider, target.model, rt.priority(tier))])
    return JobHandle(job_id, client)


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
    client: Client, task: str, tier: str, request: ChatRequest, answer: CachedAnswer, **extra: Any
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
        key = extra.get("idempotency_key") or ""
        existing = rt.store.by_idempotency_key(key)
        if existing is None:
            raise
        return JobHandle(_same_request(existing, task, tier, request, key), client)
    if extra.get("callback_url"):
        dispatch.deliver_callback(client.app, job_id)
    return JobHandle(job_id, client)


def prepare(
    rt: Runtime, task: object, tier: object, *, preferred_provider: object = None, **fields: Any
) -> ChatRequest:
    """Validate a job's fields against the config; errors name the field that is wrong."""
    _check_str(task, "task")
    _check_str(tier, "tier")
    chain = rt.settings.chain(task, tier)
    request = build_request(default_max_tokens=rt.settings.default_max_tokens, **fields)
    candidates = rt.router.candidates(task, tier)
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
    if deadline_s is not None and (not isinstance(deadline_s, int | float) or deadline_s <= 0):
        raise InputError(f"deadline_s: expected a positive number of seconds, got {deadline_s!r}")
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


def _check_str(value: object, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what}: expected a non-empty string, got {value!r}")


def _check_url(url: object) -> None:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InputError(f"callback_url: expected an http:// or https:// URL, got {url!r}")
