"""The live page of `spillway serve` (producer/ops/dashboard.py), for real: a stack of its own
(Redis DB 14, simulator, a worker), a real `spillway serve`, and Debian's Chromium in headless
mode driven by Playwright. The page must draw every chart from data that arrives while it is
open, ask for the token when it has none, and never show a prompt, a key or the token.

Playwright starts Chromium with a fresh temporary profile of its own (its `--user-data-dir`)
and `--no-sandbox` (the tests may run as root); it never downloads a browser here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer.ops.dashboard import DashboardFeed, ledger_counters, scarcest_budgets
from producer.ops.metrics import LedgerTotals
from producer.ops.stack import LocalStack, stop_process
from tests.conftest import CONFIGS, missing
from workers.embedded import EmbeddedRedis, free_port
from workers.store import FAILED, SUCCEEDED, AttemptRecord, Store, utcnow

TOKEN = "dash-" + uuid.uuid4().hex
SECRET = "never-on-the-page-" + uuid.uuid4().hex[:8]  # in every prompt the test sends
CHARTS = ("jobs-provider", "jobs-task", "tokens", "errors", "queues", "budget", "latency", "cost")
BROWSER_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_S = 30.0


# -- the store's counters and the sample's pieces, without a browser ------------------------------


def new_job(store: Store, task: str, provider: str) -> str:
    job_id = uuid.uuid4().hex
    store.add_jobs(
        [
            {
                "id": job_id,
                "task_type": task,
                "tier": "free",
                "request": {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 8},
                "est_input_tokens": 4,
                "provider": provider,
                "model": "m",
            }
        ]
    )
    return job_id


def call(provider: str, outcome: str, latency_ms: float, task: str = "chat", **extra: Any) -> AttemptRecord:
    return AttemptRecord(
        provider=provider,
        model="m",
        outcome=outcome,
        started_at=utcnow(),
        task_type=task,
        latency_ms=latency_ms,
        **extra,
    )


def test_the_counters_and_latency_the_charts_draw_come_from_the_ledger(store: Store) -> None:
    rerouted = new_job(store, "chat", "groq")  # a 429 on groq, then a success on gemini
    store.claim(rerouted, lease_s=30, max_crashes=3)
    store.requeue(
        rerouted, 1, call("groq", "rate_limited", 30.0, moved_to="gemini"), provider="gemini", model="m"
    )
    store.claim(rerouted, lease_s=30, max_crashes=3)
    done = call("gemini", SUCCEEDED, 12.0, input_tokens=10, output_tokens=20, cost_usd=0.001)
    store.finish(rerouted, 2, done, status=SUCCEEDED, provider="gemini", model="m")
    failed = new_job(store, "summarize", "openai")
    store.claim(failed, lease_s=30, max_crashes=3)
    store.finish(
        failed, 1, call("openai", "server_error", 50.0, "summarize"), status=FAILED, provider="openai"
    )
    in_flight = new_job(store, "chat", "groq")  # its call is out: counted once its outcome is known
    store.claim(in_flight, lease_s=30, max_crashes=3)
    new_job(store, "chat", "groq")  # still queued

    counters = ledger_counters(LedgerTotals(store).read())
    assert counters["jobs_done_by_provider"] == {"gemini": 1, "groq": 0, "openai": 0}
    assert counters["jobs_done_by_task"] == {"chat": 1}
    assert counters["ledger"] == {
        "gemini": {
            "calls": 1,
            "rate_limited": 0,
            "reroutes": 0,
            "input_tokens": 10,
            "output_tokens": 20,
            "cost_usd": 0.001,
        },
        "groq": {
            "calls": 1,
            "rate_limited": 1,
            "reroutes": 1,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
        },
        "openai": {
            "calls": 1,
            "rate_limited": 0,
            "reroutes": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
        },
    }
    # the call in flight has no latency yet, even with one written
    assert store.recent_latency(utcnow() - timedelta(minutes=1)) == {
        "gemini": {"calls": 1, "p50_ms": 12.0, "p95_ms": 12.0},
        "groq": {"calls": 1, "p50_ms": 30.0, "p95_ms": 30.0},
        "openai": {"calls": 1, "p50_ms": 50.0, "p95_ms": 50.0},
    }
    assert store.recent_latency(utcnow() + timedelta(minutes=1)) == {}  # none started since


def test_budget_left_is_each_accounts_scarcest_limit() -> None:
    def account(model: str, account: str, remaining: dict[str, tuple[int, int]]) -> dict[str, Any]:
        return {
            "model": model,
            "account": account,
            "state": "blocked",
            "until": "2026-01-01T00:00:00Z",
            "remaining": {k: {"remaining": r, "limit": lim} for k, (r, lim) in remaining.items()},
        }

    status = {
        "providers": [
            {
                "provider": "groq",
                "accounts": [
                    # rpd has the smaller share left; concurrency (calls in flight) is no budget
                    account("m", "k0-a", {"rpm": (90, 100), "rpd": (500, 1000), "concurrency": (0, 4)}),
                    account("m2", "k0-a", {"rpm": (100, 100)}),
                ],
            },
            {"provider": "ollama", "accounts": [account("llama", "nokey", {})]},  # no limits: left out
        ]
    }
    budgets = scarcest_budgets(status)
    assert [(b["name"], b["limit"], b["percent_left"]) for b in budgets] == [
        ("groq m k0-a", "rpd", 50.0),  # two models on one provider: the model is in the name
        ("groq m2 k0-a", "rpm", 100.0),
    ]
    assert budgets[0]["state"] == "blocked" and budgets[0]["until"] == "2026-01-01T00:00:00Z"


def test_the_feed_reads_once_for_every_tab_within_its_age() -> None:
    reads: list[int] = []

    def read() -> dict[str, Any]:
        reads.append(1)
        return {"n": len(reads)}

    shared = DashboardFeed(read, max_age_s=3600)
    assert shared.sample() is shared.sample() and len(reads) == 1
    fresh = DashboardFeed(read, max_age_s=0)
    assert fresh.sample() != fresh.sample() and len(reads) == 3


# -- a real stack, a real `spillway serve` ------------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[LocalStack]:
    redis.Redis.from_url(redis_server.url(14)).flushdb()
    with LocalStack(CONFIGS / "e2e.toml", redis_url=redis_server.url(14)) as stack:
        # no worker takes anthropic's queue: admin jobs wait there, so the queue chart has a
        # queue that is not empty
        stack.start_worker(providers=["groq", "gemini", "openai"], concurrency=8)
        stack.wait_for_workers()
        yield stack


def start_serve(stack: LocalStack, *, token: str | None, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, **stack.env}
    env.pop("SPILLWAY_API_TOKEN", None)
    if token is not None:
        env["SPILLWAY_API_TOKEN"] = token
    port = free_port()
    argv = [sys.executable, "-m", "producer.cli", "serve", "--port", str(port)]
    argv += [] if token is not None else ["--insecure-no-auth"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"spillway serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(f"{url}/dashboard", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"spillway serve did not answer on {url}")


@pytest.fixture(scope="module")
def serve_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="module")
def serve(stack: LocalStack, serve_log: Path) -> Iterator[str]:
    proc, url = start_serve(stack, token=TOKEN, log=serve_log)
    yield url
    stop_process(proc)


def test_the_page_and_its_files_need_no_token_and_the_data_does(serve: str) -> None:
    root = httpx.get(f"{serve}/", timeout=10)
    assert root.status_code == 302 and root.headers["location"] == "/dashboard"
    page = httpx.get(f"{serve}/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # every file the page loads is served from the package (no CDN at run time)
    for path in ("/static/dashboard.js", "/static/dashboard.css", "/static/uplot/uPlot.iife.min.js"):
        assert path in page.text
        assert httpx.get(f"{serve}{path}", timeout=10).status_code == 200
    assert "MIT" in httpx.get(f"{serve}/static/uplot/LICENSE", timeout=10).text
    same_page = httpx.get(f"{serve}/static/dashboard.html", timeout=10)  # same page, same headers
    assert same_page.headers["content-security-policy"] == page.headers["content-security-policy"]
    for outside in ("..%2fdashboard.py", "%2e%2e/dashboard.py"):  # producer/ops/dashboard.py exists
        escaped = httpx.get(f"{serve}/static/{outside}", timeout=10)
        assert escaped.status_code in (403, 404) and "STATIC_DIR" not in escaped.text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.get(f"{serve}/v1/dashboard", headers=headers, timeout=10)
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == "missing or wrong bearer token"
    sample = httpx.get(f"{serve}/v1/dashboard", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert sample.status_code == 200
    assert set(sample.json()) == {
        "now_s",
        "jobs_done_by_provider",
        "jobs_done_by_task",
        "ledger",
        "latency",
        "queues",
        "budgets",
    }


# -- the page in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        missing("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


class Watched:
    """A page, with every request it made and every error it printed."""

    def __init__(self, browser: Any) -> None:
        self.page = browser.new_page(viewport={"width": 1300, "height": 1000})
        self.page.set_default_timeout(WAIT_S * 1000)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def state(self) -> dict[str, Any]:
        return self.page.evaluate("window.spillwayDashboard")

    def wait_until(self, predicate: str, arg: Any = None, timeout_s: float = WAIT_S) -> None:
        """Until the JS function `predicate` returns true. (Playwright's `wait_for_function`
        builds its predicate with eval, which the page's Content-Security-Policy forbids.)"""
        deadline = time.monotonic() + timeout_s
        while not self.page.evaluate(predicate, arg):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not within {timeout_s:g}s: {predicate.strip()[:200]}; page state {self.state()}"
                )
            self.page.wait_for_timeout(200)

    def close(self) -> None:
        self.page.close()


