"""Throughput you can see: the counters `spillway serve` sums from the ledger, and the shipped
Prometheus config and Grafana dashboard against a real stack.

- `LedgerTotals`, driven through the store's own writes (calls that start, succeed, get a 429
  and move on, are dropped, or fall in doubt when their worker dies), on SQLite and PostgreSQL:
  after every step the exported counters equal what was written, never go down, and agree with
  `spillway usage`.
- The whole path: Debian's Prometheus, run with monitoring/prometheus.yml (only the targets'
  hosts and ports, the token file and the scrape interval changed), scrapes a real Flower (with
  basic auth on) and a real `spillway serve` (bearer token) over a real worker and the simulator;
  after a small batch with 429s and re-routes, every expression of the Grafana dashboard,
  evaluated by Prometheus' query API, returns data. Neither /metrics body, nor anything
  Prometheus stored, holds a prompt, a key or the token.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, update

from producer.jobs import job_row
from producer.ops.metrics import LATENCY_BOUNDS_S, LedgerCollector, LedgerTotals
from producer.ops.stack import stop_process
from tests.conftest import missing
from workers.config import Candidate
from workers.embedded import free_port
from workers.messages import build_request
from workers.store import IN_DOUBT, STARTED, Attempt, AttemptRecord, utcnow

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "monitoring" / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "spillway.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
TOKEN = "monitoring-token-3c9d41"
FLOWER_AUTH = ("ops", "flower-monitoring-pass")
CANARY = "monitoring canary prompt 5b7e"
COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


# -- the ledger's counters, step by step ----------------------------------------------------------


@dataclass
class Expected:
    """What the test wrote, summed in Python: the counters' expected values."""

    calls: dict[tuple[str, str, str], int] = field(default_factory=dict)  # provider, task, outcome
    reroutes: dict[tuple[str, str], int] = field(default_factory=dict)
    tokens: dict[tuple[str, str, str], int] = field(default_factory=dict)  # provider, task, direction
    cost: dict[tuple[str, str], float] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds, per provider

    def record(self, a: AttemptRecord) -> None:
        job = (a.provider, a.task_type)
        if a.called:
            self.calls[(*job, a.outcome)] = self.calls.get((*job, a.outcome), 0) + 1
        if a.moved_to is not None and a.moved_to != a.provider:
            self.reroutes[job] = self.reroutes.get(job, 0) + 1
        for direction, n in (("input", a.input_tokens), ("output", a.output_tokens)):
            self.tokens[(*job, direction)] = self.tokens.get((*job, direction), 0) + n
        self.cost[job] = self.cost.get(job, 0.0) + a.cost_usd
        if a.latency_ms is not None:
            self.latencies.setdefault(a.provider, []).append(a.latency_ms / 1000)


