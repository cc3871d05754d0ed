"""Batches: many jobs as Celery chords, every result back in input order, resumable.

Everything is checked first and nothing is enqueued while any line is bad (unless the
caller skips bad lines, which then end up in the output as failed). Input is read twice —
once to check, once to enqueue in chunks — so the producer never holds the whole batch:
each chunk is placed with one read of the limiter, stored in one transaction and published
in one pipelined round trip as a chord of its own, whose callback records the batch summary.
A batch with the same key (for files: the same input, output, task type and tier) is the
same batch: running it again sends only what has not succeeded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from producer.batchfile import (
    BadLine,
    BatchItem,
    RouteModel,
    check_item,
    line_format,
    model_in_chain,
    read_jsonl,
    validate,
)
from producer.jobs import MAX_NAME_CHARS, check_deadline, check_mode, check_text, hold_for_tenant, job_row
from workers import cache, dispatch, reconciler
from workers.config import Candidate
from workers.errors import InputError, ServiceUnavailable
from workers.limiter import Costs
from workers.store import FAILED, FINAL, OPEN, SUCCEEDED, Job, utcnow

if TYPE_CHECKING:
    from producer.client import Client
    from workers.runtime import Runtime

CHUNK = 500  # jobs per placement read, store transaction, publish pipeline and chord
#: A resumed batch re-sends its stored jobs that have had no broker message for this long
#: (the producer died between storing a chunk and publishing it).
RESUME_IDLE_S = 2.0
SHOWN_ERRORS = 20

Source = Callable[[], Iterable[tuple[int, Any]]]


class BatchInputError(InputError):
    """Some lines are bad; `bad` lists every one (line number and what is wrong)."""

    def __init__(self, bad: list[BadLine]) -> None:
        self.bad = bad
        shown = "\n".join(f"  {b}" for b in bad[:SHOWN_ERRORS])
        more = f"\n  … and {len(bad) - SHOWN_ERRORS} more" if len(bad) > SHOWN_ERRORS else ""
        super().__init__(
            f"{len(bad)} bad line(s); nothing was enqueued (--skip-invalid sends the rest):\n{shown}{more}"
        )


@dataclass(frozen=True)
class Progress:
    batch_id: str
    total: int
    by_status: dict[str, int]
    by_provider: dict[str, int]
    input_tokens: int
    output_tokens: int
    cost_usd: float
    elapsed_s: float
    jobs_per_s: float
    tokens_per_s: float
    finished: bool
    #: the most jobs/s the chain's limits allow (rpm, and tpm at the tokens a job used so far),
    #: over every account; None when a provider of the chain has no such limit
    limit_jobs_per_s: float | None = None

    @property
    def succeeded(self) -> int:
        return self.by_status.get(SUCCEEDED, 0)

    @property
    def failed(self) -> int:
        return self.by_status.get(FAILED, 0)

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def in_flight(self) -> int:
        return self.by_status.get("running", 0)

    @property
    def eta_s(self) -> float | None:
        """Time left at the rate seen since attaching, but never faster than the providers'
        limits allow (a batch's first jobs ride on full buckets, the rest on their refill)."""
        left = self.total - self.done
        rate = self.jobs_per_s
        if self.limit_jobs_per_s is not None:
            rate = min(rate, self.limit_jobs_per_s) if rate > 0 else self.limit_jobs_per_s
        return left / rate if rate > 0 else None


def limit_rate(rt: Runtime, task: str, tier: str, tokens_per_job: float | None) -> float | None:
    """The most jobs/s the providers of a task/tier chain can take, by their per-minute
    limits (requests, and tokens at `tokens_per_job`; a provider's and its models' own),
    summed over their accounts and held to the tier's share; None if one of them has no
    per-minute limit (nothing bounds it)."""
    try:
        candidates = rt.settings.chain(task, tier).candidates
        share = rt.settings.tiers[tier].budget_share if tier in rt.settings.tiers else 1.0
    except (InputError, KeyError):
        return None

    def per_minute(limits: Any) -> float:
        caps = [limits.rpm] if limits.rpm else []
        if limits.tpm and tokens_per_job:
            caps.append(limits.tpm / tokens_per_job)
        return min(caps) if caps else math.inf

    total = 0.0
    for provider in {c.provider for c in candidates}:
        config = rt.settings.providers.get(provider)
        accounts = {k.account for k in rt.keyring.keys(provider)}
        if config is None or not accounts:
            continue  # not served here: it takes no share of the batch
        models = {c.model for c in candidates if c.provider == provider}
        cap = min(per_minute(config.limits), sum(per_minute(config.models[m].limits) for m in models))
        if math.isinf(cap):
            return None
        total += cap / 60 * share * len(accounts)
    return total or None


@dataclass
class BatchHandle:
    """A submitted batch. `progress()`, `wait()`, and `results()` in input order."""

    id: str
    client: Client = field(repr=False, compare=False)
    _started: float = field(default_factory=time.monotonic)
    _at_start: tuple[int, int] | None = None  # (jobs done, tokens) when this handle first looked

    def progress(self) -> Progress:
        """Rates count what happened since this handle first looked (an attach to a batch that
        is half done does not count the first half as done in no time)."""
        rt = self.client.runtime
        totals = rt.store.batch_totals(self.id)
        done = sum(totals["by_status"].get(s, 0) for s in FINAL)
        tokens = totals["input_tokens"] + totals["output_tokens"]
        if self._at_start is None:
            self._at_start = (done, tokens)
        done_before, tokens_before = self._at_start
        elapsed = time.monotonic() - self._started
        rate = (done - done_before) / elapsed if elapsed > 0.5 else 0.0
        token_rate = (tokens - tokens_before) / elapsed if elapsed > 0.5 else 0.0
        batch = rt.store.batch(self.id)
        per_job = tokens / done if done else None
        return Progress(
            batch_id=self.id,
            total=totals["total"],
            by_status=totals["by_status"],
            by_provider=totals["providers"],
            input_tokens=totals["input_tokens"],
            output_tokens=totals["output_tokens"],
            cost_usd=totals["cost_usd"],
            elapsed_s=elapsed,
            jobs_per_s=rate,
            tokens_per_s=token_rate,
            finished=bool(batch and batch.finished_at) or not any(totals["by_status"].get(s) for s in OPEN),
            limit_jobs_per_s=limit_rate(rt, batch.task_type, batch.tier, per_job) if batch else None,
        )

    def wait(self, timeout_s: float | None = None, *, every_s: float = 0.5) -> Progress:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            progress = self.progress()
            if progress.finished:
                return progress
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"batch {self.id}: {progress.done} of {progress.total} done after {timeout_s:g}s"
                )
            time.sleep(every_s)

    def results(self, page: int = 1000) -> Iterator[dict[str, Any]]:
        """One output record per input line, in input order (read from the store page by page):
        OpenAI's batch output format for a batch of OpenAI Batch API lines, else Spillway's."""
        store, after = self.client.runtime.store, -1
        batch = store.batch(self.id)
        record = openai_record if batch is not None and batch.line_format == "openai" else output_record
        while True:
            jobs = store.batch_jobs(self.id, after_seq=after, limit=page)
            if not jobs:
                return
            yield from (record(job) for job in jobs)
            after = jobs[-1].seq

    def write(self, path: str | Path) -> int:
        """Write the output JSONL atomically (a temporary file, then a rename); returns lines."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        count = 0
        with open(tmp, "w", encoding="utf-8") as out:
            for record in self.results():
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(path)
        return count


def output_record(job: Job) -> dict[str, Any]:
    succeeded = job.status == SUCCEEDED
    return {
        "custom_id": job.custom_id or (job.request or {}).get("custom_id"),
        "status": job.status if job.status in FINAL else "pending",
        "provider": job.provider if succeeded else None,
        "model": job.model if succeeded else None,
        "text": job.text if succeeded else None,
        "usage": {"input_tokens": job.input_tokens or 0, "output_tokens": job.output_tokens or 0},
        "cost_usd": round(job.cost_usd or 0.0, 8),
        "attempts": job.calls or 0,
        "error": None if succeeded else job.error,
    }


#: finish reasons OpenAI names; Spillway's "other" and "error" read as "stop" there
OPENAI_FINISH = {"stop", "length", "content_filter", "tool_calls"}


def openai_record(job: Job) -> dict[str, Any]:
    """One line of OpenAI's batch output format: the response as a chat completion, or the
    error. Ids are derived from the job id; usage in OpenAI's names."""
    base: dict[str, Any] = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
    if job.status == SUCCEEDED:
        response = {"status_code": 200, "request_id": job.id, "body": chat_completion(job)}
        return {**base, "response": response, "error": None}
    if job.status == FAILED:
        error = {"code": job.error_kind or "failed", "message": job.error or "failed"}
    else:
        error = {"code": "pending", "message": f"not finished yet ({job.status})"}
    return {**base, "response": None, "error": error}


