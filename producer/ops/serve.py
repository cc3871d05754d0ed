"""`spillway serve`: one small HTTP service on Tornado (which Flower already brings).

    GET  /metrics          Prometheus: queues, budgets, jobs; calls, tokens, cost (producer/ops/metrics.py)
    GET  /v1/status        the JSON of `spillway status --json`
    GET  /v1/usage         the JSON of `spillway usage --json` (?since=24h&by=model)
    POST /v1/jobs          submit a job (JSON body as `producer.submit`'s arguments) → 202
    GET  /v1/jobs/{id}     the job's result, as `spillway submit --json` prints it
    GET  /v1/dashboard     one sample of the live page's charts (producer/ops/dashboard.py)
    GET  /dashboard        the live page (`/` redirects there), and /static/… its files

Every route but the live page and its files (which hold no data) needs
``Authorization: Bearer $SPILLWAY_API_TOKEN``. Blocking work (store,
Redis, broker) runs in a thread pool so one slow call never stalls the others. An
idempotency key is the caller's own: it is stored behind an id derived from the token
(never the token itself), so two callers' keys never name each other's jobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler, stream_request_body

from producer.client import Client
from producer.ops.dashboard import DashboardFeed, dashboard_routes, dashboard_sample
from producer.ops.metrics import metrics_text
from producer.ops.openai import inline, openai_routes
from producer.ops.tenants import Tenant, Tenants, token_scope
from producer.status import status_report
from producer.usage import parse_since, usage_report
from workers.errors import (
    BudgetExhausted,
    ConfigError,
    IdempotencyConflict,
    InputError,
    NoRouteError,
    ServiceUnavailable,
    SpillwayError,
)
from workers.results import JobResult

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
# connections the kernel queues before serve accepts them: a burst of 1,000 clients overflowed
# the default 128 (connection resets) while serve was busy
BACKLOG = 2048
#: A body sent without a length (chunked) is read this far to answer 413; beyond, Tornado
#: drops the connection with a bare 400.
DRAIN_BODY_BYTES = 8 * MAX_BODY_BYTES
TOO_LARGE = f"the body is larger than {MAX_BODY_BYTES // 2**20} MiB ({MAX_BODY_BYTES:,} bytes), the limit"


class Base(RequestHandler):
    def initialize(self, client: Client, tenants: Tenants, pool: ThreadPoolExecutor) -> None:
        self.client, self.tenants, self.pool = client, tenants, pool
        self.rt, self.celery = client.runtime, client.app
        self.caller: str | None = None
        self.tenant: str | None = None  # None: --insecure-no-auth
        self.principal: Tenant | None = None

    def prepare(self) -> None:
        if not self.tenants:
            return  # --insecure-no-auth
        tenant = self.tenants.authenticate(self.request.headers.get("Authorization", ""))
        if tenant is None:
            self.set_header("WWW-Authenticate", 'Bearer realm="spillway"')
            raise HTTPError(401, reason="missing or wrong bearer token")
        self.caller, self.tenant, self.principal = tenant.scope, tenant.name, tenant

    async def blocking(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        except NoRouteError as exc:
            raise HTTPError(422, reason=str(exc)) from exc
        except IdempotencyConflict as exc:
            raise HTTPError(409, reason=str(exc)) from exc
        except BudgetExhausted as exc:
            raise HTTPError(429, reason=str(exc)) from exc
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


class OperatorOnly(Base):
    """Routes that show every tenant's usage and every account: the operator's token only."""

    def prepare(self) -> None:
        super().prepare()
        if self.principal is not None and not self.principal.operator:
            raise HTTPError(
                403,
                reason="this route shows every tenant's usage: it takes the operator's token "
                "($SPILLWAY_API_TOKEN, or a tenant with operator = true)",
            )


class Metrics(OperatorOnly):
    async def get(self) -> None:
        body = await self.blocking(metrics_text, self.rt, self.celery)
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(body)


class Status(OperatorOnly):
    async def get(self) -> None:
        self.reply(200, await self.blocking(status_report, self.rt, self.celery))


class Dashboard(OperatorOnly):
    """The live page's data: one sample, shared by every tab polling within a second."""

    def initialize(self, feed: DashboardFeed, **args: Any) -> None:
        super().initialize(**args)
        self.feed = feed

    async def get(self) -> None:
        self.reply(200, await self.blocking(self.feed.sample))


