"""Waiting once: a batch bound by one provider's requests per minute. How many times was a
job published again (Celery retries, as Flower counts them) against how many had to wait at
all, the makespan against the minimum, and the 429s."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import stack_from, wait_all_final
from bench.events import EventCounter
from bench.makespan import theoretical_min_s

CONFIG = """
[spillway]
default_max_tokens = 32
[providers.solo]
api = "openai"
base_url = "https://solo.example/v1"
key_env = "SOLO_KEY"
limits = {{ rpm = {rpm}, tpm = 100000000, concurrency = 64 }}
[providers.solo.models.s1]
[routes.batch]
free = ["solo:s1"]
[simulator]
seed = 5
latency_ms = {{ median = 50, p95 = 80 }}
"""


def run(workdir: Path, *, jobs: int = 90, rpm: int = 60, threads: int = 16) -> dict[str, float]:
    stack = stack_from(CONFIG.format(rpm=rpm), workdir)
    stack.start()
    try:
        stack.start_worker(concurrency=threads, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client, EventCounter(client.app) as events:
            started = time.monotonic()
            for i in range(jobs):
                client.submit(f"item {i}", task="batch", tier="free")
            finished = wait_all_final(client.runtime.store, jobs, timeout_s=600)
            time.sleep(1.0)  # the last events are on their way
        stats = stack.simulator_stats()
    finally:
        stack.close()
    ideal = theoretical_min_s(jobs, [rpm], 0.05)
    return {
        "jobs": jobs,
        "rpm": rpm,
        "had_to_wait": max(0, jobs - rpm) / jobs,  # the bucket starts full: the rest wait
        "retries_per_job": events.counts["task-retried"] / jobs,
        "received_per_job": events.counts["task-received"] / jobs,
        "makespan_s": finished - started,
        "theoretical_min_s": ideal,
        "rate_limited_429s": sum(s.get("rate_limited", 0) for s in stats.values()),
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(run(Path(tmp)))
