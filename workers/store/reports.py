"""Reports: read-only sums and counts over the jobs and the ledger of attempts.

`usage_report` is `spillway usage`: requests, tokens, dollars, failures, re-routes and latency,
from the attempts (every provider call is one), grouped as asked; cached answers apart.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, case, cast, func, select

from workers.errors import InputError
from workers.store.engine import Database, aware
from workers.store.models import IN_DOUBT, STARTED, SUCCEEDED, Attempt, Job

GROUPINGS = ("provider", "model", "key", "task", "tier", "day")


def check_grouping(by: str) -> None:
    """InputError unless `by` is one of `GROUPINGS`."""
    if by not in GROUPINGS:
        raise InputError(f"--by: expected one of {', '.join(GROUPINGS)}, got {by!r}")


@dataclass(frozen=True)
class LedgerGroup:
    """Sums over the finished attempts of a ledger slice that share these labels."""

    provider: str
    model: str
    task_type: str
    outcome: str
    called: bool
    moved_away: bool  # the job went on to another provider after it: a re-route
    attempts: int
    input_tokens: int
    output_tokens: int
    cost_nusd: int  # nano-dollars: integer sums are exact, so totals built from slices only grow
    latency_count: int
    latency_sum_us: int
    latency_le: tuple[int, ...]  # calls that took at most each of the bounds asked for


@dataclass(frozen=True)
class LedgerSlice:
    groups: list[LedgerGroup]
    in_flight: list[int]  # ids of its attempts still STARTED: not summed, look at them again later


class ReportStore(Database):
    """Questions about many jobs at once; nothing here writes."""

    def count_by_status(self, batch_id: str | None = None) -> dict[str, int]:
        with self.session(write=False) as s:
            query = select(Job.status, func.count()).group_by(Job.status)
            if batch_id is not None:
                query = query.where(Job.batch_id == batch_id)
            return dict(s.execute(query).all())

    def ledger_top(self, *, written_before: datetime | None = None) -> int:
        """The highest attempt id yet (0: none). Ids only grow: (after, upto] names a slice.

        `written_before`: instead, the id of the latest-started attempt written before then
        (its finished_at, set as it is written; found by the index on started_at, which is
        never later): a bound every attempt under it was written before. (A call's attempt is
        written when it ends: one that started long ago may have been written just now, and
        one with a lower id may not be committed yet.)"""
        with self.session(write=False) as s:
            if written_before is None:
                return int(s.execute(select(func.max(Attempt.id))).scalar() or 0)
            latest = select(Attempt.id).where(
                Attempt.started_at < written_before, Attempt.finished_at < written_before
            )
            latest = latest.order_by(Attempt.started_at.desc(), Attempt.id.desc()).limit(1)
            return int(s.execute(latest).scalar() or 0)

    def ledger_slice(
        self,
        *,
        after: int = 0,
        upto: int | None = None,
        ids: Collection[int] | None = None,
        latency_bounds_ms: Sequence[float] = (),
    ) -> LedgerSlice:
        """The attempts with `after` < id <= `upto` (or those of `ids`), summed in SQL per
        provider, model, task type, outcome, call made and re-route, with latency counted under
        each of `latency_bounds_ms`; the ones still in flight come back as ids instead. A range
        is read by its primary key, in one statement, so in one snapshot: an attempt is summed
        or in flight, never both nor neither."""
        in_flight = case((Attempt.outcome == STARTED, Attempt.id), else_=None)
        moved_away = case(
            (Attempt.moved_to.is_not(None) & (Attempt.moved_to != Attempt.provider), True), else_=False
        )
        keys = [Attempt.provider, Attempt.model, Attempt.task_type, Attempt.outcome, Attempt.called]
        query = select(
            *keys,
            moved_away,
            in_flight,
            func.count(),
            func.sum(Attempt.input_tokens),
            func.sum(Attempt.output_tokens),
            func.sum(cast(func.round(Attempt.cost_usd * 1e9), BigInteger)),
            func.count(Attempt.latency_ms),
            func.sum(cast(func.round(Attempt.latency_ms * 1000), BigInteger)),
            *(func.sum(case((Attempt.latency_ms <= bound, 1), else_=0)) for bound in latency_bounds_ms),
        ).group_by(*keys, moved_away, in_flight)
        if ids is None:
            ranges = [query.where(Attempt.id > after, *([Attempt.id <= upto] if upto is not None else []))]
        else:
            chosen = sorted(ids)
            ranges = [query.where(Attempt.id.in_(chosen[i : i + 500])) for i in range(0, len(chosen), 500)]
        groups, open_ids = [], []
        with self.session(write=False) as s:
            for statement in ranges:
                for row in s.execute(statement):
                    *labels, called, away, open_id = row[: len(keys) + 2]
                    if open_id is not None:
                        open_ids.append(int(open_id))
                        continue
                    sums = [int(v or 0) for v in row[len(keys) + 2 :]]
                    fixed = len(sums) - len(latency_bounds_ms)
                    groups.append(
                        LedgerGroup(*labels, bool(called), bool(away), *sums[:fixed], tuple(sums[fixed:]))
                    )
        return LedgerSlice(groups, open_ids)

    def created_span(self) -> tuple[datetime | None, datetime | None]:
        """When the first and the last job were stored (None, None: no jobs)."""
        with self.session(write=False) as s:
            first, last = s.execute(select(func.min(Job.created_at), func.max(Job.created_at))).one()
        return aware(first), aware(last)

    def usage_report(self, *, since: datetime | None = None, by: str = "model") -> dict[str, Any]:
        """Usage per group of `by` (one of `GROUPINGS`) since `since`, with a total."""
        keys = _keys(by, Attempt)
        called = Attempt.called.is_(True)
        totals = select(
            *keys,
            func.sum(case((called, 1), else_=0)),
            func.sum(Attempt.input_tokens),
            func.sum(Attempt.output_tokens),
            func.sum(Attempt.cost_usd),
            func.sum(case((called & (Attempt.outcome != SUCCEEDED), 1), else_=0)),
            func.sum(
                case((Attempt.moved_to.is_not(None) & (Attempt.moved_to != Attempt.provider), 1), else_=0)
            ),
            func.sum(case((Attempt.outcome == IN_DOUBT, 1), else_=0)),
            func.sum(case((Attempt.provider_batch_id.is_not(None), 1), else_=0)),
            func.sum(Attempt.saved_usd),
        )
        # calls in flight count once their outcome is known
        totals = totals.where(Attempt.outcome != STARTED).group_by(*keys)
        latencies = select(*keys, Attempt.latency_ms).where(called, Attempt.latency_ms.is_not(None))
        cached = select(*_keys(by, Job), func.count()).where(Job.cached.is_(True)).group_by(*_keys(by, Job))
        if since is not None:
            totals = totals.where(Attempt.started_at >= since)
            latencies = latencies.where(Attempt.started_at >= since)
            cached = cached.where(Job.finished_at >= since)
        n = len(keys)
        rows: dict[str, dict[str, Any]] = {}
        with self.session(write=False) as s:
            for row in s.execute(totals):
                requests, tin, tout, cost, failures, reroutes, in_doubt, batched, saved = row[n:]
                rows[_name(row[:n])] = {
                    "requests": int(requests or 0),
                    "input_tokens": int(tin or 0),
                    "output_tokens": int(tout or 0),
                    "cost_usd": round(float(cost or 0.0), 6),
                    "failures": int(failures or 0),
                    "reroutes": int(reroutes or 0),
                    "in_doubt": int(in_doubt or 0),
                    "via_batch": int(batched or 0),
                    "saved_usd": round(float(saved or 0.0), 6),
                    "cached": 0,
                    "latency_ms": [],
                }
            for row in s.execute(latencies):
                rows[_name(row[:n])]["latency_ms"].append(row[n])
            for row in s.execute(cached):
                entry = rows.setdefault(
                    _name(row[:n]),
                    {
                        "requests": 0,
                        "input_tokens": 0,
                        "output_tokens": 0,
                        "cost_usd": 0.0,
                        "failures": 0,
                        "reroutes": 0,
                        "in_doubt": 0,
                        "via_batch": 0,
                        "saved_usd": 0.0,
                        "cached": 0,
                        "latency_ms": [],
                    },
                )
                entry["cached"] = int(row[n])
        groups = []
        for name in sorted(rows):
            entry = rows[name]
            samples = sorted(entry.pop("latency_ms"))
            entry["latency_p50_ms"] = _percentile(samples, 0.50)
            entry["latency_p95_ms"] = _percentile(samples, 0.95)
            groups.append({by: name, **entry})
        summed = (
            "requests",
            "input_tokens",
            "output_tokens",
            "failures",
            "reroutes",
            "in_doubt",
            "via_batch",
            "cached",
        )
        total = {k: sum(g[k] for g in groups) for k in summed}
        for money in ("cost_usd", "saved_usd"):
            total[money] = round(sum(g[money] for g in groups), 6)
        return {"by": by, "since": since.isoformat() if since else None, "groups": groups, "total": total}

    # -- the live page of `spillway serve` (producer/ops/dashboard.py) --------------------------

    def recent_latency(self, since: datetime, *, limit: int = 5000) -> dict[str, dict[str, Any]]:
        """Call latency p50 and p95 (ms) per provider over the calls started since `since`: the
        newest `limit` of them, so a busy window costs no more than a quiet one."""
        query = (
            select(Attempt.provider, Attempt.latency_ms)
            .where(
                Attempt.called.is_(True),
                Attempt.outcome != STARTED,  # in flight: its latency is not known yet
                Attempt.latency_ms.is_not(None),
                Attempt.started_at >= since,
            )
            .order_by(Attempt.started_at.desc())
            .limit(limit)
        )
        samples: dict[str, list[float]] = {}
        with self.session(write=False) as s:
            for provider, latency_ms in s.execute(query):
                samples.setdefault(provider, []).append(latency_ms)
        report = {}
        for provider, values in sorted(samples.items()):
            values.sort()
            report[provider] = {
                "calls": len(values),
                "p50_ms": _percentile(values, 0.50),
                "p95_ms": _percentile(values, 0.95),
            }
        return report


def _keys(by: str, table: Any) -> list[Any]:
    check_grouping(by)
    columns = {
        "provider": [table.provider],
        "model": [table.provider, table.model],
        "key": [table.provider, table.key_id],
        "task": [table.task_type],
        "tier": [table.tier],
        "day": [func.date(table.started_at if table is Attempt else table.finished_at)],
    }
    return columns[by]


def _name(values: tuple[Any, ...]) -> str:
    return "/".join("-" if v is None else str(v) for v in values)


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    return round(samples[min(len(samples) - 1, int(q * len(samples)))], 1)
