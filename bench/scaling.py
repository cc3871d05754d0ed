"""Scaling out: N worker processes and N producer processes, Spillway against plain Celery
making the same HTTP call on the same broker, on SQLite and on PostgreSQL.

Per N and store: jobs/s from the first submit to the last result stored (plain Celery: to
the last result its producers read back), the ratio to plain Celery, worker CPU ms per job
(every process of the worker tree), the machine's CPU ms per job (every process: producers,
workers, Redis, the simulator and the database server — when the cores are the limit, the
ratio follows it) and the PostgreSQL server's share of it, Redis commands per job (`INFO
commandstats`, every process together), the CPU of the Redis server and of the producers
per job, and republishes per job (Celery retries, as Flower counts them). The
simulator answers in 50 ms and its limits are far above the load: what is measured is the
queue, not the providers. `python -m bench.scaling --workers 1,2,4`; on a machine with many
cores give it more. `--repeat K` runs K pairs (Spillway and plain Celery back to back) per
row and prints medians: on a shared machine one pair's ratio swings by ±0.2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench import overhead
from bench.common import cpu_s, machine_busy_s, named_cpu_s, spent_since, stack_from, wait_all_final
from bench.events import EventCounter
from producer.ops.stack import LocalStack
from workers.celery import make_app
from workers.env import Env

CONFIG = overhead.CONFIG  # one provider far above the load, 50 ms calls
PG_URL = os.environ.get("SPILLWAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def run(
    workdir: Path,
    *,
    workers: list[int],
    stores: list[str],
    jobs_per_worker: int = 300,
    threads: int = 16,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Per store and N, `repeat` pairs of runs — Spillway and plain Celery one right after
    the other, so both see the same moment of a shared machine — and the median of each
    measure (the ratio: the median of the pairs' ratios, and their range)."""
    rows = []
    for store in stores:
        for n in workers:
            jobs = jobs_per_worker * n
            pairs = []
            for k in range(repeat):
                pair = {}
                for plain in (False, True) if k % 2 == 0 else (True, False):  # neither always first
                    name = f"{'plain' if plain else 'spillway'}-{store}-{n}-{k}"
                    pair[plain] = _one(
                        workdir / name, "sqlite" if plain else store, n, jobs, threads, plain=plain
                    )
                pairs.append((pair[False], pair[True]))
            ratios = [s["jobs_per_s"] / p["jobs_per_s"] for s, p in pairs]

            def median(who: int, measure: str, pairs: list[Any] = pairs) -> float:
                return statistics.median(pair[who][measure] for pair in pairs)

            rows.append(
                {
                    "store": store,
                    "workers": n,
                    "jobs": jobs,
                    "runs": repeat,
                    "ratio": statistics.median(ratios),
                    "ratio_range": (min(ratios), max(ratios)),
                    **{f"spillway_{m}": median(0, m) for m in MEASURES},
                    **{f"plain_{m}": median(1, m) for m in MEASURES},
                }
            )
    return rows


#: What `_one` measures of a run.
MEASURES = (
    "jobs_per_s",
    "cpu_ms_per_job",
    "machine_cpu_ms_per_job",
    "database_cpu_ms_per_job",
    "redis_cpu_ms_per_job",
    "producer_cpu_ms_per_job",
    "redis_commands_per_job",
    "republishes_per_job",
)


