"""A large batch through `spillway batch` (a real producer process): its peak memory, how fast
it enqueues, and the end-to-end time against the minimum the simulated limits allow."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.common import stack_from
from bench.makespan import theoretical_min_s
from producer.client import default_client

CONFIG = """
[spillway]
default_max_tokens = 32
[providers.alpha]
api = "openai"
base_url = "https://alpha.example/v1"
key_env = "ALPHA_KEY"
limits = {{ rpm = {alpha_rpm}, tpm = 1000000000, concurrency = 64 }}
[providers.alpha.models.a1]
input_per_mtok = 0.5
output_per_mtok = 1.5
[providers.beta]
api = "gemini"
base_url = "https://beta.example/v1beta"
key_env = "BETA_KEY"
limits = {{ rpm = {beta_rpm}, tpm = 1000000000, concurrency = 64 }}
[providers.beta.models.b1]
input_per_mtok = 0.1
output_per_mtok = 0.4
[routes.analysis]
strategy = "fastest"
free = ["alpha:a1", "beta:b1"]
[simulator]
seed = 9
latency_ms = {{ median = 40, p95 = 80 }}
"""


def _peak_rss_mib(proc: subprocess.Popen) -> float:
    """The producer's own peak resident memory, sampled until it exits."""
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, watched.memory_info().rss)
        time.sleep(0.05)
    return peak / 2**20


def run(
    workdir: Path, *, items: int = 10_000, alpha_rpm: int = 1200, beta_rpm: int = 600
) -> dict[str, float]:
    """The limits sit well below what one worker does here (~80 jobs/s on two cores), so the
    limits, not the machine, set the minimum."""
    stack = stack_from(CONFIG.format(alpha_rpm=alpha_rpm, beta_rpm=beta_rpm), workdir)
    source, output = workdir / "in.jsonl", workdir / "out.jsonl"
    with open(source, "w") as out:
        for i in range(items):
            out.write(
                json.dumps(
                    {"custom_id": f"doc-{i:06d}", "prompt": f"Summarise document {i}: " + "lorem " * 40}
                )
                + "\n"
            )
    stack.start()
    try:
        stack.start_worker(concurrency=64, loglevel="WARNING")
        stack.wait_for_workers()
        started = time.monotonic()
        argv = [
            sys.executable,
            "-m",
            "producer.cli",
            "batch",
            str(source),
            "--task",
            "analysis",
            "--tier",
            "free",
            "-o",
            str(output),
        ]
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **stack.env, "COLUMNS": "120"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peak_mib = _peak_rss_mib(proc)
        finished = time.monotonic()
        if proc.returncode != 0:
            raise RuntimeError(f"spillway batch failed: {proc.stderr.read()[-2000:]}")
        with stack.applied():
            first, last = default_client().runtime.store.created_span()
        stats = stack.simulator_stats()
    finally:
        stack.close()
    enqueue_s = (last - first).total_seconds()
    lines = len(output.read_text().splitlines())
    ideal = theoretical_min_s(items, [alpha_rpm, beta_rpm], 0.04)
    return {
        "items": items,
        "output_lines": lines,
        "producer_peak_rss_mib": peak_mib,
        "enqueue_s": enqueue_s,
        "enqueue_per_s": items / enqueue_s if enqueue_s > 0 else float("inf"),
        "end_to_end_s": finished - started,
        "theoretical_min_s": ideal,
        "ratio": (finished - started) / ideal,
        "rate_limited_429s": sum(s.get("rate_limited", 0) for s in stats.values()),
    }
