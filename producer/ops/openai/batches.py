"""`/v1/batches`: an OpenAI batch object over an ordinary Spillway batch."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import redis

from producer.batch import run_batch
from producer.batchfile import OPENAI_URL
from producer.ops.openai.errors import ApiError, not_found
from producer.ops.openai.handler import ApiHandler
from producer.ops.openai.routing import line_router, route_for
from workers import execution, parking
from workers.config import Candidate
from workers.limiter import Costs, tenants
from workers.runtime import Runtime
from workers.store import FAILED, OPEN, SUCCEEDED, ApiBatch, aware, utcnow

log = logging.getLogger("spillway.openai")

WINDOWS = {"24h": timedelta(hours=24)}


# -- batches -------------------------------------------------------------------------------------


def batch_object(rt: Runtime, api: ApiBatch) -> dict[str, Any]:
    """The OpenAI batch object, its status read from the Spillway batch underneath."""
    created = int(aware(api.created_at).timestamp())
    window = WINDOWS.get(api.completion_window, timedelta(hours=24))
    body: dict[str, Any] = {
        "id": api.id,
        "object": "batch",
        "endpoint": api.endpoint,
        "errors": {"object": "list", "data": api.errors} if api.errors else None,
        "input_file_id": api.input_file_id,
        "completion_window": api.completion_window,
        "status": "failed",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + int(window.total_seconds()),
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": api.meta,
    }
    if api.state == "validating":
        body["status"] = "validating"  # its jobs are being stored and sent
        return body
    if api.batch_id is None:
        body["failed_at"] = created
        return body
    if api.state == "cancelling":
        # a job that was running at the cancel and went back in line (a 429, a wait) is
        # cancelled now: the cancel holds until no job of the batch is open
        cancel_jobs(rt, api.batch_id)
    batch, totals = rt.store.batch(api.batch_id), rt.store.batch_totals(api.batch_id)
    counts = totals["by_status"]
    succeeded, failed = counts.get(SUCCEEDED, 0), counts.get(FAILED, 0)
    still_open = sum(counts.get(s, 0) for s in OPEN)
    last = int(totals["last_finished_s"]) if totals["last_finished_s"] else None
    body["in_progress_at"] = created
    body["request_counts"] = {"total": totals["total"], "completed": succeeded, "failed": failed}
    if api.state in ("cancelling", "cancelled"):
        body["cancelling_at"] = int(aware(api.cancelling_at).timestamp()) if api.cancelling_at else created
        body["status"] = "cancelling" if still_open else "cancelled"
        if not still_open:
            body["cancelled_at"] = last or body["cancelling_at"]
    elif batch is not None and batch.finished_at is not None and not still_open:
        body["status"] = "completed"
        body["finalizing_at"] = body["completed_at"] = int(aware(batch.finished_at).timestamp())
    elif not still_open:
        body["status"] = "finalizing"  # every job is done; the chord's callback writes the summary
        body["finalizing_at"] = last
    else:
        body["status"] = "in_progress"
    if body["status"] in ("completed", "cancelled"):
        hexid = api.id.removeprefix("batch_")
        body["output_file_id"] = f"file-output-{hexid}" if succeeded else None
        body["error_file_id"] = f"file-errors-{hexid}" if failed else None
    return body


class Batches(ApiHandler):
    async def post(self) -> None:
        body = self.json_body()
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        window, metadata = body.get("completion_window"), body.get("metadata")
        if not isinstance(file_id, str) or not file_id:
            raise ApiError(400, "input_file_id: a file id is required", param="input_file_id")
        if endpoint != OPENAI_URL:
            raise ApiError(
                400, f"endpoint: Spillway batches {OPENAI_URL} only, got {endpoint!r}", param="endpoint"
            )
        if window not in WINDOWS:
            raise ApiError(
                400,
                f"completion_window: expected one of {', '.join(WINDOWS)}, got {window!r}",
                param="completion_window",
            )
        metadata = _metadata(metadata)
        upload = await self.blocking(self.rt.store.file, self.tenant.name, file_id)
        if upload is None:
            raise not_found("File", file_id)
        if upload.purpose != "batch":
            raise ApiError(
                400, f"input_file_id: {file_id} was not uploaded with purpose 'batch'", param="input_file_id"
            )
        meta = metadata or {}
        router = line_router(self.tenant, meta.get("spillway_task"), meta.get("spillway_tier"))
        route_for(
            self.rt.settings, self.tenant, "spillway", meta.get("spillway_task"), meta.get("spillway_tier")
        )
        task = meta.get("spillway_task") or self.tenant.task
        tier = meta.get("spillway_tier") or self.tenant.tier

        def numbered() -> Iterator[tuple[int, Any]]:
            for number, raw in enumerate(upload.content.splitlines(), 1):
                if raw.strip():
                    yield number, json.loads(raw)  # checked at upload

        # the API's row first: a serve that dies while the batch is stored leaves it "validating"
        # (its jobs still run), never a batch its tenant cannot see
        api = await self.blocking(
            self.rt.store.add_api_batch,
            id=f"batch_{uuid.uuid4().hex[:24]}",
            owner=self.tenant.name,
            batch_id=None,
            state="validating",
            input_file_id=file_id,
            endpoint=endpoint,
            completion_window=window,
            meta=metadata,
        )
        try:
            handle = await self.blocking(
                run_batch,
                self.client,
                numbered,
                task=task,
                tier=tier,
                key=api.id,
                skip_invalid=True,
                route_model=router,
                tenant=self.tenant.name if self.tenants else None,
                # the completion window is the jobs' deadline: a route in `auto` mode may then
                # send them through the providers' batch APIs at their price
                deadline_s=WINDOWS[window].total_seconds(),
            )
        except ApiError as exc:
            error = {"code": exc.body["error"]["code"] or "invalid", "message": exc.body["error"]["message"]}
            await self.blocking(self.rt.store.update_api_batch, api.id, state="failed", errors=[error])
            raise
        await self.blocking(self.rt.store.update_api_batch, api.id, batch_id=handle.id, state=None)
        api = await self.blocking(self.rt.store.api_batch, self.tenant.name, api.id)
        self.reply(await self.blocking(batch_object, self.rt, api))

    async def get(self) -> None:
        after = self.get_query_argument("after", None)
        try:
            limit = int(self.get_query_argument("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit: expected an integer from 1 to 100", param="limit")
        rows = await self.blocking(self.rt.store.api_batches, self.tenant.name, after=after, limit=limit + 1)
        data = [await self.blocking(batch_object, self.rt, row) for row in rows[:limit]]
        self.reply(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(rows) > limit,
            }
        )


class OneBatch(ApiHandler):
    async def get(self, batch_id: str) -> None:
        api = await self.blocking(self.rt.store.api_batch, self.tenant.name, batch_id)
        if api is None:
            raise not_found("Batch", batch_id)
        self.reply(await self.blocking(batch_object, self.rt, api))


class CancelBatch(ApiHandler):
    async def post(self, batch_id: str) -> None:
        api = await self.blocking(self.rt.store.api_batch, self.tenant.name, batch_id)
        if api is None:
            raise not_found("Batch", batch_id)
        status = (await self.blocking(batch_object, self.rt, api))["status"]
        if status in ("completed", "failed", "expired"):
            raise ApiError(
                409, f"batch {batch_id} is already {status}", param="batch_id", code="batch_not_cancellable"
            )
        if api.state is None:
            await self.blocking(
                self.rt.store.update_api_batch, api.id, state="cancelling", cancelling_at=utcnow()
            )
        await self.blocking(cancel_jobs, self.rt, api.batch_id)
        api = await self.blocking(self.rt.store.api_batch, self.tenant.name, batch_id)
        self.reply(await self.blocking(batch_object, self.rt, api))


def cancel_jobs(rt: Runtime, batch_id: str) -> None:
    """Cancel the batch's open jobs; their tenant gets back what they held, and the providers
    the budget those parked for later had reserved (their messages are published now, to find
    them cancelled: the chord goes on). A job waiting in the broker gives its reservation back
    when a worker takes it and finds it cancelled."""
    cancelled = rt.store.cancel_open_jobs(batch_id)
    for _, tenant, created_at, est_input, request in cancelled:
        if tenant is not None:
            held = int(Costs.estimate(est_input, request["max_tokens"]).tokens)
            tenants.give_back(rt.redis, rt.keys, rt.settings, tenant, held, aware(created_at))
    try:
        parked = parking.due_now(rt.redis, rt.keys, {row[0] for row in cancelled}, time.time())
    except redis.RedisError as exc:  # they find their jobs cancelled when due, and give back then
        log.warning("batch %s: cancelled jobs stay parked until due (%s)", batch_id, exc)
        return
    for task in parked:
        if task.get("reservation"):
            candidate = Candidate(task["provider"], task["model"])
            execution.release_reservation(rt, candidate, task["reservation"])


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise ApiError(
            400, "metadata: at most 16 string keys (64 characters) and values (512)", param="metadata"
        )
    return value