class LedgerDriver:
    """Jobs on two providers and two task types, moved through the store's real writes."""

    def __init__(self, store: Any, rng: random.Random) -> None:
        self.store, self.rng = store, rng
        self.expected = Expected()
        self.in_flight: dict[str, AttemptRecord] = {}  # job id -> its run's call at the estimate
        self.runs: dict[str, int] = {}  # job id -> the number of its run in flight

    def attempt(self, job_id: str, outcome: str, **values: Any) -> AttemptRecord:
        entry = self.in_flight[job_id]
        base = {"provider": entry.provider, "model": entry.model, "task_type": entry.task_type}
        return AttemptRecord(outcome=outcome, started_at=utcnow(), tier="free", **{**base, **values})

    def start(self, job_id: str | None = None) -> None:
        """A new job's run, or another run of one whose worker died (its call falls in doubt,
        charged at the estimate of the claim that takes over: the same provider's)."""
        before = self.in_flight.get(job_id) if job_id is not None else None
        provider = before.provider if before is not None else self.rng.choice(["a", "b"])
        if job_id is None:
            job_id = uuid.uuid4().hex
            task = self.rng.choice(["chat", "code"])
            row = job_row(
                job_id, task, "free", build_request("hi", max_tokens=16), target=Candidate(provider, "m")
            )
            self.store.add_jobs([row])
        entry = AttemptRecord(
            provider=provider,
            model="m",
            outcome="in_doubt",
            started_at=utcnow(),
            task_type="",  # set from the job below
            tier="free",
            input_tokens=self.rng.randint(1, 50),
            output_tokens=16,
            cost_usd=self.rng.choice([0.0, 1e-6, 3.3e-5, 0.1]),
        )
        claim = self.store.claim(
            job_id,
            lease_s=-1,  # any later claim finds the lease run out, as after a worker's death
            max_crashes=1000,
            estimate=lambda job: self._started(job, entry),
        )
        assert claim.state == "run"
        if before is not None:  # the earlier call is in doubt now
            self.expected.record(self._started(claim.job, entry))
        self.in_flight[job_id] = self._started(claim.job, entry)
        self.runs[job_id] = claim.job.runs

    @staticmethod
    def _started(job: Any, entry: AttemptRecord) -> AttemptRecord:
        return AttemptRecord(**{**entry.__dict__, "task_type": job.task_type})

    def end(self, job_id: str, how: str) -> None:
        run = self.runs[job_id]
        latency = round(
            self.rng.choice([3.0, 20.0, 240.0, 1700.0, 45_000.0, 500_000.0]) * self.rng.random(), 3
        )
        if how == "succeeded":
            record = self.attempt(
                job_id,
                "succeeded",
                input_tokens=self.rng.randint(1, 900),
                output_tokens=self.rng.randint(1, 400),
                cost_usd=self.rng.random() * 1e-3,
                latency_ms=latency,
            )
            self.store.finish(job_id, run, record, status="succeeded", provider=record.provider, model="m")
        elif how == "rate_limited":
            other = "b" if self.in_flight[job_id].provider == "a" else "a"
            record = self.attempt(job_id, "rate_limited", latency_ms=latency, moved_to=other)
            self.store.requeue(job_id, run, record, provider=other, model="m")
        elif how == "rerouted":  # no room: moved on before any call
            other = "b" if self.in_flight[job_id].provider == "a" else "a"
            record = self.attempt(job_id, "rerouted", called=False, moved_to=other)
            self.store.requeue(job_id, run, record, provider=other, model="m")
        else:  # "dropped": the run made no call and leaves no entry (it waits for its budget)
            record = None
            self.store.requeue(job_id, run, None, provider=self.in_flight[job_id].provider, model="m")
        if record is not None:
            self.expected.record(record)
        del self.in_flight[job_id]

    def step(self) -> None:
        roll = self.rng.random()
        if not self.in_flight or roll < 0.3:
            self.start()
        elif roll < 0.38:
            self.start(self.rng.choice(sorted(self.in_flight)))  # its worker died: run it again
        else:
            how = self.rng.choices(["succeeded", "rate_limited", "rerouted", "dropped"], [6, 2, 1, 1])[0]
            self.end(self.rng.choice(sorted(self.in_flight)), how)


def scrape(totals: LedgerTotals) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The collector's text format, parsed back: sample name -> labels -> value."""
    registry = CollectorRegistry()
    registry.register(LedgerCollector(totals))
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def by(samples: dict[tuple[tuple[str, str], ...], float], *names: str) -> dict[tuple[str, ...], float]:
    """Values summed over the labels not named."""
    out: dict[tuple[str, ...], float] = {}
    for labels, value in samples.items():
        key = tuple(dict(labels)[n] for n in names)
        out[key] = out.get(key, 0.0) + value
    return out


def check_against(expected: Expected, got: dict[str, Any]) -> None:
    calls = {
        k: v
        for k, v in by(got.get("spillway_calls_total", {}), "provider", "task_type", "outcome").items()
        if v
    }
    assert calls == expected.calls
    assert {
        k: v for k, v in by(got.get("spillway_reroutes_total", {}), "provider", "task_type").items() if v
    } == expected.reroutes
    tokens = by(got.get("spillway_tokens_total", {}), "provider", "task_type", "direction")
    assert {k: v for k, v in tokens.items() if v} == {k: v for k, v in expected.tokens.items() if v}
    cost = by(got.get("spillway_cost_usd_total", {}), "provider", "task_type")
    for job in set(cost) | set(expected.cost):
        assert cost.get(job, 0.0) == pytest.approx(expected.cost.get(job, 0.0), abs=1e-6)
    buckets = by(got.get("spillway_call_latency_seconds_bucket", {}), "provider", "le")
    for provider, seen in expected.latencies.items():
        for bound in LATENCY_BOUNDS_S:
            assert buckets[(provider, str(bound))] == sum(1 for s in seen if s <= bound), (provider, bound)
        assert buckets[(provider, "+Inf")] == len(seen)
        total = by(got.get("spillway_call_latency_seconds_sum", {}), "provider")[(provider,)]
        assert total == pytest.approx(sum(seen), abs=1e-3)


