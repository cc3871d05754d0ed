"""The live page of `spillway serve`, for people who run no Grafana: the same few charts.

    GET /                redirects to /dashboard
    GET /dashboard       the page: static HTML that holds no data, so it needs no token
    GET /static/…        its script and style, and uPlot (MIT), shipped in the package: no CDN
    GET /v1/dashboard    one sample of what the charts draw (bearer token, like every /v1 route;
                         its handler is in serve.py, next to the other JSON routes)

The charts are the Grafana dashboard's (monitoring/grafana/dashboards/spillway.json), from the
same numbers. A sample holds counters that only grow — jobs done (succeeded calls) per provider
and per task type; calls, tokens, dollars, 429s and re-routes per provider — from the ledger's
running totals that /metrics uses too (`producer.ops.metrics.LedgerTotals`: a read costs the
last few seconds of attempts, not the whole ledger); beside them, gauges read now: queue
lengths, each account's scarcest budget, and call latency p50/p95 over the last minute. The
page polls every 2 s and takes rates from successive samples, as Prometheus's `rate()` does:
serve keeps no history, so any number of tabs and a restart of serve cost nothing and never
disagree; the price is that a page draws its first rates one poll after it opens. However many
tabs poll, the store and Redis are read at most once a second (`DashboardFeed`).

The token never travels in a URL: the page takes it from its own fragment
(`/dashboard#token=…`, which browsers never send) or from a field, keeps it in sessionStorage,
and sends it as a bearer header. A sample holds names, ids and numbers only: no prompt, no
answer, no key value, no provider error text.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tornado.web import RedirectHandler, RequestHandler, StaticFileHandler

from producer.client import Client
from producer.ops.metrics import ledger_totals
from producer.status import status_report
from workers.errors import RateLimited
from workers.store import SUCCEEDED

STATIC_DIR = Path(__file__).with_name("static")
PAGE = STATIC_DIR / "dashboard.html"
#: Latency percentiles cover the calls started this long ago at most.
LATENCY_WINDOW_S = 60.0
#: The page polls every 2 s; a sample younger than this is handed to every tab that asks.
SAMPLE_MAX_AGE_S = 1.0
#: Per provider in a sample's "ledger" (and "cost_usd"): counters since the store began.
LEDGER_FIELDS = ("calls", "rate_limited", "reroutes", "input_tokens", "output_tokens")
#: Calls in flight is a limit, but not a budget that runs out: it is left out of "budget left".
NOT_A_BUDGET = ("concurrency",)
#: The page loads only its own files; nothing it shows can run as script.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def dashboard_sample(client: Client, *, latency_window_s: float = LATENCY_WINDOW_S) -> dict[str, Any]:
    """Everything the live page's charts need, read now (the JSON of GET /v1/dashboard)."""
    rt = client.runtime
    status = status_report(rt, client.app)
    counters = ledger_counters(ledger_totals(rt.store).read())
    now_s = time.time()  # when the counters were read: the page's rates divide by its steps
    since = datetime.now(UTC) - timedelta(seconds=latency_window_s)
    return {
        "now_s": round(now_s, 3),
        **counters,
        "latency": {"window_s": latency_window_s, "by_provider": rt.store.recent_latency(since)},
        "queues": {
            p["queue"]: p["queue_length"] for p in status["providers"] if p["queue_length"] is not None
        },
        "budgets": scarcest_budgets(status),
    }