def chat_completion(job: Job) -> dict[str, Any]:
    """A succeeded job as OpenAI's chat completion object (ids derived from the job id)."""
    tin, tout = job.input_tokens or 0, job.output_tokens or 0
    finished = job.finished_at or utcnow()
    return {
        "id": f"chatcmpl-{job.id}",
        "object": "chat.completion",
        "created": int(finished.timestamp()),
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.text, "refusal": None},
                "logprobs": None,
                "finish_reason": job.finish_reason if job.finish_reason in OPENAI_FINISH else "stop",
            }
        ],
        "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout},
        "system_fingerprint": None,
    }


def submit_batch(
    client: Client,
    items: Iterable[dict[str, Any]],
    *,
    task: str,
    tier: str,
    batch_key: str | None = None,
    skip_invalid: bool = False,
    mode: str | None = None,
    deadline_s: float | None = None,
) -> BatchHandle:
    """Submit many jobs as one batch; each item is a dict like a JSONL line::

        handle = submit_batch([{"custom_id": "a", "prompt": "Hi"}], task="analysis", tier="free")
        handle.wait()
        for record in handle.results():
            print(record["custom_id"], record["text"])

    Items may override ``task``, ``tier``, ``max_tokens``, ``temperature``. The same
    `batch_key` again resumes: only items not yet succeeded are sent. `mode` ("sync",
    "batch", "auto"; default: the route's) and `deadline_s` (every job's, from now) let jobs
    go through the providers' batch APIs at their lower price (see the README).
    """
    listed = list(enumerate(items, 1))
    return run_batch(
        client,
        lambda: listed,
        task=task,
        tier=tier,
        key=batch_key,
        skip_invalid=skip_invalid,
        mode=mode,
        deadline_s=deadline_s,
    )