def test_ledger_counters_follow_every_write_and_never_go_down(store) -> None:
    rng = random.Random(7)
    now = [0.0]
    driver = LedgerDriver(store, rng)
    totals = LedgerTotals(store, settle_s=10.0, clock=lambda: now[0])
    previous: dict[str, dict[Any, float]] = {}
    folds = 0
    for _ in range(160):
        driver.step()
        now[0] += rng.choice([0.0, 0.5, 3.0, 11.0])  # reads inside, across and far past settle_s
        folded_before = totals.folded_upto
        got = scrape(totals)
        folds += totals.folded_upto > folded_before
        check_against(driver.expected, got)
        for name, series in previous.items():  # counters only grow, and no series goes away
            for labels, value in series.items():
                assert got[name][labels] >= value, (name, labels)
        previous = {name: s for name, s in got.items() if name.endswith(COUNTER_SUFFIXES)}
    assert folds >= 10 and driver.expected.calls and driver.expected.reroutes  # every path was taken
    assert any(outcome == "in_doubt" for _, _, outcome in driver.expected.calls)
    # the same sums as `spillway usage`, which reads the ledger its own way
    usage = store.usage_report(by="provider")["total"]
    got = scrape(totals)
    assert sum(got["spillway_calls_total"].values()) == usage["requests"]
    assert sum(got["spillway_reroutes_total"].values()) == usage["reroutes"]
    assert by(got["spillway_tokens_total"], "direction")[("input",)] == usage["input_tokens"]
    assert sum(got["spillway_cost_usd_total"].values()) == pytest.approx(usage["cost_usd"], abs=1e-5)


class CountingStore:
    """The store, with a note of every ledger read /metrics makes."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.slices: list[dict[str, Any]] = []

    def ledger_top(self, **kwargs: Any) -> int:
        return self.store.ledger_top(**kwargs)

    def ledger_slice(self, **kwargs: Any) -> Any:
        found = self.store.ledger_slice(**kwargs)
        self.slices.append(
            {**kwargs, "summed": sum(g.attempts for g in found.groups), "open": found.in_flight}
        )
        return found


def test_a_scrape_reads_the_ledger_once_then_only_what_is_new(store) -> None:
    """The cost claim: the long past is summed once, by the first read, then each read sums
    only the attempts of the last seconds and looks again at the calls that were in flight
    (the STARTED entries an earlier Spillway wrote at the claim)."""
    driver = LedgerDriver(store, random.Random(3))
    for _ in range(6):
        driver.start()
    old = sorted(driver.in_flight)
    for job_id in old[:5]:
        driver.end(job_id, "succeeded")
    legacy = driver.in_flight.pop(old[5])  # its run's claim was an earlier version's
    with store.engine.begin() as conn:
        started = {**legacy.__dict__, "outcome": STARTED, "task_type": store.job(old[5]).task_type}
        conn.execute(insert(Attempt).values(job_id=old[5], number=1, finished_at=utcnow(), **started))
    with store.engine.begin() as conn:  # these six attempts were written an hour ago, all at once
        hour_ago = utcnow() - timedelta(hours=1)
        conn.execute(update(Attempt).values(started_at=hour_ago, finished_at=hour_ago))
    now = [0.0]
    counting = CountingStore(store)
    totals = LedgerTotals(counting, settle_s=10.0, clock=lambda: now[0])
    first = scrape(totals)
    top = store.ledger_top()
    fold, again, window = counting.slices  # the past, its call in flight, the last seconds
    assert (fold["after"], fold["upto"], fold["summed"], len(fold["open"])) == (0, top, 5, 1)
    assert (sorted(again["ids"]), again["summed"], again["open"]) == (fold["open"], 0, fold["open"])
    assert (window["after"], window.get("upto"), window["summed"]) == (top, None, 0)
    assert sum(first["spillway_calls_total"].values()) == 5
    counting.slices.clear()
    now[0] += 15
    driver.start(old[5])  # its worker died: the entry in flight falls in doubt, looked at again by id
    driver.expected.record(AttemptRecord(**{**started, "outcome": IN_DOUBT}))
    driver.start()
    (fresh,) = set(driver.in_flight) - {old[5]}
    driver.end(fresh, "succeeded")
    second = scrape(totals)
    reads = [(s.get("after"), sorted(s.get("ids", [])), s["summed"], s["open"]) for s in counting.slices]
    assert reads == [(None, fold["open"], 1, []), (top, [], 1, [])]
    assert sum(second["spillway_calls_total"].values()) == 7
    check_against(driver.expected, second)


def test_the_first_read_folds_only_attempts_written_before_its_bound(store) -> None:
    """A call that started long ago is written when it ends — just now, perhaps while one with
    a lower id is not committed yet: the first read's bound goes by when attempts were written."""
    driver = LedgerDriver(store, random.Random(5))
    driver.start()
    driver.start()
    jobs = sorted(driver.in_flight)
    for job_id in jobs:
        driver.end(job_id, "succeeded")
    early, late = sorted(a.id for job_id in jobs for a in store.attempts(job_id))
    hour_ago = utcnow() - timedelta(hours=1)
    with store.engine.begin() as conn:  # two long calls; the later one written just now
        conn.execute(update(Attempt).values(started_at=hour_ago))
        conn.execute(update(Attempt).where(Attempt.id == early).values(finished_at=hour_ago))
    assert store.ledger_top() == late
    assert store.ledger_top(written_before=utcnow() - timedelta(seconds=10)) == early