def ledger_counters(totals: Mapping[tuple[Any, ...], Sequence[int]]) -> dict[str, Any]:
    """The page's counters from the ledger's running totals (`LedgerTotals.read()`: per provider,
    model, task type, outcome, call made and re-route; attempts, input and output tokens,
    nano-dollars first): jobs done per provider and per task type, and per provider its calls,
    429s, re-routes, tokens and dollars."""
    done_by_provider: Counter[str] = Counter()
    done_by_task: Counter[str] = Counter()
    ledger: dict[str, Counter[str]] = {}
    for (provider, _model, task_type, outcome, called, moved_away), sums in totals.items():
        attempts, input_tokens, output_tokens, cost_nusd = sums[:4]
        row = ledger.setdefault(provider, Counter())
        if called:
            row["calls"] += attempts
            row["rate_limited"] += attempts if outcome == RateLimited.kind else 0
            if outcome == SUCCEEDED:  # a job succeeds once, with one call (cache hits make none)
                done_by_provider[provider] += attempts
                done_by_task[task_type] += attempts
        row["reroutes"] += attempts if moved_away else 0
        row["input_tokens"] += input_tokens
        row["output_tokens"] += output_tokens
        row["cost_nusd"] += cost_nusd
    return {
        "jobs_done_by_provider": {p: done_by_provider[p] for p in sorted(ledger)},
        "jobs_done_by_task": dict(sorted(done_by_task.items())),
        "ledger": {
            provider: {
                **{field: row[field] for field in LEDGER_FIELDS},
                "cost_usd": round(row["cost_nusd"] / 1e9, 9),
            }
            for provider, row in sorted(ledger.items())
        },
    }


def scarcest_budgets(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Per account of a `status_report`: the limit with the smallest share left, and that share."""
    budgets = []
    for p in status["providers"]:
        several_models = len({a["model"] for a in p["accounts"]}) > 1
        for a in p["accounts"]:
            limits = {
                name: v for name, v in a["remaining"].items() if v["limit"] > 0 and name not in NOT_A_BUDGET
            }
            if not limits:  # an account without limits (a local Ollama) never runs out
                continue
            name, scarcest = min(limits.items(), key=lambda kv: kv[1]["remaining"] / kv[1]["limit"])
            model = [a["model"]] if several_models else []
            budgets.append(
                {
                    "name": " ".join([p["provider"], *model, a["account"]]),
                    "provider": p["provider"],
                    "model": a["model"],
                    "account": a["account"],
                    "state": a["state"],
                    "until": a["until"],
                    "limit": name,
                    "remaining": scarcest["remaining"],
                    "of": scarcest["limit"],
                    "percent_left": round(100 * scarcest["remaining"] / scarcest["limit"], 1),
                }
            )
    return budgets


class DashboardFeed:
    """The latest sample, read again only once it is `max_age_s` old, however many tabs ask."""

    def __init__(self, read: Callable[[], dict[str, Any]], max_age_s: float = SAMPLE_MAX_AGE_S) -> None:
        self._read, self._max_age_s = read, max_age_s
        self._lock = threading.Lock()
        self._sample: dict[str, Any] | None = None
        self._taken_at = 0.0

    def sample(self) -> dict[str, Any]:
        with self._lock:  # a second tab waits for the read in progress instead of doubling it
            if self._sample is None or time.monotonic() - self._taken_at >= self._max_age_s:
                self._sample = self._read()
                self._taken_at = time.monotonic()
            return self._sample


class DashboardPage(RequestHandler):
    """The page itself: no data in it, so no token asked (its script asks /v1/dashboard)."""

    def get(self) -> None:
        for name, value in PAGE_HEADERS.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE.read_bytes())


class DashboardAssets(StaticFileHandler):
    """The page's script and style, and uPlot, from the package (the page too, at
    /static/dashboard.html: with the same headers, whichever way it is loaded)."""

    def set_extra_headers(self, path: str) -> None:
        for name, value in PAGE_HEADERS.items():
            if name != "Cache-Control":  # the handler's own (ETag, Last-Modified) decides
                self.set_header(name, value)


def dashboard_routes() -> list[tuple[str, type[RequestHandler], dict[str, Any]]]:
    """The page's routes for `make_app` (the data route, /v1/dashboard, is serve's own)."""
    return [
        (r"/", RedirectHandler, {"url": "/dashboard", "permanent": False}),
        (r"/dashboard", DashboardPage, {}),
        (r"/static/(.+)", DashboardAssets, {"path": str(STATIC_DIR)}),
    ]