OK_POLLS = "(n) => Boolean(window.spillwayDashboard) && window.spillwayDashboard.ok >= n"

#: Per chart, the number of points of a saturated colour on its canvas: the series' strokes
#: (axes, grid and text are grey, so an empty chart counts none).
COLOURED_PIXELS = """
(ids) => Object.fromEntries(ids.map((id) => {
  const canvas = document.querySelector(`#chart-${id} canvas`);
  if (!canvas) return [id, -1];
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    const hi = Math.max(pixels[i], pixels[i + 1], pixels[i + 2]);
    const lo = Math.min(pixels[i], pixels[i + 1], pixels[i + 2]);
    if (pixels[i + 3] > 0 && hi - lo > 50) coloured += 1;
  }
  return [id, coloured];
}))
"""

#: True once every chart has a series with a value above zero (the queue chart: anthropic's).
EVERY_CHART_LIVE = """
(ids) => {
  const charts = window.spillwayDashboard && window.spillwayDashboard.charts;
  if (!charts) return false;
  const positive = (id, key) => {
    const chart = charts[id];
    if (!chart) return false;
    return chart.keys.some((k, i) => (key === undefined || k === key) && chart.data[i + 1].some((y) => y > 0));
  };
  return ids.every((id) => positive(id)) && positive("queues", "llm.anthropic");
}
"""


