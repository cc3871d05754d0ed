"""`spillway serve`: one small HTTP service on Tornado (which Flower already brings).

    GET  /metrics          Prometheus: queue lengths, budget left per account, jobs by status
    GET  /v1/status        the JSON of `spillway status --json`
    GET  /v1/usage         the JSON of `spillway usage --json` (?since=24h&by=model)
    POST /v1/jobs          submit a job (JSON body as `producer.submit`'s arguments) → 202
    GET  /v1/jobs/{id}     the job's result, as `spillway submit --json` prints it

Every route needs ``Authorization: Bearer $SPILLWAY_API_TOKEN``. Blocking work (store,
Redis, broker) runs in a thread pool so one slow call never stalls the others. An
idempotency key is the caller's own: it is stored behind an id derived from the token
(never the token itself), so two callers' keys never name each other's jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from tornado.httpserver import HTTPServer
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from producer.client import Client
from producer.status import status_report
from producer.usage import parse_since, usage_report
from workers.errors import IdempotencyConflict, InputError, NoRouteError, ServiceUnavailable, SpillwayError
from workers.runtime import Runtime

log = logging.getLogger("spillway.serve")

JOB_FIELDS = {
    "prompt",
    "messages",
    "task",
    "tier",
    "system",
    "max_tokens",
    "temperature",
    "stop",
    "json_mode",
    "preferred_provider",
    "idempotency_key",
    "callback_url",
    "deadline_s",
}
MAX_BODY_BYTES = 8 * 1024 * 1024
#: A body sent without a length (chunked) is read this far to answer 413; beyond, Tornado
#: drops the connection with a bare 400.
DRAIN_BODY_BYTES = 8 * MAX_BODY_BYTES
TOO_LARGE = f"the body is larger than {MAX_BODY_BYTES // 2**20} MiB ({MAX_BODY_BYTES:,} bytes), the limit"


class StatusCollector:
    """Reads the limiter, the broker and the store when Prometheus scrapes."""

    def __init__(self, rt: Runtime, app: Any) -> None:
        self.rt, self.app = rt, app

    def collect(self) -> Any:
        report = status_report(self.rt, self.app)
        queue = GaugeMetricFamily(
            "spillway_queue_length", "Messages waiting in a provider queue", labels=["queue"]
        )
        remaining = GaugeMetricFamily(
            "spillway_budget_remaining",
            "Units left in a bucket now",
            labels=["provider", "model", "account", "limit"],
        )
        capacity = GaugeMetricFamily(
            "spillway_budget_limit",
            "A bucket's limit (learned, if lower)",
            labels=["provider", "model", "account", "limit"],
        )
        in_flight = GaugeMetricFamily(
            "spillway_in_flight", "Calls holding a lease", labels=["provider", "account"]
        )
        usable = GaugeMetricFamily(
            "spillway_account_available",
            "1 if the account takes calls now",
            labels=["provider", "model", "account", "state"],
        )
        for p in report["providers"]:
            if p["queue_length"] is not None:
                queue.add_metric([p["queue"]], p["queue_length"])
            for a in p["accounts"]:
                for limit, v in a["remaining"].items():
                    labels = [p["provider"], a["model"], a["account"], limit]
                    remaining.add_metric(labels, v["remaining"])
                    capacity.add_metric(labels, v["limit"])
                in_flight.add_metric([p["provider"], a["account"]], a["in_flight"])
                usable.add_metric(
                    [p["provider"], a["model"], a["account"], a["state"]],
                    1 if a["state"] in ("available", "probing") else 0,
                )
        jobs = GaugeMetricFamily("spillway_jobs", "Jobs in the store by status", labels=["status"])
        for status, count in sorted(self.rt.store.count_by_status().items()):
            jobs.add_metric([status], count)
        yield from (queue, remaining, capacity, in_flight, usable, jobs)


class Base(RequestHandler):
    def initialize(self, client: Client, token: str | None, pool: ThreadPoolExecutor) -> None:
        self.client, self.token, self.pool = client, token, pool
        self.rt, self.celery = client.runtime, client.app
        self.caller = caller_id(token)

    def prepare(self) -> None:
        if self.token is None:
            return
        header = self.request.headers.get("Authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            self.set_header("WWW-Authenticate", 'Bearer realm="spillway"')
            raise HTTPError(401, reason="missing or wrong bearer token")

    async def blocking(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        except NoRouteError as exc:
            raise HTTPError(422, reason=str(exc)) from exc
        except IdempotencyConflict as exc:
            raise HTTPError(409, reason=str(exc)) from exc
        except InputError as exc:
            raise HTTPError(422, reason=str(exc)) from exc
        except ServiceUnavailable as exc:
            raise HTTPError(503, reason=str(exc)) from exc
        except SpillwayError as exc:
            raise HTTPError(500, reason=str(exc)) from exc

    def reply(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str, ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason if status_code < 500 or kwargs.get("exc_info") is None else "internal error"
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.reason:
            reason = exc.reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"status": status_code, "message": reason}}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, HTTPError):
            return  # a client error, answered; bodies (prompts) are never logged
        log.error("request failed: %s: %s", typ.__name__, value)


class Metrics(Base):
    async def get(self) -> None:
        registry = CollectorRegistry()
        registry.register(StatusCollector(self.rt, self.celery))
        body = await self.blocking(generate_latest, registry)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(body)


class Status(Base):
    async def get(self) -> None:
        self.reply(200, await self.blocking(status_report, self.rt, self.celery))


class Usage(Base):
    async def get(self) -> None:
        by = self.get_query_argument("by", "model")
        since = self.get_query_argument("since", None)
        report = await self.blocking(lambda: usage_report(self.rt.store, since=parse_since(since), by=by))
        self.reply(200, report)


@stream_request_body
class Jobs(Base):
    """The body is streamed in so that one too large gets a 413 that says so (the server's
    own limit answers with a bare 400 and no reason)."""

    def prepare(self) -> None:
        self.chunks: list[bytes] = []
        self.received = 0
        super().prepare()
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise HTTPError(413, reason=TOO_LARGE)
        self.request.connection.set_max_body_size(DRAIN_BODY_BYTES)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received <= MAX_BODY_BYTES:
            self.chunks.append(chunk)

    async def post(self) -> None:
        if self.received > MAX_BODY_BYTES:
            raise HTTPError(413, reason=TOO_LARGE)
        try:
            body = json.loads(b"".join(self.chunks) or b"null")
        except (ValueError, RecursionError):
            raise HTTPError(400, reason="the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, reason="the body must be a JSON object")
        unknown = sorted(set(body) - JOB_FIELDS)
        if unknown:
            raise HTTPError(
                400, reason=f"unknown field(s): {', '.join(unknown)} (known: {', '.join(sorted(JOB_FIELDS))})"
            )
        handle = await self.blocking(
            lambda: self.client.submit(
                body.pop("prompt", None), **_job_kwargs(body), idempotency_scope=self.caller
            )
        )
        self.reply(202, {"job_id": handle.id, "status_url": f"/v1/jobs/{handle.id}"})


def caller_id(token: str | None) -> str | None:
    """A stable id of the caller a token authenticates: the scope of its idempotency keys."""
    return None if token is None else "t" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _job_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    for required in ("task", "tier"):
        if required not in body:
            raise InputError(f"{required}: is required")
    return body


class Job(Base):
    async def get(self, job_id: str) -> None:
        try:
            result = await self.blocking(self.client.get, job_id)
        except HTTPError as exc:
            if exc.status_code == 422:
                raise HTTPError(404, reason=f"no job with id {job_id!r}") from exc
            raise
        self.reply(200, result.to_json())


def make_app(client: Client, token: str | None) -> Application:
    args = {"client": client, "token": token, "pool": ThreadPoolExecutor(16, "spillway-serve")}
    return Application(
        [
            (r"/metrics", Metrics, args),
            (r"/v1/status", Status, args),
            (r"/v1/usage", Usage, args),
            (r"/v1/jobs", Jobs, args),
            (r"/v1/jobs/([0-9a-f]{32})", Job, args),
        ],
        default_handler_class=NotFound,
        default_handler_args=args,
    )


class NotFound(Base):
    def prepare(self) -> None:
        raise HTTPError(404, reason=f"no such path {self.request.path}")


def make_server(client: Client, token: str | None) -> HTTPServer:
    """The server `serve` runs (call `listen` on it inside a running event loop)."""
    return HTTPServer(make_app(client, token), max_body_size=MAX_BODY_BYTES + 1024)


def serve(client: Client, *, host: str, port: int, token: str | None) -> None:
    async def main() -> None:
        server = make_server(client, token)
        server.listen(port, address=host)
        print(f"spillway serve listening on http://{host}:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