def submit_file(
    client: Client,
    path: str | Path,
    *,
    task: str,
    tier: str,
    output: str | Path | None = None,
    skip_invalid: bool = False,
    mode: str | None = None,
    deadline_s: float | None = None,
) -> BatchHandle:
    """A JSONL file as a batch; the same input, output, task and tier resume the same batch."""
    key = fingerprint(path, output, task, tier)
    return run_batch(
        client,
        lambda: read_jsonl(path),
        task=task,
        tier=tier,
        key=key,
        skip_invalid=skip_invalid,
        mode=mode,
        deadline_s=deadline_s,
    )


def fingerprint(path: str | Path, output: str | Path | None, task: str, tier: str) -> str:
    parts = [str(Path(path).resolve()), str(Path(output).resolve()) if output else "", task, tier]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def run_batch(
    client: Client,
    source: Source,
    *,
    task: str,
    tier: str,
    key: str | None,
    skip_invalid: bool,
    route_model: RouteModel = model_in_chain,
    tenant: str | None = None,
    mode: str | None = None,
    deadline_s: float | None = None,
) -> BatchHandle:
    """Check every line, then store and publish the batch chunk by chunk (see `_Enqueuer`).
    A `tenant`'s batch holds the worst case of all its good lines of the tenant's daily token
    budget first, or nothing is submitted (BudgetExhausted)."""
    rt = client.runtime
    check_text(task, "task", max_chars=MAX_NAME_CHARS)
    check_text(tier, "tier", max_chars=MAX_NAME_CHARS)
    if key is not None:
        check_text(key, "batch_key", max_chars=MAX_NAME_CHARS)  # the batch's fingerprint column
    rt.settings.chain(task, tier)  # an unknown default task type or tier fails before anything
    check_mode(mode)
    deadline_s = check_deadline(deadline_s)
    good_ids: dict[str, int] = {}
    tokens = [0]
    good, bad = validate(rt, source(), task, tier, seen=good_ids, route_model=route_model, tokens=tokens)
    if bad and not skip_invalid:
        raise BatchInputError(bad)
    if not good and not bad:
        raise InputError("the batch is empty")
    hold_for_tenant(rt, tenant, tokens[0])
    batch = rt.store.batch_by_fingerprint(key) if key else None
    batch_id = batch.id if batch else uuid.uuid4().hex
    if batch is None:
        rt.store.add_batch(
            id=batch_id,
            task_type=task,
            tier=tier,
            total=0,
            chords=0,
            fingerprint=key,
            line_format=line_format(source()),
        )
    else:
        # Resuming: jobs an earlier run stored but never got to publish go out again (once).
        reconciler.recover_once(rt, client.app, idle_for_s=RESUME_IDLE_S, confirm_s=0.5, batch_id=batch_id)
    enqueuer = _Enqueuer(
        client,
        batch_id,
        rt.store.batch_states(batch_id),
        chords_before=batch.chords if batch else 0,
        good_ids=set(good_ids),
        tenant=tenant,
        mode=mode,
        deadline_s=deadline_s,
    )
    bad_lines = {b.line: b for b in bad}
    for chunk in _chunks(source(), CHUNK):
        enqueuer.add([bad_lines.get(n) or check_item(rt, n, v, task, tier, route_model) for n, v in chunk])
    enqueuer.flush()
    rt.store.update_batch(batch_id, total=rt.store.batch_totals(batch_id)["total"], chords=enqueuer.chords)
    return BatchHandle(batch_id, client)


