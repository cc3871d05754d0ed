"""`POST /v1/chat/completions` (a job, answered when done) and `GET /v1/models`."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from producer.batch import chat_completion
from producer.batchfile import OPENAI_URL, openai_fields
from producer.client import Client
from producer.jobs import submit_many
from producer.ops.openai.errors import ApiError, api_error
from producer.ops.openai.handler import ApiHandler
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
    """HTTP requests waiting for their jobs: one loop asks the store for all of them at once."""

    POLL_S = 0.01
    PAGE = 500

    def __init__(self, client: Client, pool: ThreadPoolExecutor) -> None:
        self.client, self.pool = client, pool
        self.pending: dict[str, list[asyncio.Future[Job]]] = {}
        self.loop_task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self.pending.setdefault(job_id, []).append(future)
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.create_task(self._poll())
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

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending:
            ids = list(self.pending)
            for start in range(0, len(ids), self.PAGE):
                try:
                    done = await loop.run_in_executor(
                        self.pool, self.client.runtime.store.finished_jobs, ids[start : start + self.PAGE]
                    )
                except Exception as exc:  # the store is away: the requests wait on
                    log.warning("waiting jobs: the store did not answer (%s)", type(exc).__name__)
                    done = []
                for job in done:
                    for future in self.pending.pop(job.id, []):
                        if not future.done():
                            future.set_result(job)
            await asyncio.sleep(self.POLL_S)


class Submitter:
    """Chat completions' submits, gathered: the requests that arrive while earlier ones are
    being stored go together (`submit_many`: one limiter read, one transaction, one pipelined
    publish). A lone request goes at once, so quiet times add no wait."""

    MAX_TOGETHER = 500
    DRAINS = 4  # submits in flight at once, each with what had gathered when it started

    def __init__(self, client: Client, pool: ThreadPoolExecutor) -> None:
        self.client, self.pool = client, pool
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

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                taken, self.pending = self.pending[: self.MAX_TOGETHER], self.pending[self.MAX_TOGETHER :]
                try:
                    results = await loop.run_in_executor(
                        self.pool, submit_many, self.client, [fields for fields, _ in taken]
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