def series(state: dict[str, Any], chart: str) -> dict[str, list[float | None]]:
    drawn = state["charts"][chart]
    return dict(zip(drawn["keys"], drawn["data"][1:], strict=True))


def peak(values: list[float | None]) -> float:
    return max((v for v in values if v is not None), default=0.0)


def test_the_live_page_draws_every_chart_from_data_that_arrives_while_it_is_open(
    stack: LocalStack, serve: str, serve_log: Path, browser: Any
) -> None:
    watched = Watched(browser)
    page = watched.page
    try:
        page.goto(f"{serve}/dashboard#token={TOKEN}")
        watched.wait_until(OK_POLLS, 2)
        assert TOKEN not in page.url  # taken out of the address bar at once

        client = stack.client()
        stack.set_faults("groq", {"rate_limit": 0.5})  # chat/free: 429s on groq, re-routes to gemini
        try:
            batches = [
                client.submit_batch(
                    [{"custom_id": f"{task}-{tier}-{i}", "prompt": f"{SECRET} {i}"} for i in range(n)],
                    task=task,
                    tier=tier,
                )
                for task, tier, n in (("chat", "free", 40), ("chat", "pro", 20), ("gemini", "free", 20))
            ]
            for i in range(4):  # anthropic has no worker here: these wait in llm.anthropic
                client.submit(f"{SECRET} waiting {i}", task="chat", tier="admin")
            for batch in batches:
                assert batch.wait(90).finished
        finally:
            stack.set_faults("groq", {})
        watched.wait_until(EVERY_CHART_LIVE, list(CHARTS))
        state = watched.state()
        coloured = page.evaluate(COLOURED_PIXELS, list(CHARTS))
        sample = httpx.get(
            f"{serve}/v1/dashboard", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        ).text
        html, text = page.content(), page.inner_text("body")
        page.screenshot(path="/tmp/dashboard.png", full_page=True)
    finally:
        watched.close()

    assert state["ok"] >= 3 and state["error"] is None
    jobs = series(state, "jobs-provider")
    assert {"groq", "gemini", "openai"} <= set(jobs) and all(peak(jobs[p]) > 0 for p in ("gemini", "openai"))
    tasks = series(state, "jobs-task")
    assert peak(tasks["chat"]) > 0 and peak(tasks["gemini"]) > 0
    tokens = series(state, "tokens")
    assert peak(tokens["openai input"]) > 0 and peak(tokens["openai output"]) > 0
    errors = series(state, "errors")
    assert peak(errors["groq 429s"]) > 0 and peak(errors["groq re-routes"]) > 0
    assert peak(errors["openai 429s"]) == 0  # no fault there
    queues = series(state, "queues")
    assert {"llm.groq", "llm.gemini", "llm.openai", "llm.anthropic"} <= set(queues)
    assert queues["llm.anthropic"][-1] == 4
    budget = series(state, "budget")
    assert len(budget) == 4 and all(0 <= v <= 100 for ys in budget.values() for v in ys if v is not None)
    latency = series(state, "latency")
    assert peak(latency["openai p50"]) > 0 and peak(latency["openai p95"]) >= peak(latency["openai p50"]) > 0
    assert peak(series(state, "cost")["openai"]) > 0
    # every chart's canvas shows its series (not only axes and grid)
    assert all(coloured[chart] > 50 for chart in CHARTS), coloured

    # no prompt, no key value and no token on the page or in its data; nothing from elsewhere
    keys = [v for k, v in stack.env.items() if k.endswith("_API_KEY")]
    for body in (html, text, sample):
        assert SECRET not in body and TOKEN not in body
        assert not [k for k in keys if k in body]
    assert all(url.startswith(serve + "/") or url.startswith("data:") for url in watched.requests)
    assert not [url for url in watched.requests if TOKEN in url]
    assert TOKEN not in serve_log.read_text()
    assert watched.errors == []  # no script error, no Content-Security-Policy violation