def test_an_outcome_series_exists_before_its_first_event(store) -> None:
    """rate() counts a series from its first sample: the first 429 of a provider must raise a
    series that was there at 0, or no graph ever shows it."""
    driver = LedgerDriver(store, random.Random(1))
    driver.start()
    (job_id,) = driver.in_flight
    driver.end(job_id, "succeeded")
    got = scrape(LedgerTotals(store))
    provider, task = next(iter(driver.expected.calls))[:2]
    labels = (("model", "m"), ("outcome", "rate_limited"), ("provider", provider), ("task_type", task))
    assert got["spillway_calls_total"][labels] == 0
    assert got["spillway_reroutes_total"][(("model", "m"), ("provider", provider), ("task_type", task))] == 0


# -- the dashboard's expressions ----------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_targets(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:  # rows hold panels of their own
            for target in inner.get("targets", []):
                yield inner["title"], target


def substitute(expr: str, board: dict[str, Any], window: str) -> str:
    """Grafana's variables, as Grafana would fill them in for "All" over `window`."""
    for builtin in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(builtin, window)
    for variable in board["templating"]["list"]:
        assert variable.get("includeAll") and variable.get("allValue"), variable["name"]
        for form in (f"${{{variable['name']}}}", f"${variable['name']}"):
            expr = expr.replace(form, variable["allValue"])
    left = re.findall(r"\$\{?[A-Za-z_]\w*", expr)
    assert not left, f"variables nobody fills in: {left} in {expr}"
    return expr


