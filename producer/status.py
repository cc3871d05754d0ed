"""`spillway status` and `spillway route`: what every account has left, and why a job would go
where it goes. The same dicts are printed as JSON (`--json`) and served by `spillway serve`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Celery
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workers import provider_batch
from workers.broker import queue_lengths
from workers.config import Candidate
from workers.limiter import AccountState, Costs, Scope
from workers.runtime import Runtime
from workers.strategies import ROOM_S


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(account: AccountState, now_ms: int) -> tuple[str, str | None, str]:
    """(state, until, why) of one account."""
    if account.disabled:
        return "disabled", None, account.disabled
    if account.blocked_until_ms > now_ms:
        return "blocked", _iso(account.blocked_until_ms), account.blocked_why
    if account.open_until_ms > now_ms:
        return "circuit_open", _iso(account.open_until_ms), f"{account.fails} failures in a row"
    if account.open_until_ms > 0:
        return "probing", None, "circuit half-open: one call tests the provider"
    return "available", None, ""


def status_report(rt: Runtime, app: Celery | None = None) -> dict[str, Any]:
    """Per provider, model and account: state, remaining budget, calls in flight, queue length."""
    usable = [
        Candidate(name, model)
        for name, provider in rt.settings.providers.items()
        if rt.keyring.usable(name)
        for model in provider.models
    ]
    snapshots = rt.limiter.snapshots(usable) if usable else {}
    queues = {}
    if app is not None:
        queues = queue_lengths(app, [p.queue for p in rt.settings.providers.values()])
    providers = []
    for name, provider in rt.settings.providers.items():
        entry: dict[str, Any] = {
            "provider": name,
            "api": provider.api,
            "queue": provider.queue,
            "queue_length": queues.get(provider.queue),
            "skipped": rt.keyring.skipped.get(name),
            "accounts": [],
        }
        for candidate in (c for c in usable if c.provider == name):
            snap, concurrency = snapshots[candidate], rt.limiter.concurrency_limit(candidate)
            seen: dict[str, dict[str, Any]] = {}
            for account in snap.accounts:
                if account.account in seen:  # several keys on one shared account
                    seen[account.account]["keys"].append(account.key_id)
                    continue
                state, until, why = _state(account, snap.now_ms)
                seen[account.account] = {
                    "model": candidate.model,
                    "account": account.account,
                    "keys": [account.key_id],
                    "state": state,
                    "until": until,
                    "why": why,
                    "in_flight": account.in_flight,
                    # real input tokens per estimated one (4 characters a token), as learned
                    "input_ratio": round(account.input_ratio, 2),
                    "remaining": {
                        ("" if b.scope == Scope.ACCOUNT else "model ") + b.field: {
                            "remaining": max(0, int(b.avail)),
                            "limit": int(b.cap),
                        }
                        for b in account.buckets
                    },
                }
                if concurrency:
                    seen[account.account]["remaining"]["concurrency"] = {
                        "remaining": max(0, concurrency - account.in_flight),
                        "limit": concurrency,
                    }
            entry["accounts"].extend(seen.values())
        providers.append(entry)
    return {
        "now": _iso(rt.limiter.now_s() * 1000),
        "providers": providers,
        "provider_batches": provider_batch.in_flight(rt),
    }


def route_report(rt: Runtime, task: str, tier: str, *, max_tokens: int | None = None) -> dict[str, Any]:
    """The chain, its strategy, and what each link has left for a typical job right now."""
    chain = rt.settings.chain(task, tier)
    usable, skipped = rt.router.usable(chain)
    max_tokens = max_tokens or rt.settings.default_max_tokens
    costs = Costs.estimate(100, max_tokens)  # a short prompt, as a yardstick
    share = rt.settings.tiers[tier].budget_share
    options = {o.candidate: o for o in rt.router.options(usable, costs, share)} if usable else {}
    links = []
    for candidate in chain.candidates:
        option = options.get(candidate)
        links.append(
            {
                "candidate": str(candidate),
                "usable": option is not None,
                "skipped": skipped.get(str(candidate)),
                "wait_s": None if option is None or option.wait.is_never else round(option.wait.seconds, 3),
                "has_room": bool(option and option.has_room),
                "why": option.why if option else skipped.get(str(candidate)),
            }
        )
    choice = rt.router.choose(list(options.values()), chain.strategy) if options else None
    return {
        "task": task,
        "tier": tier,
        "fallback": rt.settings.fallback_note(task),
        "strategy": chain.strategy,
        "budget_share": share,
        "priority": rt.settings.tiers[tier].priority,
        "job": {"input_tokens": 100, "max_tokens": max_tokens},
        "chain": links,
        "next_job_goes_to": str(choice.candidate) if choice and not choice.wait.is_never else None,
    }


def render_status(report: dict[str, Any], console: Console) -> None:
    table = Table(title=f"spillway status · {report['now']}", expand=False)
    for column in ("provider", "model", "account", "state", "remaining now (limit)", "in flight", "queued"):
        table.add_column(column, overflow="fold")
    for p in report["providers"]:
        queued = "-" if p["queue_length"] is None else str(p["queue_length"])
        if p["skipped"]:
            table.add_row(p["provider"], "-", "-", f"[dim]skipped: {p['skipped']}[/]", "", "", queued)
            continue
        for a in p["accounts"]:
            colour = {"available": "green", "probing": "yellow"}.get(a["state"], "red")
            state = f"[{colour}]{a['state']}[/]"
            if a["until"]:
                state += f" until {a['until']}"
            if a["why"]:
                state += f"\n[dim]{a['why']}[/]"
            remaining = "  ".join(f"{k} {v['remaining']}/{v['limit']}" for k, v in a["remaining"].items())
            if abs(a["input_ratio"] - 1) >= 0.05:  # the provider counts input unlike the estimate
                remaining += f"\n[dim]input ×{a['input_ratio']:g} the estimate[/]"
            keys = a["account"] if a["keys"] == [a["account"]] else f"{a['account']} ({', '.join(a['keys'])})"
            table.add_row(
                p["provider"], a["model"], keys, state, remaining or "no limits", str(a["in_flight"]), queued
            )
    console.print(table)
    render_provider_batches(report, console)


def render_provider_batches(report: dict[str, Any], console: Console) -> None:
    """Jobs waiting in the providers' batch APIs: one line per provider batch (none: no table)."""
    batches = report.get("provider_batches") or []
    if not batches:
        return
    table = Table(title="provider batches in flight", expand=False)
    for column in ("provider", "model", "state", "jobs (answered)", "age", "expected in", "batch"):
        table.add_column(column, no_wrap=True)
    for b in batches:
        state = b["state"] + (f" ({b['provider_status']})" if b["provider_status"] else "")
        expected = "-" if b["expected_in_s"] is None else _span(b["expected_in_s"])
        table.add_row(
            b["provider"],
            b["model"],
            state,
            f"{b['jobs']} ({b['done']})",
            _span(b["age_s"]),
            expected,
            b["id"][:12],
        )
    console.print(table)


