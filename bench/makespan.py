"""A batch over simulated providers with known limits: how close the makespan comes to the
theoretical minimum those limits allow, and how many 429s it took."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import stack_from, wait_all_final
from bench.events import EventCounter
from producer import submit
from producer.client import default_client

CONFIG = """
[spillway]
default_max_tokens = 32
[providers.alpha]
api = "openai"
base_url = "https://alpha.example/v1"
key_env = "ALPHA_KEY"
limits = {{ rpm = {alpha_rpm}, tpm = 100000000, concurrency = 64 }}
[providers.alpha.models.a1]
[providers.beta]
api = "anthropic"
base_url = "https://beta.example"
key_env = "BETA_KEY"
limits = {{ rpm = {beta_rpm}, itpm = 100000000, otpm = 100000000, concurrency = 64 }}
[providers.beta.models.b1]
[routes.batch]
strategy = "fastest"
free = ["alpha:a1", "beta:b1"]
[simulator]
seed = 4
latency_ms = {{ median = {latency_ms}, p95 = {p95_ms} }}
"""


def theoretical_min_s(jobs: int, rpms: list[int], latency_s: float) -> float:
    """Both buckets start full; after that requests come back at the summed refill rate."""
    burst, rate = sum(rpms), sum(rpms) / 60
    return max(0.0, jobs - burst) / rate + latency_s


def run(
    workdir: Path,
    *,
    jobs: int = 1350,
    alpha_rpm: int = 600,
    beta_rpm: int = 300,
    latency_ms: int = 50,
    threads: int = 64,
    worker_processes: int = 1,
) -> dict[str, float]:
    """`threads` in all, shared by `worker_processes` worker processes."""
    text = CONFIG.format(
        alpha_rpm=alpha_rpm, beta_rpm=beta_rpm, latency_ms=latency_ms, p95_ms=int(latency_ms * 1.6)
    )
    stack = stack_from(text, workdir)
    stack.start()
    try:
        for _ in range(worker_processes):
            stack.start_worker(concurrency=max(4, threads // worker_processes), loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client, EventCounter(client.app) as events:
            started = time.monotonic()
            for i in range(jobs):
                submit(f"batch item {i}", task="batch", tier="free")
            submitted = time.monotonic()
            finished = wait_all_final(default_client().runtime.store, jobs, timeout_s=600)
            split = default_client().runtime.store.count_by_status()
            time.sleep(1.0)  # the last events are on their way
        stats = stack.simulator_stats()
    finally:
        stack.close()
    ideal = theoretical_min_s(jobs, [alpha_rpm, beta_rpm], latency_ms / 1000)
    makespan = finished - started
    return {
        "jobs": jobs,
        "worker_processes": worker_processes,
        "makespan_s": makespan,
        "theoretical_min_s": ideal,
        "ratio": makespan / ideal,
        "submit_s": submitted - started,
        "rate_limited_429s": sum(s.get("rate_limited", 0) for s in stats.values()),
        "alpha_share": stats["alpha"].get("ok", 0) / jobs,
        "succeeded": split.get("succeeded", 0),
        "retries_per_job": events.counts["task-retried"] / jobs,
        "received_per_job": events.counts["task-received"] / jobs,
    }


def main() -> None:
    """`python -m bench.makespan --workers 1,8`: the same batch with each number of worker
    processes, side by side."""
    import argparse
    import tempfile

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m bench.makespan")
    parser.add_argument("--workers", default="1,8", help="worker process counts (default 1,8)")
    parser.add_argument("--jobs", type=int, default=1350)
    parser.add_argument("--rpm", default="600,300", help="the two providers' requests/min")
    args = parser.parse_args()
    alpha_rpm, beta_rpm = (int(r) for r in args.rpm.split(","))
    table = Table(title=f"{args.jobs} jobs over two providers ({alpha_rpm} + {beta_rpm} requests/min)")
    columns = ("workers", "makespan", "minimum", "ratio", "429s", "larger provider", "republishes/job")
    for column in columns:
        table.add_column(column, justify="right")
    for n in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(Path(tmp), jobs=args.jobs, alpha_rpm=alpha_rpm, beta_rpm=beta_rpm, worker_processes=n)
        table.add_row(
            str(n),
            f"{r['makespan_s']:.1f} s",
            f"{r['theoretical_min_s']:.1f} s",
            f"{r['ratio']:.3f}",
            str(r["rate_limited_429s"]),
            f"{r['alpha_share']:.2f}",
            f"{r['retries_per_job']:.2f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