class Usage(OperatorOnly):
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
        tier = body.get("tier")
        known = isinstance(tier, str) and tier in self.rt.settings.tiers  # else: 422 naming it
        if self.principal is not None and known and tier not in self.principal.tiers:
            allowed = ", ".join(self.principal.tiers)
            raise HTTPError(403, reason=f"tier {tier!r} is not open to this token (it may use: {allowed})")
        handle = await self.blocking(
            lambda: self.client.submit(
                body.pop("prompt", None),
                **_job_kwargs(body),
                idempotency_scope=self.caller,
                tenant=self.tenant,
            )
        )
        self.reply(202, {"job_id": handle.id, "status_url": f"/v1/jobs/{handle.id}"})


def caller_id(token: str | None) -> str | None:
    """A stable id of the caller a token authenticates: the scope of its idempotency keys."""
    return None if token is None else token_scope(token)


def _job_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    for required in ("task", "tier"):
        if required not in body:
            raise InputError(f"{required}: is required")
    return body


class Job(Base):
    async def get(self, job_id: str) -> None:
        job = await self.blocking(self.rt.store.job, job_id)
        theirs = self.principal is None or self.principal.operator or job is None or job.tenant == self.tenant
        if job is None or not theirs:  # another tenant's job does not exist for this one
            raise HTTPError(404, reason=f"no job with id {job_id!r}")
        self.reply(200, JobResult.from_job(job).to_json())


def make_app(client: Client, token: str | None = None, *, tenants: Tenants | None = None) -> Application:
    """The routes; callers are the config's tenants and `token` (``$SPILLWAY_API_TOKEN``)."""
    if tenants is None:
        tenants = Tenants.from_settings(client.runtime.settings, client.env.environ, token)
    pool = ThreadPoolExecutor(32, "spillway-serve")
    # one broker connection per thread that may publish (kombu's default pool of 10 made the
    # other submitting threads queue for one)
    client.app.conf.broker_pool_limit = 40
    args = {"client": client, "tenants": tenants, "pool": pool}
    feed = DashboardFeed(lambda: dashboard_sample(client))
    return Application(
        [
            (r"/metrics", Metrics, args),
            (r"/v1/status", Status, args),
            (r"/v1/usage", Usage, args),
            (r"/v1/jobs", Jobs, args),
            (r"/v1/jobs/([0-9a-f]{32})", Job, args),
            (r"/v1/dashboard", Dashboard, {**args, "feed": feed}),
            *dashboard_routes(),
            *openai_routes(client, tenants, pool),
        ],
        default_handler_class=NotFound,
        default_handler_args=args,
    )


class NotFound(Base):
    def prepare(self) -> None:
        raise HTTPError(404, reason=f"no such path {self.request.path}")


def make_server(client: Client, token: str | None = None, *, tenants: Tenants | None = None) -> HTTPServer:
    """The server `serve` runs (call `listen` on it inside a running event loop)."""
    return HTTPServer(make_app(client, token, tenants=tenants), max_body_size=MAX_BODY_BYTES + 1024)


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """The sockets serve accepts on (several processes may share them: `--processes`)."""
    try:
        return bind_sockets(port, address=host, backlog=BACKLOG)
    except OSError as exc:  # in use, or an address this machine does not have
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def serve(
    client: Client, *, host: str, port: int, tenants: Tenants, sockets: list[socket.socket] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT; on `sockets` already bound (a process of several that
    share them), else on a socket of its own."""

    async def main() -> None:
        server = make_server(client, tenants=tenants)
        server.add_sockets(sockets or listening_sockets(host, port))
        if not sockets:
            print(f"spillway serve listening on http://{host}:{port}", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        # Stop as a Celery worker does on SIGTERM: take nothing new, let the calls this process
        # makes itself finish and answer them (each ends within its provider's timeout; a
        # SIGKILL meanwhile leaves their jobs to the reconciler).
        server.stop()
        inline.stop_taking()
        while inline.calls_in_flight():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # their answers leave

    asyncio.run(main())