def test_the_dashboard_is_grafana_json_on_the_provisioned_data_source() -> None:
    board = dashboard()
    datasource = yaml.safe_load(
        (ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    titles = [p["title"] for p in board["panels"]]
    assert board["uid"] and len(set(titles)) == len(titles) == len({p["id"] for p in board["panels"]})
    wanted = ("per provider", "per task type", "Tokens", "429s and re-routes", "Queue length", "Budget left")
    for words in (*wanted, "latency p50 and p95", "Cost per hour", "Flower"):
        assert any(words in t for t in titles), words
    for title, target in panel_targets(board):
        assert target["datasource"]["uid"] == datasource["uid"], title
        assert target["expr"].strip() and target["refId"], title
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"]


# -- the whole path: Prometheus over Flower and serve over a worker and the simulator --------------


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g}s")
        time.sleep(every_s)


def start(argv: list[str], env: dict[str, str], ready_url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[:5]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        return httpx.get(ready_url, timeout=2).status_code < 500

    try:
        wait_for(f"{argv[:5]} to answer", ready, timeout_s=60)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def render_prometheus_config(flower: str, serve: str, token_file: Path, interval: str) -> dict[str, Any]:
    """The shipped file with only what differs here changed: the targets, the token's file and
    (for a quick test) the scrape interval."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"flower", "spillway"}
    assert jobs["flower"]["static_configs"] == [{"targets": ["flower:5555"]}]
    assert jobs["spillway"]["static_configs"] == [{"targets": ["serve:8080"]}]
    jobs["flower"]["static_configs"] = [{"targets": [flower]}]
    jobs["spillway"]["static_configs"] = [{"targets": [serve]}]
    jobs["spillway"]["authorization"]["credentials_file"] = str(token_file)
    return config


@dataclass
class Observed:
    prometheus: httpx.Client
    started_at: float
    serve_metrics: str
    flower_metrics: str
    secrets: list[str]
    results: list[Any]

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.prometheus.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", (expr, answer)
        assert answer["data"]["resultType"] == "vector", expr
        return answer["data"]["result"]

    def number(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def scraped_since(self, moment: float) -> bool:
        """Both targets were scraped after `moment` (time.time())."""
        stamps = [float(r["value"][1]) for r in self.query("timestamp(up)")]
        return len(stamps) == 2 and min(stamps) > moment


@pytest.fixture(scope="module")
def observed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    if PROMETHEUS is None:
        missing("Debian's prometheus is not installed (apt-get install --no-install-recommends prometheus)")
    e2e_stack = request.getfixturevalue("e2e_stack")  # started only when Prometheus is there
    tmp = tmp_path_factory.mktemp("monitoring")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        flower_port, serve_port, prom_port = free_port(), free_port(), free_port()
        base_env = {**os.environ, **e2e_stack.env}
        procs.append(
            start(
                [sys.executable, "-m", "producer.cli", "flower", "--port", str(flower_port)],
                {**base_env, "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)},
                f"http://127.0.0.1:{flower_port}/healthcheck",
                tmp / "flower.log",
            )
        )
        procs.append(
            start(
                [sys.executable, "-m", "producer.cli", "serve", "--port", str(serve_port)],
                {**base_env, "SPILLWAY_API_TOKEN": TOKEN},
                f"http://127.0.0.1:{serve_port}/metrics",
                tmp / "serve.log",
            )
        )
        token_file = tmp / "api-token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        config = render_prometheus_config(
            f"127.0.0.1:{flower_port}", f"127.0.0.1:{serve_port}", token_file, interval="1s"
        )
        config_file = tmp / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        if PROMTOOL:
            checked = subprocess.run(
                [PROMTOOL, "check", "config", str(config_file)], capture_output=True, text=True
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr
        procs.append(
            start(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                base_env,
                f"http://127.0.0.1:{prom_port}/-/ready",
                tmp / "prometheus.log",
            )
        )
        prometheus = httpx.Client(base_url=f"http://127.0.0.1:{prom_port}", timeout=10)
        seen = Observed(prometheus, time.monotonic(), "", "", [], [])
        yield run_the_batch(e2e_stack, seen, flower_port, serve_port)
        prometheus.close()
    finally:
        e2e_stack.set_faults("groq", {})
        for proc in reversed(procs):
            stop_process(proc)


def run_the_batch(e2e_stack: Any, seen: Observed, flower_port: int, serve_port: int) -> Observed:
    client = e2e_stack.client()
    flower = f"http://127.0.0.1:{flower_port}"

    # Flower counts only the events it receives while connected: warm up until it has one
    def flower_sees_a_job() -> bool:
        warm = client.submit(f"{CANARY} warm-up", task="chat", tier="free")
        warm.wait(60)
        return wait_for_quietly(
            lambda: warm.id in httpx.get(f"{flower}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
        )

    wait_for("Flower to see a job", flower_sees_a_job, timeout_s=90, every_s=0)
    for job in ("flower", "spillway"):  # scraped, the token accepted
        wait_for(f"{job} up in Prometheus", lambda job=job: seen.number(f'up{{job="{job}"}}') == 1, 30)
    wait_for("the ledger's counters in Prometheus", lambda: seen.query("spillway_calls_total"), 30)
    before = {
        "succeeded": seen.number('sum(spillway_calls_total{outcome="succeeded"})'),
        "429": seen.number('sum(spillway_calls_total{outcome="rate_limited"})'),
        "flower": seen.number('sum(flower_events_total{type="task-succeeded"})'),
    }
    results = []
    for wave in range(4):  # a few waves, so that rates rise over several scrapes
        if wave == 1:  # chat/free goes to groq first: a 429 there, and the job moves on to gemini
            e2e_stack.set_faults("groq", {"rate_limit": 1.0})
        if wave == 2:
            e2e_stack.set_faults("groq", {})
        handles = [
            client.submit(f"{CANARY} {wave}-{i}", task=task, tier=tier)
            for i, (task, tier) in enumerate(
                [("chat", "free")] * 4 + [("chat", "pro"), ("gemini", "free")] * 2
            )
        ]
        results += [h.wait(60) for h in handles]
        # the next wave after a scrape (Flower's events given half a second to land): each wave
        # is its own step on the graphs, so a series born in one wave has a rate in the next
        finished = time.time() + 0.5
        wait_for(f"a scrape after wave {wave}", lambda finished=finished: seen.scraped_since(finished), 30)
    done = sum(r.status == "succeeded" for r in results)
    assert done == len(results), [(r.status, r.error) for r in results if r.status != "succeeded"]
    assert any(r.provider == "gemini" and r.attempts > 1 for r in results)  # a 429 moved one on
    wait_for(
        "the batch in Prometheus",
        lambda: (
            seen.number('sum(spillway_calls_total{outcome="succeeded"})') >= before["succeeded"] + done
            and seen.number('sum(spillway_calls_total{outcome="rate_limited"})') > before["429"]
            and seen.number('sum(flower_events_total{type="task-succeeded"})') >= before["flower"] + done
        ),
        timeout_s=60,
    )
    seen.serve_metrics = httpx.get(
        f"http://127.0.0.1:{serve_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).text
    seen.flower_metrics = httpx.get(f"{flower}/metrics", timeout=10).text
    seen.secrets = [TOKEN, *(v for k, v in e2e_stack.env.items() if re.search(r"_API_KEY(_\d+)?$", k))]
    seen.results = results
    return seen


def wait_for_quietly(check: Callable[[], Any], timeout_s: float = 3.0) -> bool:
    try:
        return bool(wait_for("", check, timeout_s))
    except TimeoutError:
        return False


@pytest.mark.integration
def test_prometheus_scrapes_flower_and_serve_with_the_shipped_config(observed: Observed) -> None:
    targets = observed.prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
    health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
    assert health == {"flower": ("up", ""), "spillway": ("up", "")}
    # serve answered Prometheus with the token from the file: a scrape without it is refused
    serve_url = next(t["scrapeUrl"] for t in targets if t["labels"]["job"] == "spillway")
    assert httpx.get(serve_url, timeout=10).status_code == 401


@pytest.mark.integration
def test_every_dashboard_expression_returns_data(observed: Observed) -> None:
    board = dashboard()
    window = f"{int(time.monotonic() - observed.started_at) + 10}s"  # since Prometheus started
    answers: dict[str, list[dict[str, Any]]] = {}
    for title, target in panel_targets(board):
        expr = substitute(target["expr"], board, window)
        result = observed.query(expr)
        assert result, f"{title!r}: {expr} returned nothing"
        answers[f"{title} {target['refId']}"] = result

    def values(key: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in answers[key]}

    # every graph moved during the batch (the queues had emptied by the time we asked)
    for key, result in answers.items():
        if not key.startswith("Queue length"):
            assert any(float(r["value"][1]) > 0 for r in result), f"{key}: all zero {result}"
    assert {"llm.groq", "llm.openai", "llm.gemini", "llm.anthropic"} <= set(
        values("Queue length per provider queue A", "queue")
    )
    per_provider = values("Jobs done per second, per provider A", "provider")
    assert per_provider["gemini"] > 0 and per_provider["openai"] > 0
    assert {"chat", "gemini"} <= set(values("Jobs done per second, per task type A", "task_type"))
    assert values("429s and re-routes per minute, per provider A", "provider")["groq"] > 0
    assert values("429s and re-routes per minute, per provider B", "provider")["groq"] > 0
    p50 = values("Call latency p50 and p95, per provider A", "provider")
    p95 = values("Call latency p50 and p95, per provider B", "provider")
    assert all(not math.isnan(p50[p]) and p95[p] >= p50[p] for p in p50 if p in ("gemini", "openai"))
    flower = {
        (r["metric"]["task"], r["metric"]["type"])
        for r in answers["Tasks per second in Flower, per provider:model A"]
    }
    assert ("spillway.run_job[gemini:gemini-2.0-flash]", "task-succeeded") in flower
    assert any(kind == "task-retried" for _, kind in flower)  # the 429s' re-routes
    # the provider picker lists the providers ("label_values" is Grafana's, not PromQL)
    for variable in board["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
        listed = observed.prometheus.get(f"/api/v1/label/{label}/values", params={"match[]": metric}).json()
        assert {"groq", "gemini", "openai"} <= set(listed["data"])


@pytest.mark.integration
def test_no_prompt_key_or_token_in_any_metric(observed: Observed) -> None:
    assert (
        "spillway_calls_total{" in observed.serve_metrics
        and "flower_events_total{" in observed.flower_metrics
    )
    stored = observed.prometheus.get("/api/v1/series", params={"match[]": '{__name__=~".+"}'}).text
    assert len(observed.secrets) >= 5  # the token and each provider's key
    for body in (observed.serve_metrics, observed.flower_metrics, stored):
        assert CANARY not in body
        for secret in observed.secrets:
            assert secret not in body
