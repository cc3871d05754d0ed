"""Provider batches: the same batch all synchronous, then `auto` with a 2 h deadline.

`python -m bench.provider_batches [--jobs N] [--turnaround-s S]` prints both runs side by
side; `python -m bench --only provider-batches` the summary rows.

Three simulated providers, one per wire format (OpenAI, Anthropic, Gemini), each with its
own prices, per-minute limits that make the synchronous run last about a minute, and a batch
API at half price (`[providers.X.batch] discount = 0.5`) whose simulated turnaround is
`turnaround_s` (30 s). One route takes turns among the three. The batch runs twice, each on
a fresh stack (its own Redis, store, simulator and worker process): (1) `mode="sync"`,
(2) `mode="auto"` with `deadline_s=7200`. Fresh stacks rather than one reset between runs:
each run starts from full rate-limit buckets, an empty store (no turnaround learned from
the run before, nothing cached) and zeroed simulator counters, so neither run can borrow
from the other; it costs a few seconds of start-up, outside the measured time.

What is reported is measured from outside: cost, savings and answers through provider
batches from the store's usage report; synchronous calls, batch requests and provider
batches as the simulator saw them (`GET /_sim/stats`); every `custom_id` answered exactly
once from the batch's results (`handle.results()`) and the store's ledger (one succeeded
call per job); wall time from the submit to the last job final, against the deadline. The
target (issue "Done when"): `auto` costs at most 0.6x the synchronous run, on time, every
`custom_id` answered once. A run that misses it says so in the table. Every loop is bounded
in count and time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from bench.common import stack_from, wait_all_final
from producer.batch import CHUNK
from workers.store import FINAL, SUCCEEDED, Attempt, Job, aware

#: The issue's target: `auto` at most this share of the all-synchronous cost.
TARGET_RATIO = 0.6
DEADLINE_S = 7200.0
TASK, TIER = "digest", "free"

CONFIG = """
# Three providers in the three wire formats, each with a batch API at half price. The
# simulator finishes a provider batch {turnaround_s:g} s after it is created; Spillway, before
# it has seen one end, expects an hour (1.5 x 1 h + collecting still meets a 2 h deadline).
[spillway]
default_max_tokens = 64

[providers.oa]
api = "openai"
base_url = "https://oa.example/v1"
key_env = "OA_KEY"
timeout_s = 30
limits = {{ rpm = {rpm}, tpm = 10000000, concurrency = 64 }}
batch = {{ discount = 0.5, turnaround_s = 3600, collect_s = 5, poll_s = 10 }}
[providers.oa.models.oa-large]
input_per_mtok = 2.5
output_per_mtok = 10.0

[providers.an]
api = "anthropic"
base_url = "https://an.example"
key_env = "AN_KEY"
timeout_s = 30
limits = {{ rpm = {rpm}, itpm = 10000000, otpm = 10000000, concurrency = 64 }}
batch = {{ discount = 0.5, turnaround_s = 3600, collect_s = 5, poll_s = 10 }}
[providers.an.models.an-sonnet]
input_per_mtok = 3.0
output_per_mtok = 15.0

[providers.ge]
api = "gemini"
base_url = "https://ge.example/v1beta"
key_env = "GE_KEY"
timeout_s = 30
limits = {{ rpm = {rpm}, tpm = 10000000, concurrency = 64 }}
batch = {{ discount = 0.5, turnaround_s = 3600, collect_s = 5, poll_s = 10 }}
[providers.ge.models.ge-pro]
input_per_mtok = 1.25
output_per_mtok = 10.0

[routes.{task}]
strategy = "round_robin"
{tier} = ["oa:oa-large", "an:an-sonnet", "ge:ge-pro"]

[simulator]
seed = 11
latency_ms = {{ median = 150, p95 = 400 }}
batch = {{ turnaround_s = {turnaround_s:g} }}
"""


def items(jobs: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"doc-{i:05d}",
            "prompt": f"Summarise support ticket {i} in two sentences: " + "the customer writes that " * 8,
        }
        for i in range(jobs)
    ]


def _wait_callback(store: Any, batch_id: str, chunks: int, timeout_s: float) -> int:
    """How often the batch's chord callbacks ran (one per chunk of `producer.batch.CHUNK`
    jobs), once all `chunks` have, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    runs = 0
    for _ in range(int(timeout_s / 0.25) + 1):
        batch = store.batch(batch_id)
        runs = int(batch.callback_runs or 0) if batch is not None else 0
        if runs >= chunks or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return runs


