"""The limiter on one Redis against a three-master Redis Cluster: decisions per second
(acquire + settle) from several client processes over three providers, and the Redis CPU
each decision costs on the busiest node — what bounds one Redis, and what the cluster
spreads (each provider's keys share a hash tag: one slot, one node).

`python -m bench.cluster` (it starts its own Redis and cluster)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import redis

from workers.config import Candidate, parse_settings
from workers.embedded import start_cluster, start_redis
from workers.keys import KeyRing
from workers.keyspace import Keyspace
from workers.limiter import Costs, Lease, Limiter
from workers.redisconn import connect

#: Their hash tags fall in three different masters' slot ranges (0, 1 and 2 of three).
PROVIDERS = ("b", "c", "a")
CONFIG = (
    "\n".join(
        f"""[providers.{p}]
api = "openai"
base_url = "https://{p}.example/v1"
key_env = "K_{p}"
limits = {{ rpm = 100000000, tpm = 1000000000, rpd = 1000000000 }}
[providers.{p}.models.m]"""
        for p in PROVIDERS
    )
    + '\n[routes."*"]\nfree = ["a:m"]\n'
)


def _drive(url: str, seconds: float, threads: int, out: Any) -> None:
    settings = parse_settings(CONFIG, "bench.toml")
    env = {f"K_{p}": f"key-{p}" for p in PROVIDERS}
    limiter = Limiter(connect(url), settings, KeyRing(settings, env, quiet=True), keys=Keyspace("bench"))
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        candidate = Candidate(PROVIDERS[i % len(PROVIDERS)], "m")
        while time.monotonic() < stop:
            lease = limiter.acquire(candidate, Costs.estimate(200, 300), lease_ttl_s=60)
            assert isinstance(lease, Lease)
            limiter.settle(lease, actual=Costs(1, 300, 200, 100), outcome="alive")
            counts[i] += 2

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(sum(counts))


def _cpu_s(ports: list[int]) -> list[float]:
    cpu = []
    for port in ports:
        info = redis.Redis(port=port).info("cpu")
        cpu.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return cpu


def measure(
    url: str, ports: list[int], *, processes: int = 3, threads: int = 4, seconds: float = 4.0
) -> dict:
    queue: Any = multiprocessing.get_context("spawn").Queue()
    ctx = multiprocessing.get_context("spawn")
    before = _cpu_s(ports)
    started = time.monotonic()
    procs = [ctx.Process(target=_drive, args=(url, seconds, threads, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    decisions = sum(queue.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(30)
    elapsed = time.monotonic() - started
    busiest = max(after - b for after, b in zip(_cpu_s(ports), before, strict=True))
    return {
        "decisions_per_s": decisions / seconds,
        "elapsed_s": elapsed,
        "busiest_node_us_per_decision": busiest * 1e6 / decisions,
        "capacity_per_s": decisions / busiest if busiest else float("inf"),
    }


def main() -> None:
    single = start_redis()
    cluster = start_cluster(3)
    try:
        one = measure(single.url(0), [int(single.address.rsplit(":", 1)[1])])
        many = measure(cluster.url(), cluster.ports)
    finally:
        single.stop()
        cluster.stop()
    for name, r in (("one Redis", one), ("cluster of 3", many)):
        print(
            f"{name:<14} {r['decisions_per_s']:>8,.0f} decisions/s   busiest Redis "
            f"{r['busiest_node_us_per_decision']:.0f} µs CPU a decision -> saturates at "
            f"{r['capacity_per_s']:,.0f}/s"
        )


if __name__ == "__main__":
    main()