class _Enqueuer:
    """Places, stores and publishes a batch chunk by chunk, each chunk a chord of its own."""

    def __init__(
        self,
        client: Client,
        batch_id: str,
        states: dict[str, tuple[str, str]],
        chords_before: int,
        good_ids: set[str] | None = None,
        tenant: str | None = None,
        mode: str | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.client = client
        self.tenant = tenant
        self.mode, self.deadline_s = mode, deadline_s
        self.rt = client.runtime
        self.batch_id = batch_id
        self.states = states  # custom_id -> (job id, status) of what this batch already holds
        self.good_ids = good_ids or set()  # custom ids of the good lines: a bad line never takes one
        self.chords = chords_before
        self.header: list[dispatch.Target] = []
        self.sent = 0
        self.reopened = False

    def add(self, items: list[BatchItem | BadLine]) -> None:
        self.chord_id = uuid.uuid4().hex  # this chunk's chord: its group id, recorded on each job
        rows, retries, runnable = [], [], []
        for item in items:
            if isinstance(item, BadLine):
                row = self._bad_row(item)
                if row is not None:
                    rows.append(row)
                continue
            known = self.states.get(item.custom_id)
            if known and not known[0]:
                # An invalid line's row holds this custom_id (an earlier run of an edited file):
                # this line cannot have it too, and a job with no id is never sent.
                taken = f"custom_id {item.custom_id!r} is taken by an invalid line of this batch"
                row = self._bad_row(BadLine(item.line, None, taken))
                if row is not None:
                    rows.append(row)
                continue
            if known and known[1] != FAILED:
                continue  # succeeded, or still on its way: resuming skips it
            job_id = known[0] if known else uuid.uuid4().hex
            self.states[item.custom_id] = (job_id, "queued")
            runnable.append((item, job_id, known is not None))
        runnable = self._answer_from_cache(runnable, rows)
        placed = self._place([item for item, _, _ in runnable])
        for (item, job_id, again), candidate in zip(runnable, placed, strict=True):
            if again:  # failed last time: the same job runs again, under a new task id
                retries.append((job_id, item, candidate))
                continue
            rows.append(
                {
                    **job_row(
                        job_id,
                        item.task,
                        item.tier,
                        item.request,
                        target=candidate,
                        preferred_provider=item.preferred_provider,
                        tenant=self.tenant,
                        mode=self.mode,
                        deadline_s=self.deadline_s,
                    ),
                    **self._header(job_id, job_id, candidate, item.tier),
                    "batch_id": self.batch_id,
                    "seq": item.line,
                    "custom_id": item.custom_id,
                }
            )
        if rows:
            self.rt.store.add_jobs(rows)
        for job_id, item, candidate in retries:
            task_id = f"{job_id}-{uuid.uuid4().hex[:8]}"
            place = self._header(job_id, task_id, candidate, item.tier)
            self.rt.store.retry_job(
                job_id, task_id=task_id, provider=candidate.provider, model=candidate.model, chord=place
            )
        if (rows or retries) and not self.reopened:
            self.rt.store.update_batch(self.batch_id, finished_at=None, summary=None)
            self.reopened = True
        self.flush()  # one chord per chunk, right after it is stored: a crash loses nothing sent

    def _answer_from_cache(self, runnable: list[Any], rows: list[dict[str, Any]]) -> list[Any]:
        """Items of caching routes whose exact request was answered lately are done now."""
        keys: dict[int, str] = {}
        for i, (item, _, again) in enumerate(runnable):
            chain = self.rt.settings.chain(item.task, item.tier)
            if chain.cache_ttl_s and not again:
                keys[i] = cache.cache_key(self.rt.keys, chain, item.task, item.tier, item.request)
        if not keys:
            return runnable
        try:
            answers = dict(zip(keys, cache.lookup_many(self.rt.redis, list(keys.values())), strict=True))
        except redis.RedisError:
            return runnable
        rest = []
        for i, (item, job_id, again) in enumerate(runnable):
            answer = answers.get(i)
            if answer is None:
                rest.append((item, job_id, again))
                continue
            target = Candidate(answer.provider, answer.model)
            rows.append(
                {
                    **job_row(job_id, item.task, item.tier, item.request, target=target),
                    **answer.result_columns(),
                    "status": SUCCEEDED,
                    "finished_at": utcnow(),
                    "batch_id": self.batch_id,
                    "seq": item.line,
                    "custom_id": item.custom_id,
                }
            )
        return rest

    def _bad_row(self, bad: BadLine) -> dict[str, Any] | None:
        """A bad line kept as a failed job, so the output has every line in its place."""
        marker = f"#line{bad.line}"
        if marker in self.states:
            return None  # written by an earlier run of this batch
        self.states[marker] = ("", FAILED)
        # The line's custom_id, unless a good line (or an earlier row) has it: custom ids are unique
        # in a batch, and a good line may come later (a bad line first, then a good one, same id).
        keep_id = bad.custom_id
        if not keep_id or keep_id in self.states or keep_id in self.good_ids:
            keep_id = None
        if keep_id:
            self.states[keep_id] = ("", FAILED)
        return {
            "id": uuid.uuid4().hex,
            "batch_id": self.batch_id,
            "seq": bad.line,
            "custom_id": keep_id,
            "task_type": "-",
            "tier": "-",
            "status": FAILED,
            "request": {"invalid": True, "custom_id": bad.custom_id},
            "est_input_tokens": 0,
            "error": f"line {bad.line}: {bad.error}",
            "error_kind": "invalid_input",
            "finished_at": utcnow(),
        }

    def flush(self) -> None:
        if self.header:
            self._publish(self.header)
            self.header = []

    def _place(self, items: list[BatchItem]) -> list[Any]:
        """One limiter read per (task type, tier) in the chunk; each placement sees the last."""
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[str, str, str | None], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((item.task, item.tier, item.preferred_provider), []).append(i)
        for (task, tier, preferred), indexes in groups.items():
            costs = [
                Costs.estimate(items[i].request.estimated_input_tokens(), items[i].request.max_tokens)
                for i in indexes
            ]
            placed = self.rt.router.place_many(task, tier, costs, preferred=preferred)
            for i, candidate in zip(indexes, placed, strict=True):
                out[i] = candidate
        return out

    def _header(self, job_id: str, task_id: str, candidate: Any, tier: str) -> dict[str, Any]:
        """Add the job to this chunk's chord; returns its place there, for the store."""
        place = {"chord_id": self.chord_id, "chord_index": len(self.header), "chord_chunk": self.chords}
        priority = self.rt.priority(tier)
        self.header.append(
            dispatch.Target(job_id, candidate.provider, candidate.model, priority, task_id=task_id)
        )
        return place

    def _publish(self, header: list[dispatch.Target]) -> None:
        try:
            dispatch.publish_chunk(self.client.app, header, self.batch_id, self.chords, self.chord_id)
        except Exception as exc:  # the broker is gone: the jobs are stored; the reconciler sends them
            raise ServiceUnavailable(
                f"the broker stopped answering after {self.sent} job(s) of batch {self.batch_id} were sent "
                f"({type(exc).__name__}); the rest are stored and `spillway recover` will send them"
            ) from exc
        self.chords += 1
        self.sent += len(header)


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
