"""`POST /v1/chat/completions` (a job, answered when done) and `GET /v1/models`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from producer.batch import chat_completion
from producer.batchfile import OPENAI_URL, openai_fields
from producer.client import Client
from producer.jobs import submit_many
from producer.ops.openai.errors import ApiError, api_error
from producer.ops.openai.handler import ApiHandler
from producer.ops.openai.inline import InlineRunner
from producer.ops.openai.routing import route_for
from workers.config import Settings
from workers.errors import InputError, SpillwayError
from workers.store import SUCCEEDED, Job

log = logging.getLogger("spillway.openai")

CHAT_WAIT_S = 600.0  # the SDK's own default timeout
#: Body fields a chat completion may carry that change nothing here.
IGNORED_CHAT_FIELDS = {"stream", "n", "store", "metadata"}


class ChatCompletions(ApiHandler):
    async def post(self) -> None:
        body = self.json_body()
        if body.get("stream"):
            raise ApiError(
                400,
                "stream: Spillway answers when the job is done; streaming is not supported",
                param="stream",
            )
        if body.get("n", 1) != 1:
            raise ApiError(400, "n: only 1 choice is supported", param="n")
        line = {"body": {k: v for k, v in body.items() if k not in IGNORED_CHAT_FIELDS}, "url": OPENAI_URL}
        try:
            fields = openai_fields(line)
        except InputError as exc:
            message = str(exc).removeprefix("body: ").removeprefix("body.")
            raise ApiError(400, message, param=message.partition(":")[0] or None) from None
        headers = self.request.headers
        task, tier, preferred = route_for(
            self.rt.settings,
            self.tenant,
            fields.pop("model"),
            headers.get("X-Spillway-Task"),
            headers.get("X-Spillway-Tier"),
        )
        handle = await self.submitter.submit(
            task=task,
            tier=tier,
            preferred_provider=preferred,
            idempotency_key=headers.get("Idempotency-Key"),
            idempotency_scope=self.tenant.scope,
            tenant=self.tenant.name if self.tenants else None,
            **fields,
        )
        # the job's id finds it after a disconnect (`GET /v1/jobs/{id}`); the SDK must not
        # submit it again after an error (its retries would make new jobs)
        job_headers = {"x-request-id": handle.id, "x-should-retry": "false"}
        for name, value in job_headers.items():
            self.set_header(name, value)
        job = await self.waiters.wait(handle.id, CHAT_WAIT_S)
        if job is None:
            raise ApiError(
                504,
                f"job {handle.id} is still queued after {CHAT_WAIT_S:.0f}s; it keeps its place",
                type="server_error",
                code="still_queued",
                headers=job_headers,
            )
        if job.status == SUCCEEDED:
            self.reply(chat_completion(job))
            return
        client_side = job.error_kind in ("bad_request", "context_too_long", "invalid_input")
        raise ApiError(
            400 if client_side else 502,
            job.error or "failed",
            type="invalid_request_error" if client_side else "api_error",
            code=job.error_kind,
            headers=job_headers,
        )


def model_objects(settings: Settings) -> list[dict[str, Any]]:
    """Every configured model, and `spillway/<task>` for each task type, as OpenAI lists models."""
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": name}
        for name, provider in settings.providers.items()
        for model in provider.models
    ]
    data += [
        {"id": f"spillway/{task}", "object": "model", "created": 0, "owned_by": "spillway"}
        for task in settings.routes
        if task != "*"
    ]
    return data


class Models(ApiHandler):
    async def get(self, model_id: str | None = None) -> None:
        data = model_objects(self.rt.settings)
        if model_id is None:
            self.reply({"object": "list", "data": data})
            return
        found = next((m for m in data if m["id"] == model_id), None)
        if found is None:
            raise ApiError(
                404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found"
            )
        self.reply(found)


# -- waiting for jobs ------------------------------------------------------------------------------


class Waiters:
    """HTTP requests waiting for their jobs, answered as soon as the store has them final.

    A thread of its own listens on Redis for the ids of jobs that became final (workers
    publish them: `workers.notify`) and reads those that requests here wait for from the store
    at once, in the same thread. The store stays the source of truth: a sweep asks it for every
    waiting job, each `FAST_S` until notifications are seen to arrive (and again for a while
    after one was missed, or while Redis is away), each `SLOW_S` while they do. A notification
    lost to a Redis restart, a reconnect or a worker that sends none costs time, never an
    answer. A sweep waits at least twice as long as the last one took, so thousands of waiting
    requests cannot keep the store (and this process) busy polling."""

    FAST_S = 0.01
    SLOW_S = 0.5
    GRACE_S = 1.0  # a job a sweep found final must be heard of within this, or one was missed
    DISTRUST_S = 30.0  # after a missed notification, fast sweeps for this long
    IDLE_S = 60.0  # the listener stops after this long with nobody waiting (a wait restarts it)
    HEARD = 20_000  # ids heard lately: a job may finish before its request starts waiting
    FINALS = 1_000  # jobs finished in this process lately (`heard_here`), until answered
    PAGE = 500

    def __init__(self, client: Client, pool: ThreadPoolExecutor, *, listen: bool = True) -> None:
        self.client, self.pool, self.listen = client, pool, listen
        self.pending: dict[str, list[asyncio.Future[Job]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.nap: asyncio.Future[None] | None = None  # the sweeper's sleep; done early by `_sweep_soon`
        self.tasks: set[asyncio.Task[None]] = set()
        # shared with the listener thread
        self.lock = threading.Lock()
        self.heard: OrderedDict[str, None] = OrderedDict()
        self.finals: OrderedDict[str, Job] = OrderedDict()
        self.listener: threading.Thread | None = None
        self.generation = 0  # of listeners: one superseded by another stops and says nothing
        self.idle_since = time.monotonic()
        # the event loop's own
        self.listening = False  # subscribed: finished jobs are heard
        self.proven = False  # a job waited for here was heard of: workers do notify
        self.distrust_until = 0.0
        self.swept: dict[str, float] = {}  # answered by a sweep: was it heard of too?
        self.counts = {"here": 0, "notified": 0, "swept": 0, "missed": 0}

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Job] = loop.create_future()
        with self.lock:  # against the listener: a job heard just before its request waits
            final = self.finals.pop(job_id, None)
            if final is None:
                self.pending.setdefault(job_id, []).append(future)
            heard = job_id in self.heard
        if final is not None:  # finished here before its request waited
            return final
        self._start(loop)
        if heard:
            self._spawn(self._fetch([job_id]))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None
        finally:
            waiting = self.pending.get(job_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self.pending.pop(job_id, None)
                if not self.pending:
                    self.idle_since = time.monotonic()

    def heard_here(self, job: Job) -> bool:
        """A job this process finished (`workers.inline`, `workers.notify.listen_here`), as
        written: its request is answered without reading it back (True: it needs no
        notification)."""
        with self.lock:
            self.finals[job.id] = job
            self.heard[job.id] = None
            _trim(self.finals, self.FINALS)
            _trim(self.heard, self.HEARD)
            loop = self.loop
        if loop is not None:
            _post(loop, self._answered_here, job)
        return True

    def _answered_here(self, job: Job) -> None:
        self.proven = True  # word of finished jobs arrives: the sweeps may be slow
        if self.pending.get(job.id):
            with self.lock:
                self.finals.pop(job.id, None)
            self.counts["here"] += len(self._resolve([job]))

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        moved = self.loop is not loop
        if moved:  # another loop (tests): its own sweeper and listener
            self.loop, self.sweeper, self.listening = loop, None, False
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = loop.create_task(self._sweep())
        if not self.listen:
            return
        with self.lock:
            if self.listener is None or moved:
                self.generation += 1
                self.listener = threading.Thread(
                    target=self._listen,
                    args=(loop, self.generation),
                    name="spillway-serve-finished",
                    daemon=True,
                )
                self.listener.start()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self.tasks.discard)

    # -- on the event loop ---------------------------------------------------------------------

    def _resolve(self, jobs: list[Job]) -> list[str]:
        """Answer the requests waiting for `jobs`; the ids of those it answered."""
        answered = []
        for job in jobs:
            futures = self.pending.pop(job.id, [])
            for future in futures:
                if not future.done():
                    future.set_result(job)
            if futures:
                answered.append(job.id)
        if not self.pending:
            self.idle_since = time.monotonic()
        return answered

    def _notified(self, jobs: list[Job]) -> None:
        self.proven = True
        self.counts["notified"] += len(self._resolve(jobs))

    def _listening(self, generation: int, now: bool) -> None:
        if generation == self.generation:  # not a listener since superseded
            self.listening = now
            self._sweep_soon()  # what finished while nobody listened is found now

    def _sweep_soon(self) -> None:
        if self.nap is not None and not self.nap.done():
            self.nap.set_result(None)

    def _interval(self) -> float:
        trusted = self.listening and self.proven and time.monotonic() >= self.distrust_until
        return self.SLOW_S if trusted else self.FAST_S

    async def _read(self, ids: list[str]) -> list[Job]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self.client.runtime.store.finished_jobs, ids)
        except Exception as exc:  # the store is away: the requests wait on
            log.warning("waiting jobs: the store did not answer (%s)", type(exc).__name__)
            return []

    async def _fetch(self, ids: list[str]) -> None:
        self.counts["notified"] += len(self._resolve(await self._read(ids)))

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        took = 0.0
        while self.pending:
            self.nap = loop.create_future()
            timer = loop.call_later(max(self._interval(), 2 * took), _done, self.nap)
            try:
                await self.nap
            finally:
                timer.cancel()
                self.nap = None
            started = time.monotonic()
            ids = list(self.pending)
            for first in range(0, len(ids), self.PAGE):
                answered = self._resolve(await self._read(ids[first : first + self.PAGE]))
                self.counts["swept"] += len(answered)
                if self.listening and len(self.swept) < 10 * self.HEARD:
                    self.swept.update(dict.fromkeys(answered, time.monotonic()))
            took = time.monotonic() - started
            self._judge()

    def _judge(self) -> None:
        """Jobs a sweep answered that no notification named within `GRACE_S`: some worker does
        not notify (or Redis lost them), so sweep fast for a while."""
        if not self.listening:
            self.swept.clear()
            return
        now = time.monotonic()
        due = [i for i, at in self.swept.items() if now - at >= self.GRACE_S]
        if not due:
            return
        with self.lock:
            missed = [i for i in due if i not in self.heard]
        for i in due:
            del self.swept[i]
        if missed:
            if not self.counts["missed"]:  # once: a worker without `workers.notify` misses them all
                log.info(
                    "a finished job was not announced (workers.notify: an older worker, Redis, or "
                    "a worker that nobody listened to a moment ago): waiting requests are found by "
                    "polling the store every %g s for %g s after each miss",
                    self.FAST_S,
                    self.DISTRUST_S,
                )
            self.counts["missed"] += len(missed)
            self.distrust_until = now + self.DISTRUST_S

    # -- the listener thread -------------------------------------------------------------------

    def _listen(self, loop: asyncio.AbstractEventLoop, generation: int) -> None:
        """Hear finished jobs' ids (`workers.notify`) until nobody waited for `IDLE_S`."""
        rt = self.client.runtime
        backoff = 0.05
        try:
            while not self._stop(loop, generation):
                pubsub = None
                try:
                    pubsub = rt.redis.pubsub()
                    pubsub.subscribe(rt.keys.finished_channel())
                    while not self._stop(loop, generation):
                        self._take(loop, generation, pubsub)
                        backoff = 0.05
                except Exception as exc:  # Redis is away: the sweeps answer meanwhile
                    log.info("not hearing finished jobs (%s); retrying", type(exc).__name__)
                    _post(loop, self._listening, generation, False)
                    time.sleep(backoff)
                    backoff = min(2 * backoff, 2.0)
                finally:
                    if pubsub is not None:
                        with contextlib.suppress(Exception):
                            pubsub.close()
        finally:
            _post(loop, self._listening, generation, False)

    def _stop(self, loop: asyncio.AbstractEventLoop, generation: int) -> bool:
        with self.lock:
            if generation != self.generation:
                return True
            idle = not self.pending and time.monotonic() - self.idle_since > self.IDLE_S
            if idle or loop.is_closed():
                self.listener = None  # the next wait starts another
                return True
            return False

    def _take(self, loop: asyncio.AbstractEventLoop, generation: int, pubsub: Any) -> None:
        """What arrived within a second: (re)subscribed, ids of finished jobs."""
        message = pubsub.get_message(timeout=1.0)
        ids: list[str] = []
        while message is not None:
            if message["type"] == "subscribe":  # also after redis-py reconnected on its own
                _post(loop, self._listening, generation, True)
            elif message["type"] == "message":
                data = message["data"]
                ids.append(data.decode() if isinstance(data, bytes) else str(data))
            if len(ids) >= self.PAGE:
                break
            message = pubsub.get_message(timeout=0.0)
        if not ids:
            return
        with self.lock:
            mine = [i for i in ids if i in self.pending]
            self.heard.update(dict.fromkeys(ids))
            _trim(self.heard, self.HEARD)
        if not mine:
            return
        try:
            jobs = self.client.runtime.store.finished_jobs(mine)
        except Exception as exc:  # the sweeps answer them
            log.warning("waiting jobs: the store did not answer (%s)", type(exc).__name__)
            return
        _post(loop, self._notified, jobs)


