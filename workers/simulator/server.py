"""The provider simulator: a real HTTP server on 127.0.0.1 that answers like OpenAI,
Anthropic and Gemini — their bodies, their rate-limit headers, their 429s — enforces its
own per-key limits, and injects latency and faults on demand.

Paths: ``/<provider>/...`` with the provider's own path below it (``/groq/openai/v1/chat/
completions``, ``/anthropic/v1/messages``, ``/gemini/v1beta/models/<m>:generateContent``).
Control: ``GET /_sim/stats``, ``POST /_sim/faults`` ``{"provider": p, "faults": {...}}``,
``POST /_sim/reset``.

Batch APIs (OpenAI Batch + files, Anthropic Message Batches, Gemini batchGenerateContent):
``batch_routes`` picks them out before anything else; ``batches`` explains the engine.
"""

from __future__ import annotations

import fnmatch
import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from workers.simulator import batch_routes, ratelimit_headers
from workers.simulator.batches import BatchBook
from workers.simulator.formats import FORMATS, BadSimRequest, SimRequest, reply
from workers.simulator.quota import Quota, Refusal
from workers.simulator.settings import FAULTS, SimProvider, SimSettings

OVERLOADED_STATUS = {"anthropic": 529}


class Simulation:
    """Shared state of one simulator: quotas, faults, counters."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.random = random.Random(settings.seed)
        self.lock = threading.Lock()
        self.quotas: dict[str, Quota] = {}
        self.stats: dict[str, Counter[str]] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.quotas = {
                name: Quota(p.limits, p.model_limits, p.daily_reset, p.shared_quota)
                for name, p in self.settings.providers.items()
            }
            self.stats = {name: Counter() for name in self.settings.providers}
            self.peak: dict[str, int] = dict.fromkeys(self.settings.providers, 0)
            self.in_flight: dict[str, int] = dict.fromkeys(self.settings.providers, 0)
            self.batch_book = BatchBook(self.settings.seed)  # batch APIs: every batch and file

    def count(self, provider: str, what: str) -> None:
        with self.lock:
            self.stats[provider][what] += 1

    def draw(self) -> float:
        with self.lock:
            return self.random.random()

    def fault(self, provider: SimProvider) -> str | None:
        if not provider.faults:
            return None
        roll, edge = self.draw(), 0.0
        for name in FAULTS:
            edge += provider.faults.get(name, 0.0)
            if roll < edge:
                return name
        return None

    def latency_s(self, provider: SimProvider) -> float:
        median, p95 = provider.latency.median_ms, provider.latency.p95_ms
        if median <= 0:
            return 0.0
        sigma = math.log(p95 / median) / 1.645 if p95 > median else 0.0
        with self.lock:
            return self.random.lognormvariate(math.log(median), sigma) / 1000

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                name: {**counter, "peak_in_flight": self.peak[name]} for name, counter in self.stats.items()
            }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server: SimServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: prompts must not reach logs, and the counters say what happened

    # -- plumbing -----------------------------------------------------------------------------

    def _send(
        self, status: int, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _reset_connection(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    # -- control ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        if batch_routes.handle(self, "GET"):  # the batch APIs (batch_routes.py)
            return
        if urlsplit(self.path).path == "/_sim/stats":
            self._send(200, self.server.sim.snapshot())
        else:
            self._send(404, {"error": {"message": f"no such path {self.path}"}})

    def do_POST(self) -> None:
        if batch_routes.handle(self, "POST"):  # the batch APIs: before the JSON read (files are multipart)
            return
        url = urlsplit(self.path)
        sim = self.server.sim
        try:
            body = self._body()
        except ValueError:
            body = None
            if not url.path.startswith("/_sim/"):
                self._answer_bad_json(url.path)
                return
        if url.path == "/_sim/faults":
            provider = sim.settings.providers.get((body or {}).get("provider", ""))
            faults = (body or {}).get("faults") or {}
            if provider is None or not set(faults) <= set(FAULTS):
                self._send(400, {"error": {"message": f"unknown provider or fault; faults: {FAULTS}"}})
                return
            provider.faults = {k: float(v) for k, v in faults.items() if v}
            self._send(200, {"ok": True})
        elif url.path == "/_sim/reset":
            sim.reset()
            self._send(200, {"ok": True})
        else:
            self._provider_call(url.path, dict(parse_qsl(url.query)), body)

    def _answer_bad_json(self, path: str) -> None:
        provider = self.server.sim.settings.providers.get(path.strip("/").split("/", 1)[0])
        fmt = FORMATS[provider.api if provider else "openai"]
        self._send(400, fmt.error(400, "bad_request", "the body is not valid JSON"))

    # -- the provider API ---------------------------------------------------------------------

    def _provider_call(self, path: str, query: dict[str, str], body: Any) -> None:
        sim = self.server.sim
        name, _, rest = path.strip("/").partition("/")
        provider = sim.settings.providers.get(name)
        if provider is None:
            self._send(404, {"error": {"message": f"no simulated provider {name!r}"}})
            return
        fmt = FORMATS[provider.api]
        try:
            req = replace(fmt.parse("/" + rest, self.headers, body, query), tokenizer=provider.tokenizer)
        except BadSimRequest as exc:
            sim.count(name, "bad_request")
            self._send(400, fmt.error(400, "bad_request", str(exc)))
            return
        if provider.require_key and (
            not req.key or any(fnmatch.fnmatchcase(req.key, p) for p in provider.reject_keys)
        ):
            sim.count(name, "auth_error")
            status = 400 if provider.api == "gemini" else 401
            self._send(status, fmt.error(status, "auth", "Incorrect API key provided"))
            return
        if req.model and provider.model_limits and req.model not in provider.model_limits:
            sim.count(name, "model_not_found")  # as the providers do: a typo is a 404, not an answer
            self._send(404, fmt.error(404, "model_not_found", f"The model `{req.model}` does not exist"))
            return
        sim.count(name, "requests")
        fault = sim.fault(provider)
        if fault is not None:
            sim.count(name, f"fault_{fault}")
            self._fault(provider, fault, req)
            return
        self._complete(provider, req)

    def _fault(self, provider: SimProvider, fault: str, req: SimRequest) -> None:
        fmt = FORMATS[provider.api]
        if fault == "reset":
            self._reset_connection()
        elif fault == "timeout":
            time.sleep(provider.hang_s)
            self._reset_connection()
        elif fault == "malformed":
            self._send(200, None, raw=b'{"choices": [{"message": ')
        elif fault == "error_500":
            self._send(
                500, fmt.error(500, "server", "The server had an error while processing your request.")
            )
        elif fault == "error_503":
            self._send(503, fmt.error(503, "overloaded", "The service is currently unavailable."))
        elif fault == "overloaded":
            status = OVERLOADED_STATUS.get(provider.api, 503)
            self._send(status, fmt.error(status, "overloaded", "Overloaded"))
        elif fault == "insufficient_quota":
            self._send(
                429,
                fmt.error(
                    429,
                    "insufficient_quota",
                    "You exceeded your current quota, please check your plan and billing details.",
                ),
            )
        elif fault == "rate_limit":
            self._send(
                429, *ratelimit_headers.refusal_body_and_headers(provider, fmt, req, None, {}, time.time())
            )

    def _complete(self, provider: SimProvider, req: SimRequest) -> None:
        sim = self.server.sim
        quota = sim.quotas[provider.name]
        accounts = quota.accounts(req.key or "anonymous", req.model)
        text, out_tokens, cut = reply(req, provider.name)
        # Gemini counts input tokens only toward TPM; the others reserve max_tokens up front.
        reserve = req.input_tokens + (0 if provider.api == "gemini" else req.max_tokens)
        costs = {"requests": 1, "tokens": reserve, "input": req.input_tokens, "output": req.max_tokens}
        now = time.time()
        refusal: Refusal | None = quota.admit(accounts, costs, now)
        if refusal is not None:
            sim.count(provider.name, "rate_limited")
            report = quota.report(accounts, now)
            self._send(
                429,
                *ratelimit_headers.refusal_body_and_headers(
                    provider, FORMATS[provider.api], req, refusal, report, now
                ),
            )
            return
        with sim.lock:
            sim.in_flight[provider.name] += 1
            sim.peak[provider.name] = max(sim.peak[provider.name], sim.in_flight[provider.name])
        try:
            time.sleep(sim.latency_s(provider))
        finally:
            unused = 0 if provider.api == "gemini" else req.max_tokens - out_tokens
            quota.release(accounts, {"tokens": unused, "output": req.max_tokens - out_tokens}, time.time())
            with sim.lock:
                sim.in_flight[provider.name] -= 1
        sim.count(provider.name, "ok")
        now = time.time()
        headers = ratelimit_headers.success_headers(provider, quota.report(accounts, now), now)
        self._send(200, FORMATS[provider.api].success(req, text, cut, out_tokens), headers)


class SimServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, settings: SimSettings) -> None:
        self.sim = Simulation(settings)
        super().__init__((settings.host, settings.port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def start_in_thread(settings: SimSettings) -> SimServer:
    """Serve in a background thread (tests, benchmarks); `shutdown()` stops it."""
    server = SimServer(settings)
    threading.Thread(target=server.serve_forever, args=(0.05,), name="simulator", daemon=True).start()
    return server
