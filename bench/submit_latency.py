"""How long `producer.submit` takes a web backend: stored and published, p50 and p99."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import stack_from
from bench.overhead import CONFIG
from producer import submit


def run(workdir: Path, *, jobs: int = 1000) -> dict[str, float]:
    stack = stack_from(CONFIG, workdir)
    stack.start(simulator=False)  # nobody consumes: only the producer's side is measured
    try:
        with stack.applied():
            submit("warm up", task="bench", tier="free")
            took = []
            for i in range(jobs):
                started = time.perf_counter()
                submit(f"web request {i}", task="bench", tier="free", max_tokens=64)
                took.append(time.perf_counter() - started)
    finally:
        stack.close()
    took.sort()
    return {
        "p50_ms": took[len(took) // 2] * 1000,
        "p99_ms": took[int(len(took) * 0.99)] * 1000,
        "per_s": jobs / sum(took),
    }