def _trim(recent: OrderedDict[str, Any], size: int) -> None:
    while len(recent) > size:
        recent.popitem(last=False)


def _done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _post(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """Run `fn(*args)` on `loop` (from another thread); nothing if the loop is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


class Submitter:
    """Chat completions' submits, gathered: the requests that arrive while earlier ones are
    being stored go together (`submit_many`: one limiter read, one transaction, one pipelined
    publish). A lone request goes at once, so quiet times add no wait. With a `runner`, jobs it
    has a free slot for are run in this process instead of published."""

    MAX_TOGETHER = 500
    DRAINS = 4  # submits in flight at once, each with what had gathered when it started

    def __init__(self, client: Client, pool: ThreadPoolExecutor, runner: InlineRunner | None = None) -> None:
        self.client, self.pool, self.runner = client, pool, runner
        self.pending: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self.draining = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, **fields: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((fields, future))
        if self.draining < self.DRAINS:
            self.draining += 1
            task = asyncio.create_task(self._drain())
            self.tasks.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self.tasks.discard)
        return await future

    def _submit(self, submits: list[dict[str, Any]]) -> list[Any]:
        return submit_many(self.client, submits, runner=self.runner)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                taken, self.pending = self.pending[: self.MAX_TOGETHER], self.pending[self.MAX_TOGETHER :]
                try:
                    results = await loop.run_in_executor(
                        self.pool, self._submit, [fields for fields, _ in taken]
                    )
                except Exception as exc:  # the store or Redis failed the whole lot
                    results = [exc] * len(taken)
                for (_, future), result in zip(taken, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, SpillwayError):
                        future.set_exception(api_error(result))
                    elif isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self.draining -= 1
