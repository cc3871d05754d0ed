"""Limiter decisions per second on one Redis: acquire + settle pairs from many threads."""

from __future__ import annotations

import threading
import time

import redis

from workers.config import Candidate, parse_settings
from workers.keys import KeyRing
from workers.keyspace import Keyspace
from workers.limiter import Costs, Lease, Limiter

CONFIG = """
[providers.p]
api = "openai"
base_url = "http://127.0.0.1:1/v1"
key_env = "K"
limits = { rpm = 100000000, tpm = 1000000000, rpd = 1000000000, concurrency = 100000 }
[providers.p.models.m]
limits = { tpm = 1000000000 }
[routes."*"]
free = ["p:m"]
"""


def run(redis_url: str, *, threads: int = 8, seconds: float = 3.0) -> dict[str, float]:
    settings = parse_settings(CONFIG, "bench.toml")
    env = {"K": "k0", "K_1": "k1", "K_2": "k2"}  # three keys: acquire picks among three accounts
    limiter = Limiter(
        redis.Redis.from_url(redis_url), settings, KeyRing(settings, env, quiet=True), keys=Keyspace("bench")
    )
    candidate, costs = Candidate("p", "m"), Costs.estimate(200, 300)
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        while time.monotonic() < stop:
            lease = limiter.acquire(candidate, costs, lease_ttl_s=60)
            assert isinstance(lease, Lease)
            limiter.settle(lease, actual=Costs(1, 300, 200, 100), outcome="alive")
            counts[i] += 2

    started = time.monotonic()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    latency = []
    for _ in range(200):
        t = time.perf_counter()
        lease = limiter.acquire(candidate, costs, lease_ttl_s=60)
        latency.append(time.perf_counter() - t)
        limiter.settle(lease, actual=Costs(1), outcome="alive")
    latency.sort()
    return {
        "decisions_per_s": sum(counts) / elapsed,
        "acquire_p50_ms": latency[100] * 1000,
        "acquire_p99_ms": latency[198] * 1000,
    }
