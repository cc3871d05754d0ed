"""Spillway's submit-to-result path against a plain Celery task making the same HTTP call to
the same simulator, on the same broker and the same threads pool (jobs per second)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import stack_from, wait_all_final
from producer import submit
from producer.client import default_client

CONFIG = """
[providers.fast]
api = "openai"
base_url = "https://fast.example/v1"
key_env = "FAST_KEY"
timeout_s = 30
limits = { rpm = 10000000, tpm = 1000000000, concurrency = 1000 }
[providers.fast.models.f1]
[routes."*"]
free = ["fast:f1"]
[simulator]
seed = 2
latency_ms = { median = 50, p95 = 80 }
"""


def run(workdir: Path, *, jobs: int = 600, threads: int = 32) -> dict[str, float]:
    stack = stack_from(CONFIG, workdir)
    stack.start()
    try:
        spillway = _spillway(stack, jobs, threads)
        plain = _plain(stack, jobs, threads)
    finally:
        stack.close()
    return {"spillway_jobs_per_s": spillway, "plain_jobs_per_s": plain, "ratio": spillway / plain}


def _spillway(stack, jobs: int, threads: int) -> float:
    stack.start_worker(concurrency=threads, loglevel="WARNING")
    stack.wait_for_workers()
    with stack.applied():
        started = time.monotonic()
        for i in range(jobs):
            submit(f"bench job {i}", task="bench", tier="free", max_tokens=32)
        finished = wait_all_final(default_client().runtime.store, jobs, timeout_s=300)
    for worker in list(stack.workers):
        stack.kill_worker(worker, sig=15)
    stack.workers.clear()
    return jobs / (finished - started)


def _plain(stack, jobs: int, threads: int) -> float:
    env = {**os.environ, **stack.env}
    log = open(stack.workdir / "plain-worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.plain_app",
            "worker",
            "-P",
            "threads",
            "-c",
            str(threads),
            "-Q",
            "plain",
            "-l",
            "WARNING",
            "-n",
            f"plain-{os.getpid()}@%h",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with stack.applied():
            # Imported here: the plain app becomes Celery's current app, after Spillway's.
            from bench.plain_app import app, plain_call

            app.conf.broker_url = stack.env["CELERY_BROKER_URL"]
            app.conf.result_backend = stack.env["CELERY_RESULT_BACKEND"]
            deadline = time.monotonic() + 60
            while not app.control.ping(timeout=0.5) and time.monotonic() < deadline:
                pass
            url = f"{stack.simulator_url}/fast/v1/chat/completions"
            key = stack.env["FAST_KEY"]
            started = time.monotonic()
            results = [
                plain_call.apply_async(
                    args=[
                        url,
                        {
                            "model": "f1",
                            "messages": [{"role": "user", "content": f"bench job {i}"}],
                            "max_tokens": 32,
                        },
                        key,
                    ],
                    queue="plain",
                )
                for i in range(jobs)
            ]
            for result in results:
                result.get(timeout=300)
            finished = time.monotonic()
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
    return jobs / (finished - started)
