"""`spillway usage`: requests, tokens, dollars, failures, re-routes and latency, from the store's
ledger of attempts (every provider call is one), grouped as asked; cached answers apart."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import case, func, select

from workers.errors import InputError
from workers.store import SUCCEEDED, Attempt, Job, Store

GROUPINGS = ("provider", "model", "key", "task", "tier", "day")
_RELATIVE = re.compile(r"(\d+)([hdw])")
_UNIT = {"h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``2026-11-01``, ``2026-11-01T12:00``, or ``24h`` / ``7d`` / ``2w`` back from now (UTC)."""
    if not text:
        return None
    now = now or datetime.now(UTC)
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - timedelta(**{_UNIT[relative.group(2)]: int(relative.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"--since: expected a date like 2026-11-01, a time, or 24h / 7d, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _keys(by: str, table: Any) -> list[Any]:
    columns = {
        "provider": [table.provider],
        "model": [table.provider, table.model],
        "key": [table.provider, table.key_id],
        "task": [table.task_type],
        "tier": [table.tier],
        "day": [func.date(table.started_at if table is Attempt else table.finished_at)],
    }
    if by not in columns:
        raise InputError(f"--by: expected one of {', '.join(GROUPINGS)}, got {by!r}")
    return columns[by]


def _name(values: tuple[Any, ...]) -> str:
    return "/".join("-" if v is None else str(v) for v in values)


def usage_report(store: Store, *, since: datetime | None = None, by: str = "model") -> dict[str, Any]:
    keys = _keys(by, Attempt)
    called = Attempt.called.is_(True)
    totals = select(
        *keys,
        func.sum(case((called, 1), else_=0)),
        func.sum(Attempt.input_tokens),
        func.sum(Attempt.output_tokens),
        func.sum(Attempt.cost_usd),
        func.sum(case((called & (Attempt.outcome != SUCCEEDED), 1), else_=0)),
        func.sum(case((Attempt.moved_to.is_not(None) & (Attempt.moved_to != Attempt.provider), 1), else_=0)),
    ).group_by(*keys)
    latencies = select(*keys, Attempt.latency_ms).where(called, Attempt.latency_ms.is_not(None))
    cached = select(*_keys(by, Job), func.count()).where(Job.cached.is_(True)).group_by(*_keys(by, Job))
    if since is not None:
        totals = totals.where(Attempt.started_at >= since)
        latencies = latencies.where(Attempt.started_at >= since)
        cached = cached.where(Job.finished_at >= since)
    n = len(keys)
    rows: dict[str, dict[str, Any]] = {}
    with store.session(write=False) as s:
        for row in s.execute(totals):
            requests, tin, tout, cost, failures, reroutes = row[n:]
            rows[_name(row[:n])] = {
                "requests": int(requests or 0),
                "input_tokens": int(tin or 0),
                "output_tokens": int(tout or 0),
                "cost_usd": round(float(cost or 0.0), 6),
                "failures": int(failures or 0),
                "reroutes": int(reroutes or 0),
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
    total = {
        k: sum(g[k] for g in groups)
        for k in ("requests", "input_tokens", "output_tokens", "failures", "reroutes", "cached")
    }
    total["cost_usd"] = round(sum(g["cost_usd"] for g in groups), 6)
    return {"by": by, "since": since.isoformat() if since else None, "groups": groups, "total": total}


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    return round(samples[min(len(samples) - 1, int(q * len(samples)))], 1)


def render_usage(report: dict[str, Any], console: Console) -> None:
    since = f" since {report['since']}" if report["since"] else ""
    table = Table(title=f"spillway usage by {report['by']}{since}")
    columns = (
        "requests",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "failures",
        "reroutes",
        "cached",
        "latency_p50_ms",
        "latency_p95_ms",
    )
    table.add_column(report["by"])
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for group in report["groups"]:
        table.add_row(group[report["by"]], *(_cell(column, group[column]) for column in columns))
    total = report["total"]
    table.add_row("[bold]total[/]", *(_cell(c, total[c]) if c in total else "" for c in columns))
    console.print(table)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "cost_usd":
        return f"${value:.6f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"
