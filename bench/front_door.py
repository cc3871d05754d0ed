"""What `spillway serve`'s `/v1/chat/completions` adds over calling the provider directly.

Open loop: requests leave at a fixed rate whatever the answers do (a closed loop would hide
queueing). Phase 1, quota free: the same chat completion at `rate` requests/s to the simulator
directly and through the front door (submit, queue, worker, provider, store, answer); the
difference of the latency percentiles is what Spillway adds. Phase 2, overload: `burst_rate`
requests/s offered to a provider whose limit is far lower — every request must be answered
(queued, not failed) while a probe of `GET /v1/models` shows the server still answers.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import stack_from

TOKEN = "sk-bench-front-door"
CONFIG = """
[spillway]
default_max_tokens = 16

[providers.fast]
api = "openai"
base_url = "https://fast.example/v1"
key_env = "FAST_KEY"
timeout_s = 30
limits = { rpm = 10000000, tpm = 1000000000, concurrency = 1000 }
[providers.fast.models.f1]

[providers.capped]
api = "openai"
base_url = "https://capped.example/v1"
key_env = "CAPPED_KEY"
timeout_s = 30
limits = { rpm = 1200 }  # a burst of 1,200, then 20 requests/s
[providers.capped.models.c1]

[routes.free]
free = ["fast:f1"]
[routes.capped]
free = ["capped:c1"]

[simulator]
seed = 3
latency_ms = { median = 20, p95 = 30 }
"""
BODY = {"messages": [{"role": "user", "content": "How long is a minute?"}], "max_tokens": 16}


def run(
    workdir: Path, *, rate: float = 100, seconds: float = 10, burst_rate: float = 1000, burst_s: float = 3
) -> dict[str, Any]:
    stack = stack_from(CONFIG, workdir, extra_env={"SPILLWAY_API_TOKEN": TOKEN})
    stack.start()
    try:
        stack.start_worker(concurrency=128, loglevel="WARNING")
        stack.wait_for_workers()
        front = stack.start_service(["serve"], "/v1/models")
        key = next(v for k, v in stack.env.items() if k.startswith("FAST_KEY"))
        direct = asyncio.run(
            _offer(
                f"{stack.simulator_url}/fast/v1/chat/completions", key, {**BODY, "model": "f1"}, rate, seconds
            )
        )
        through = asyncio.run(
            _offer(f"{front}/v1/chat/completions", TOKEN, {**BODY, "model": "f1"}, rate, seconds)
        )
        overload = asyncio.run(
            _offer(
                f"{front}/v1/chat/completions",
                TOKEN,
                {**BODY, "model": "spillway/capped"},
                burst_rate,
                burst_s,
                probe=f"{front}/v1/models",
            )
        )
    finally:
        stack.close()
    return {
        "rate": rate,
        "direct": direct,
        "through": through,
        "added_p50_ms": through["p50_ms"] - direct["p50_ms"],
        "added_p99_ms": through["p99_ms"] - direct["p99_ms"],
        "overload": overload,
        "burst_rate": burst_rate,
    }


async def _offer(
    url: str, token: str, body: dict[str, Any], rate: float, seconds: float, probe: str | None = None
) -> dict[str, Any]:
    """Send `rate` requests/s for `seconds` without waiting for answers; their latencies."""
    count = int(rate * seconds)
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=200)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:
        start = time.monotonic()

        async def one(i: int) -> tuple[int, float]:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            sent = time.monotonic()
            try:
                status = (await client.post(url, json=body)).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            return status, (time.monotonic() - sent) * 1000

        probes: list[float] = []

        async def watch() -> None:  # is the server still answering other requests?
            while time.monotonic() - start < seconds + 60:
                sent = time.monotonic()
                await client.get(probe)
                probes.append((time.monotonic() - sent) * 1000)
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch()) if probe else None
        results = await asyncio.gather(*(one(i) for i in range(count)))
        if watcher:
            watcher.cancel()
        took = time.monotonic() - start
    ok = sorted(ms for status, ms in results if status == 200)
    return {
        "offered": count,
        "statuses": dict(collections.Counter(status for status, _ in results)),
        "completed": len(ok),
        "failed": count - len(ok),
        "p50_ms": _pct(ok, 0.50),
        "p95_ms": _pct(ok, 0.95),
        "p99_ms": _pct(ok, 0.99),
        "drained_s": took,
        "probe_p50_ms": statistics.median(probes) if probes else None,
        "probe_max_ms": max(probes) if probes else None,
    }


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
