"""`spillway usage`: requests, tokens, dollars, failures, re-routes and latency, from the store's
ledger of attempts (every provider call is one), grouped as asked; cached answers apart. "in
doubt" counts calls whose worker died after the request left: charged at their estimate (the
input estimate and max_tokens), since whether and how the provider answered is unknown.

The query is the store's (`Store.usage_report`); here are `--since` and the table."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from workers.errors import InputError
from workers.store import Store
from workers.store.reports import check_grouping

_RELATIVE = re.compile(r"(\d+)([mhdw])")
_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``2026-11-01``, ``2026-11-01T12:00``, or ``30m`` / ``24h`` / ``7d`` / ``2w`` back from now (UTC)."""
    if not text:
        return None
    now = now or datetime.now(UTC)
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        try:
            return now - timedelta(**{_UNIT[relative.group(2)]: int(relative.group(1))})
        except (OverflowError, ValueError):  # beyond what a date holds (year 1)
            raise InputError(
                f"--since: {text.strip()[:40]!r} reaches back before the year 1; "
                "give a date or a shorter span"
            ) from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"--since: expected a date like 2026-11-01, a time, or 30m / 24h / 7d, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def usage_report(store: Store, *, since: datetime | None = None, by: str = "model") -> dict[str, Any]:
    """The report `render_usage` shows (see `Store.usage_report`); a wrong `by` fails first."""
    check_grouping(by)
    return store.usage_report(since=since, by=by)


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
        "in_doubt",
        "via_batch",
        "saved_usd",
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
    if column in ("cost_usd", "saved_usd"):
        return f"${value:.6f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"