def _one(workdir: Path, store: str, n: int, jobs: int, threads: int, *, plain: bool) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    extra, database_url = {}, None
    if store == "postgresql":
        database_url = PG_URL
        extra["SPILLWAY_DATABASE_SCHEMA"] = f"bench_{uuid.uuid4().hex[:8]}"
    stack = stack_from(CONFIG, workdir, database_url=database_url, extra_env=extra)
    stack.start()
    try:
        client = stack.client()
        client.runtime  # noqa: B018 - the store's tables exist before any worker starts
        if plain:
            procs = [_start_plain_worker(stack, threads, i) for i in range(n)]
            _wait_plain(stack, n)
        else:
            procs = [stack.start_worker(concurrency=threads, loglevel="WARNING") for _ in range(n)]
            stack.wait_for_workers(n)
        counts = _redis_calls(stack)
        cpu = cpu_s(procs)
        per = [jobs // n + (1 if i < jobs % n else 0) for i in range(n)]
        with EventCounter(client.app) as events:
            producers = [_start_producer(stack, k, i, plain) for i, k in enumerate(per)]
            for p in producers:
                p.stdout.readline()  # "ready"
            # read before the clock starts: a scan of every process is not the run's time
            postgres = store == "postgresql"
            database = named_cpu_s("postgres") if postgres else {}
            redis_server = named_cpu_s("redis-server")
            busy, started = machine_busy_s(), time.monotonic()
            for p in producers:
                p.stdin.write("go\n")
                p.stdin.flush()
            if plain:
                for p in producers:
                    p.wait(600)
                finished = time.monotonic()
            else:
                finished = wait_all_final(client.runtime.store, jobs, timeout_s=600)
            busy = machine_busy_s() - busy
            database_s = spent_since(database, named_cpu_s("postgres")) if postgres else 0.0
            redis_s = spent_since(redis_server, named_cpu_s("redis-server"))
            producers_s = 0.0
            for p in producers:
                out, _ = p.communicate(timeout=60)  # "done <its CPU seconds>"
                producers_s += float(out.split()[-1])
            cpu = cpu_s(procs) - cpu
            counts = _redis_calls(stack) - counts
            time.sleep(1.0)  # the last events are on their way
        return {
            "jobs_per_s": jobs / (finished - started),
            "cpu_ms_per_job": cpu * 1000 / jobs,
            "machine_cpu_ms_per_job": busy * 1000 / jobs,
            "database_cpu_ms_per_job": database_s * 1000 / jobs,
            "redis_cpu_ms_per_job": redis_s * 1000 / jobs,
            "producer_cpu_ms_per_job": producers_s * 1000 / jobs,
            "redis_commands_per_job": counts / jobs,
            "republishes_per_job": events.counts["task-retried"] / jobs,
        }
    finally:
        stack.close()  # its workers too
        for proc in locals().get("procs", []):
            _stop(proc)
        if store == "postgresql":
            _drop_schema(extra["SPILLWAY_DATABASE_SCHEMA"])


def _start_plain_worker(stack: LocalStack, threads: int, i: int) -> subprocess.Popen[bytes]:
    log = open(stack.workdir / f"plain-worker{i}.log", "w")  # noqa: SIM115 - the process keeps it
    argv = [sys.executable, "-m", "celery", "-A", "bench.plain_app", "worker", "-P", "threads"]
    argv += ["-c", str(threads), "-Q", "plain", "-l", "WARNING", "-n", f"plain{i}-{os.getpid()}@%h"]
    return subprocess.Popen(
        argv, env={**os.environ, **stack.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _wait_plain(stack: LocalStack, n: int) -> None:
    app = make_app(Env.overlaid(stack.env))  # a fresh app on this stack's broker, just to ping
    try:
        deadline = time.monotonic() + 60
        while len(app.control.ping(timeout=0.5)) < n and time.monotonic() < deadline:
            pass
    finally:
        app.close()


def _start_producer(stack: LocalStack, jobs: int, i: int, plain: bool) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.submitter", "--jobs", str(jobs), "--name", f"p{i}"]
    if plain:
        argv += ["--plain", f"{stack.simulator_url}/fast/v1/chat/completions", stack.env["FAST_KEY"]]
    return subprocess.Popen(
        argv,
        env={**os.environ, **stack.env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _redis_calls(stack: LocalStack) -> int:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for v in stats.values())


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)


def _drop_schema(schema: str) -> None:
    import sqlalchemy  # the benchmark's own clean-up, outside the store

    engine = sqlalchemy.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def main() -> None:
    import tempfile

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts (default 1,2,4)")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--jobs-per-worker", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs per row (medians)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(
            Path(tmp),
            workers=[int(n) for n in args.workers.split(",")],
            stores=args.stores.split(","),
            jobs_per_worker=args.jobs_per_worker,
            repeat=args.repeat,
        )
    title = f"scaling on {os.cpu_count()} cores (50 ms calls, limits far above the load"
    title += f"; medians of {args.repeat} pairs of runs)" if args.repeat > 1 else ")"
    table = Table(title=title + "; in brackets: plain Celery")
    for column in (
        "store",
        "N",
        "jobs",
        "Spillway jobs/s",
        "plain jobs/s",
        "ratio",
        "worker CPU ms/job",
        "machine CPU ms/job",
        "PostgreSQL server",
        "Redis server",
        "producers",
        "Redis cmds/job",
        "republishes/job",
    ):
        table.add_column(column, justify="left" if column == "store" else "right")
    for r in rows:

        def both(measure: str, r: dict[str, Any] = r) -> str:
            return f"{r[f'spillway_{measure}']:.1f} ({r[f'plain_{measure}']:.1f})"

        low, high = r["ratio_range"]
        table.add_row(
            r["store"],
            str(r["workers"]),
            str(r["jobs"]),
            f"{r['spillway_jobs_per_s']:.0f}",
            f"{r['plain_jobs_per_s']:.0f}",
            f"{r['ratio']:.2f}" + (f" ({low:.2f}–{high:.2f})" if r["runs"] > 1 else ""),
            both("cpu_ms_per_job"),
            both("machine_cpu_ms_per_job"),
            f"{r['spillway_database_cpu_ms_per_job']:.1f}" if r["store"] == "postgresql" else "-",
            both("redis_cpu_ms_per_job"),
            both("producer_cpu_ms_per_job"),
            both("redis_commands_per_job"),
            f"{r['spillway_republishes_per_job']:.2f}",
        )
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