def _span(seconds: float) -> str:
    if seconds < 0:
        return f"overdue {_span(-seconds)}"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_compact(report: dict[str, Any], console: Console) -> None:
    """One line per provider: how many accounts are available, the worst state of the others,
    in flight, queued, and the scarcest limit left (for `status --watch` on a small terminal)."""
    table = Table(title=f"spillway status · {report['now']} (one line per provider)", expand=False)
    for column in ("provider", "accounts available", "others", "scarcest left", "in flight", "queued"):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    for p in report["providers"]:
        queued = "-" if p["queue_length"] is None else str(p["queue_length"])
        if p["skipped"]:
            table.add_row(p["provider"], "-", f"[dim]skipped: {p['skipped']}[/]", "", "", queued)
            continue
        accounts = p["accounts"]
        up = sum(1 for a in accounts if a["state"] == "available")
        others = sorted({a["state"] for a in accounts if a["state"] != "available"})
        scarce = [
            (v["remaining"] / v["limit"], f"{k} {v['remaining']}/{v['limit']}")
            for a in accounts
            for k, v in a["remaining"].items()
            if v["limit"]
        ]
        colour = "green" if up == len(accounts) else ("yellow" if up else "red")
        table.add_row(
            p["provider"],
            f"[{colour}]{up}/{len(accounts)}[/]",
            ", ".join(others) or "-",
            min(scarce)[1] if scarce else "no limits",
            str(sum(a["in_flight"] for a in accounts)),
            queued,
        )
    console.print(table)


def fit_status(report: dict[str, Any], console: Console) -> str:
    """What `status --watch` shows: the full table when it fits the terminal, else one line per
    provider, cut with a line that says how many providers did not fit."""
    height = console.size.height - 1  # the cursor's line
    for render in (render_status, render_compact):
        with console.capture() as capture:
            render(report, console)
        text = capture.get()
        if text.count("\n") <= height:
            return text
    lines = text.splitlines()
    rows = [p["provider"] for p in report["providers"]]
    shown = lines[: max(1, height - 1)]
    hidden = [name for name in rows if not any(name in line for line in shown)]
    if not hidden:  # every provider's line fits; only the table's bottom edge does not
        return "\n".join(lines[: max(1, height)]) + "\n"
    return (
        "\n".join([*shown, f"… {len(hidden)} more provider(s): a taller terminal or --json shows them"])
        + "\n"
    )


def render_route(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"route {report['task']}/{report['tier']} · strategy {report['strategy']} · "
        f"share {report['budget_share']:.0%} · priority {report['priority']}",
    )
    for column in ("#", "candidate", "room now", "expected wait", "why"):
        table.add_column(column, overflow="fold")
    for i, link in enumerate(report["chain"], 1):
        if not link["usable"]:
            table.add_row(str(i), link["candidate"], "[dim]skipped[/]", "-", link["skipped"] or "")
            continue
        wait = "never" if link["wait_s"] is None else f"{link['wait_s']:.2f}s"
        room = "[green]yes[/]" if link["has_room"] else "[yellow]no[/]"
        table.add_row(str(i), link["candidate"], room, wait, link["why"] or "")
    if report.get("fallback"):
        console.print(f"[yellow]note:[/] {escape(report['fallback'])}", highlight=False)
    console.print(table)
    target = report["next_job_goes_to"]
    console.print(
        f"a job now goes to: [bold]{target}[/]" if target else "[red]no candidate can take a job[/]"
    )
    console.print(
        f"[dim](room = expected wait ≤ {ROOM_S}s for a job of {report['job']['input_tokens']} "
        f"input + {report['job']['max_tokens']} output tokens, counting work already queued)[/]"
    )
