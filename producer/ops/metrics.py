"""What `spillway serve` tells Prometheus at /metrics.

Gauges, read when scraped: queue lengths, budget left per account, calls in flight, accounts
usable, jobs by status (`StatusCollector`: the limiter, the broker, the store).

Counters, summed from the ledger of attempts (`LedgerCollector`), so Grafana takes rates of them:

    spillway_calls_total{provider,model,task_type,outcome}   calls whose outcome is known;
                                                             429s are outcome="rate_limited"
    spillway_reroutes_total{provider,model,task_type}        jobs that went on to another provider
    spillway_tokens_total{provider,model,task_type,direction}  input and output tokens
    spillway_cost_usd_total{provider,model,task_type}        dollars
    spillway_call_latency_seconds{provider,model}            a histogram of call latency

They count what the store holds, not what this process saw: a restart of serve, or a second one,
reports the same numbers. Summing the whole ledger on every scrape would cost a full scan of a
table that only grows, so `LedgerTotals` keeps running totals and reads only what is new.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from producer.status import status_report
from workers.errors import RateLimited
from workers.runtime import Runtime
from workers.store import SUCCEEDED, Store, utcnow
from workers.store.reports import LedgerGroup

#: Bounds of the latency histogram: a cached or simulated answer in milliseconds, a long
#: generation in minutes.
LATENCY_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
BOUNDS_MS = tuple(bound * 1000 for bound in LATENCY_BOUNDS_S)
#: Attempts whose id was already the highest this long ago are folded into the running totals.
#: Ids are handed out before their transaction commits (PostgreSQL), so the newest ids can still
#: gain rows that commit a moment later; a transaction here lasts milliseconds.
SETTLE_S = 10.0
#: Outcomes every (provider, model, task type) reports from its first call, at 0 until they
#: happen: `rate()` counts a series' increase only from its first sample, so a 429 that made
#: the series appear would never show on a graph.
SEEDED_OUTCOMES = (SUCCEEDED, RateLimited.kind)

Labels = tuple[str, str, str, str, bool, bool]  # provider, model, task type, outcome, called, moved away
Sums = list[int]  # attempts, input and output tokens, nano-dollars, latency count and µs, per bound


def metrics_text(rt: Runtime, app: Any) -> bytes:
    """The body of GET /metrics (Prometheus' text format)."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(rt, app))
    registry.register(LedgerCollector(ledger_totals(rt.store)))
    return generate_latest(registry)


class StatusCollector:
    """Reads the limiter, the broker and the store when Prometheus scrapes."""

    def __init__(self, rt: Runtime, app: Any) -> None:
        self.rt, self.app = rt, app

    def collect(self) -> Iterator[Metric]:
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


class LedgerTotals:
    """Sums over every finished attempt of the ledger, brought up to date by `read()`.

    Attempt ids only grow, and an attempt is written once, when its run ends (only the
    STARTED entries earlier versions wrote at the claim change later: their outcome replaced
    them, or they fall in doubt). So: attempts up to an id that was the highest `settle_s` ago
    are summed once into `folded`; the STARTED ones among them are remembered by id and looked
    at again on each read until they settle; and the attempts after that id are summed afresh
    on each read. A read costs the attempts of the last `settle_s` plus a scrape interval, and
    the few in flight, however long the ledger. The first read of a process sums the rest of
    the ledger once: what was there `settle_s` ago it tells by the times attempts were written.
    """

    def __init__(
        self, store: Store, *, settle_s: float = SETTLE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store, self.settle_s, self.clock = store, settle_s, clock
        self.folded: dict[Labels, Sums] = {}
        self.folded_upto = 0
        self.in_flight: set[int] = set()
        self._tops: deque[tuple[float, int]] = deque()  # (when, highest id then), oldest first
        self._lock = threading.Lock()  # scrapes run on serve's thread pool

    def read(self) -> dict[Labels, Sums]:
        with self._lock:
            now = self.clock()
            if not self.folded_upto and not self._tops:  # the first read: fold the past at once
                earlier = utcnow() - timedelta(seconds=self.settle_s)
                self._tops.append((now - self.settle_s, self.store.ledger_top(written_before=earlier)))
            self._tops.append((now, self.store.ledger_top()))
            self._fold(now)
            recent = self.store.ledger_slice(after=self.folded_upto, latency_bounds_ms=BOUNDS_MS)
            totals = {labels: list(sums) for labels, sums in self.folded.items()}
            _add(totals, recent.groups)
            return totals

    def _fold(self, now: float) -> None:
        settled = None
        while self._tops and now - self._tops[0][0] >= self.settle_s:
            settled = self._tops.popleft()[1]
        if settled is not None and settled > self.folded_upto:
            part = self.store.ledger_slice(after=self.folded_upto, upto=settled, latency_bounds_ms=BOUNDS_MS)
            _add(self.folded, part.groups)
            self.in_flight.update(part.in_flight)
            self.folded_upto = settled
        if self.in_flight:
            again = self.store.ledger_slice(ids=self.in_flight, latency_bounds_ms=BOUNDS_MS)
            _add(self.folded, again.groups)
            self.in_flight = set(again.in_flight)  # finished ones are summed now; dropped ones gone


def _add(totals: dict[Labels, Sums], groups: Iterable[LedgerGroup]) -> None:
    for g in groups:
        labels = (g.provider, g.model, g.task_type, g.outcome, g.called, g.moved_away)
        sums = [g.attempts, g.input_tokens, g.output_tokens, g.cost_nusd, g.latency_count, g.latency_sum_us]
        sums += g.latency_le
        have = totals.setdefault(labels, [0] * len(sums))
        for i, value in enumerate(sums):
            have[i] += value


_TOTALS: weakref.WeakKeyDictionary[Store, LedgerTotals] = weakref.WeakKeyDictionary()
_TOTALS_LOCK = threading.Lock()


def ledger_totals(store: Store) -> LedgerTotals:
    """The running totals of `store`, one per store for the life of the process (every scrape
    builds a fresh registry; the totals must outlive it)."""
    with _TOTALS_LOCK:
        if store not in _TOTALS:
            _TOTALS[store] = LedgerTotals(store)
        return _TOTALS[store]


class LedgerCollector:
    """The ledger's counters (see the module's docstring) from `LedgerTotals`."""

    def __init__(self, totals: LedgerTotals) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        by_job = ["provider", "model", "task_type"]
        calls = CounterMetricFamily(
            "spillway_calls",
            'Provider calls whose outcome is known, by outcome (a 429: "rate_limited"; "in_doubt": '
            "its worker died during the call)",
            labels=[*by_job, "outcome"],
        )
        reroutes = CounterMetricFamily(
            "spillway_reroutes",
            "Jobs that went on from this provider to another (after a 429, an error, or no room)",
            labels=by_job,
        )
        tokens = CounterMetricFamily(
            "spillway_tokens",
            "Tokens of the calls, input and output (a call in doubt: at its estimate)",
            labels=[*by_job, "direction"],
        )
        cost = CounterMetricFamily("spillway_cost_usd", "Dollars the calls cost", labels=by_job)
        latency = HistogramMetricFamily(
            "spillway_call_latency_seconds", "How long provider calls took", labels=["provider", "model"]
        )
        per_call: dict[tuple[str, ...], int] = {}
        per_job: dict[tuple[str, ...], list[int]] = {}  # re-routes, input, output, nano-dollars
        per_model: dict[tuple[str, ...], list[int]] = {}  # count, µs, per bound
        for (provider, model, task_type, outcome, called, away), sums in self.totals.read().items():
            job = (provider, model, task_type)
            attempts, tin, tout, cost_nusd, lat_n, lat_us, *under = sums
            if called:
                for seeded in SEEDED_OUTCOMES:
                    per_call.setdefault((*job, seeded), 0)
                per_call[(*job, outcome)] = per_call.get((*job, outcome), 0) + attempts
            row = per_job.setdefault(job, [0, 0, 0, 0])
            for i, value in enumerate((attempts if away else 0, tin, tout, cost_nusd)):
                row[i] += value
            if called:
                hist = per_model.setdefault((provider, model), [0] * (2 + len(under)))
                for i, value in enumerate((lat_n, lat_us, *under)):
                    hist[i] += value
        for labels, n in sorted(per_call.items()):
            calls.add_metric(list(labels), n)
        for labels, (moved, tin, tout, cost_nusd) in sorted(per_job.items()):
            reroutes.add_metric(list(labels), moved)
            tokens.add_metric([*labels, "input"], tin)
            tokens.add_metric([*labels, "output"], tout)
            cost.add_metric(list(labels), cost_nusd / 1e9)
        for labels, (n, us, *under) in sorted(per_model.items()):
            bounds = map(floatToGoString, LATENCY_BOUNDS_S)
            buckets = [(bound, count) for bound, count in zip(bounds, under, strict=True)]
            latency.add_metric(list(labels), [*buckets, ("+Inf", n)], us / 1e6)
        yield from (calls, reroutes, tokens, cost, latency)