def test_without_a_token_the_page_says_so_and_takes_one(serve: str, browser: Any) -> None:
    watched = Watched(browser)
    page = watched.page
    try:
        page.goto(f"{serve}/dashboard")
        watched.wait_until("() => window.spillwayDashboard && window.spillwayDashboard.error !== null")
        asked = watched.state()
        assert page.is_visible("#auth") and "needs its API token" in page.inner_text("#auth-message")
        assert "not signed in" in page.inner_text("#status")

        page.fill("#token", "not-the-token")
        page.click("#auth button")
        watched.wait_until("() => document.querySelector('#auth-message').textContent.includes('refused')")
        assert page.is_visible("#auth")

        page.fill("#token", TOKEN)
        page.click("#auth button")
        watched.wait_until(OK_POLLS, 1)
        assert page.is_hidden("#auth") and watched.state()["error"] is None
    finally:
        watched.close()
    assert asked["error"]["status"] == 401 and asked["ok"] == 0 and asked["samples"] == []
    assert not [url for url in watched.requests if TOKEN in url]


def test_with_insecure_no_auth_the_page_needs_no_token(
    stack: LocalStack, browser: Any, tmp_path: Path
) -> None:
    proc, url = start_serve(stack, token=None, log=tmp_path / "serve.log")
    watched = Watched(browser)
    try:
        watched.page.goto(f"{url}/dashboard")
        watched.wait_until(OK_POLLS, 2)
        state = watched.state()
        assert watched.page.is_hidden("#auth")
    finally:
        watched.close()
        stop_process(proc)
    assert state["error"] is None and state["charts"]["budget"]["keys"]
    assert set(state["latest"]["queues"]) >= {"llm.groq", "llm.anthropic"}