def _ledger(store: Any, job_ids: list[str]) -> dict[str, int]:
    """Succeeded calls per job, from the store's attempts (the ledger a bill is made from)."""
    with store.session(write=False) as s:
        rows = s.execute(
            select(Attempt.job_id, func.count())
            .where(Attempt.job_id.in_(job_ids), Attempt.outcome == SUCCEEDED)
            .group_by(Attempt.job_id)
        ).all()
    return {job_id: int(n) for job_id, n in rows}


def one_run(
    workdir: Path,
    *,
    mode: str,
    jobs: int,
    turnaround_s: float,
    rpm: int,
    deadline_s: float = DEADLINE_S,
    timeout_s: float = 900.0,
    concurrency: int = 32,
) -> dict[str, Any]:
    """One batch of `jobs` on a fresh stack in `mode`; what the store and the simulator saw."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = CONFIG.format(rpm=rpm, turnaround_s=turnaround_s, task=TASK, tier=TIER)
    stack = stack_from(text, workdir)
    wanted = items(jobs)
    stack.start()
    try:
        stack.start_worker(concurrency=concurrency, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            store = client.runtime.store
            started = time.monotonic()
            handle = client.submit_batch(wanted, task=TASK, tier=TIER, mode=mode, deadline_s=deadline_s)
            submitted = time.monotonic()
            try:
                finished: float | None = wait_all_final(store, jobs, timeout_s, batch_id=handle.id)
            except TimeoutError:
                finished = None
            callback_runs = _wait_callback(
                store, handle.id, _chunks(jobs), timeout_s=30.0 if finished else 0.0
            )
            counts = store.count_by_status(handle.id)
            records = list(handle.results())
            stored = [j for page in _pages(store, handle.id, jobs) for j in page]
            charged = _ledger(store, [j.id for j in stored])
            usage = store.usage_report(by="provider")["total"]
            provider_batches = store.provider_batch_counts()
        stats = stack.simulator_stats()
    finally:
        stack.close()

    seen = collections.Counter(r["custom_id"] for r in records)
    expected = {w["custom_id"] for w in wanted}
    answered = {r["custom_id"] for r in records if r["status"] == SUCCEEDED}
    late = sum(
        1
        for j in stored
        if j.finished_at is None
        or (j.deadline_at is not None and aware(j.finished_at) > aware(j.deadline_at))
    )
    wall_s = (finished if finished is not None else time.monotonic()) - started
    return {
        "mode": mode,
        "jobs": jobs,
        "succeeded": counts.get(SUCCEEDED, 0),
        "failed": counts.get("failed", 0),
        "not_final": jobs - sum(counts.get(s, 0) for s in FINAL),
        "finished": finished is not None,
        "wall_s": wall_s,
        "submit_s": submitted - started,
        "late_jobs": late,
        "on_time": finished is not None and late == 0 and wall_s <= deadline_s,
        "cost_usd": float(usage.get("cost_usd", 0.0)),
        "saved_usd": float(usage.get("saved_usd", 0.0)),
        "via_batch": int(usage.get("via_batch", 0)),
        "billed_calls": int(usage.get("requests", 0)),
        "missing_ids": len(expected - answered),
        "doubled_ids": sum(1 for n in seen.values() if n > 1),
        "unknown_ids": len(set(seen) - expected),
        "charged_twice": sum(1 for n in charged.values() if n > 1),
        "callback_runs": callback_runs,
        "sim_sync_calls": sum(s.get("requests", 0) for s in stats.values()),
        "sim_sync_ok": sum(s.get("ok", 0) for s in stats.values()),
        "sim_429s": sum(s.get("rate_limited", 0) for s in stats.values()),
        "sim_batch_requests": sum(s.get("batch_requests", 0) for s in stats.values()),
        "sim_batches_created": sum(s.get("batches_created", 0) for s in stats.values()),
        "sim_by_provider": {
            p: {k: s.get(k, 0) for k in ("requests", "batch_requests", "batches_created")}
            for p, s in stats.items()
        },
        "provider_batches": provider_batches,
    }


def _pages(store: Any, batch_id: str, jobs: int, page: int = 1000) -> list[list[Job]]:
    """The batch's stored jobs in input order, page by page (at most jobs / page + 2 reads)."""
    out, after = [], -1
    for _ in range(jobs // page + 2):
        chunk = store.batch_jobs(batch_id, after_seq=after, limit=page)
        if not chunk:
            break
        out.append(chunk)
        after = chunk[-1].seq
    return out


def answered_once(r: dict[str, Any]) -> bool:
    return not (r["missing_ids"] or r["doubled_ids"] or r["unknown_ids"] or r["charged_twice"])


def problems(r: dict[str, Any], ratio: float | None) -> list[str]:
    """What keeps a run from its target (an empty list: met)."""
    out = []
    if not r["finished"]:
        out.append(f"{r['not_final']} job(s) not final after the bench's bound")
    if r["failed"]:
        out.append(f"{r['failed']} failed")
    if not r["on_time"]:
        out.append(f"not on time ({r['late_jobs']} late)")
    if r["missing_ids"]:
        out.append(f"{r['missing_ids']} custom_id(s) unanswered")
    if r["doubled_ids"] or r["unknown_ids"]:
        out.append(f"{r['doubled_ids']} custom_id(s) doubled, {r['unknown_ids']} unknown")
    if r["charged_twice"]:
        out.append(f"{r['charged_twice']} job(s) charged twice")
    if ratio is not None and ratio > TARGET_RATIO:
        out.append(f"cost ratio {ratio:.2f} > {TARGET_RATIO}")
    return out


def run(
    workdir: Path,
    *,
    jobs: int = 1000,
    turnaround_s: float = 30.0,
    rpm: int = 170,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Both runs, synchronous first. `rpm` per provider: three buckets of 170 start full, so
    510 jobs go at once and the rest at 8.5/s: about a minute for 1,000 jobs."""
    sync = one_run(
        workdir / "sync", mode="sync", jobs=jobs, turnaround_s=turnaround_s, rpm=rpm, timeout_s=timeout_s
    )
    auto = one_run(
        workdir / "auto", mode="auto", jobs=jobs, turnaround_s=turnaround_s, rpm=rpm, timeout_s=timeout_s
    )
    ratio = auto["cost_usd"] / sync["cost_usd"] if sync["cost_usd"] > 0 else None
    sync["problems"] = problems(sync, None)
    auto["problems"] = problems(auto, ratio)
    return {
        "jobs": jobs,
        "turnaround_s": turnaround_s,
        "deadline_s": DEADLINE_S,
        "sync": sync,
        "auto": auto,
        "cost_ratio": ratio,
        "met": not sync["problems"] and not auto["problems"],
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "[bold red]NO[/]"


def _once_cell(x: dict[str, Any]) -> str:
    if answered_once(x):
        return "yes"
    return (
        f"[bold red]NO[/] ({x['missing_ids']} missing, {x['doubled_ids']} doubled, "
        f"{x['unknown_ids']} unknown, {x['charged_twice']} charged twice)"
    )


def _chunks(jobs: int) -> int:
    return math.ceil(jobs / CHUNK)


def _callbacks_cell(x: dict[str, Any]) -> str:
    text = f"{x['callback_runs']} of {_chunks(x['jobs'])}"
    return text if x["callback_runs"] == _chunks(x["jobs"]) else f"[bold red]{text}[/]"


def table(r: dict[str, Any]) -> Table:
    """Both runs side by side, one measure a row."""
    s, a, ratio = r["sync"], r["auto"], r["cost_ratio"]
    t = Table(
        title=f"provider batches: {r['jobs']:,} jobs over 3 simulated providers, "
        f"{r['turnaround_s']:g} s batch turnaround, deadline {r['deadline_s'] / 3600:g} h"
    )
    t.add_column("measure")
    t.add_column('sync (mode="sync")', justify="right")
    t.add_column(f'auto (mode="auto", deadline_s={r["deadline_s"]:.0f})', justify="right")
    t.add_column("target", justify="left")

    def row(name: str, key: Any, target: str = "") -> None:
        cells = [key(x) if callable(key) else str(x[key]) for x in (s, a)]
        t.add_row(name, *cells, target)

    row("jobs", lambda x: f"{x['jobs']:,}")
    row("succeeded", lambda x: f"{x['succeeded']:,}")
    row("failed", lambda x: f"{x['failed']:,}" if not x["failed"] else f"[bold red]{x['failed']:,}[/]", "0")
    row(
        "wall time (submit → last job final)",
        lambda x: f"{x['wall_s']:.1f} s" + ("" if x["finished"] else " [bold red](bound hit)[/]"),
    )
    row(
        "on time", lambda x: _yes(x["on_time"]), f"yes (≤ {r['deadline_s']:.0f} s, every job by its deadline)"
    )
    row("cost $ (usage report)", lambda x: f"{x['cost_usd']:.4f}")
    ratio_cell = "n/a" if ratio is None else f"{ratio:.3f}"
    if ratio is None or ratio > TARGET_RATIO:
        ratio_cell = f"[bold red]{ratio_cell}[/]"
    t.add_row("cost ratio (auto / sync)", "1.000", ratio_cell, f"≤ {TARGET_RATIO}")
    row("saved $ (usage report)", lambda x: f"{x['saved_usd']:.4f}")
    row("answered via a provider batch (usage report)", lambda x: f"{x['via_batch']:,}")
    row("synchronous calls seen by the simulator", lambda x: f"{x['sim_sync_calls']:,}")
    row("… of them 429s", lambda x: f"{x['sim_429s']:,}")
    row("batch requests seen by the simulator", lambda x: f"{x['sim_batch_requests']:,}")
    row("provider batches created (simulator)", lambda x: f"{x['sim_batches_created']:,}")
    row("every custom_id answered once", _once_cell, "yes")
    row("chord callbacks run (one per chunk of jobs)", _callbacks_cell, "one per chunk (not in the target)")
    row(
        "verdict",
        lambda x: (
            "[green]meets target[/]" if not x["problems"] else "[bold red]" + "; ".join(x["problems"]) + "[/]"
        ),
    )
    return t


def summary_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The rows `python -m bench` prints."""
    s, a, ratio = r["sync"], r["auto"], r["cost_ratio"]
    area = "provider-batches"
    verdict = "met" if r["met"] else "MISSED: " + "; ".join(s["problems"] + a["problems"])
    return [
        (
            area,
            f"{r['jobs']:,} jobs, 3 providers, {r['turnaround_s']:g} s turnaround: cost auto / sync",
            f"${a['cost_usd']:.4f} / ${s['cost_usd']:.4f} = "
            + ("n/a" if ratio is None else f"{ratio:.3f}")
            + f" (target ≤ {TARGET_RATIO}: {verdict})",
        ),
        (
            area,
            "wall time sync · auto (deadline 2 h) · auto on time",
            f"{s['wall_s']:.1f}s · {a['wall_s']:.1f}s · {'yes' if a['on_time'] else 'NO'}",
        ),
        (
            area,
            "auto: sync calls · batch requests · provider batches (simulator)",
            f"{a['sim_sync_calls']:,} · {a['sim_batch_requests']:,} · {a['sim_batches_created']:,}",
        ),
        (
            area,
            "every custom_id answered once (sync · auto)",
            f"{'yes' if answered_once(s) else 'NO'} · {'yes' if answered_once(a) else 'NO'}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provider_batches")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per run (default 1000)")
    parser.add_argument(
        "--turnaround-s", type=float, default=30.0, help="simulated provider batch turnaround (default 30)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(tmp), jobs=args.jobs, turnaround_s=args.turnaround_s)
    console = Console(width=160)
    console.print(table(r))
    console.print(f"both runs, stacks included: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
