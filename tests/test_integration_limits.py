"""The limiter through real workers and the simulator: limits kept, limits learned, outages
routed around."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from producer.client import default_client
from producer.ops.stack import LocalStack
from workers.config import Candidate

pytestmark = pytest.mark.integration

CONFIG = """
[spillway]
default_max_tokens = 32
inline_wait_s = 2.0
max_countdown_s = 20

[providers.alpha]
api = "openai"
base_url = "https://alpha.example/v1"
key_env = "ALPHA_KEY"
timeout_s = 5
limits = {{ rpm = 120, tpm = 60000, concurrency = 8 }}
circuit = {{ failures = 3, cooldown_s = 300 }}
[providers.alpha.models.a1]
input_per_mtok = 1.0
output_per_mtok = 1.0

[providers.beta]
api = "anthropic"
base_url = "https://beta.example"
key_env = "BETA_KEY"
timeout_s = 5
limits = {{ rpm = 60, itpm = 60000, otpm = 20000, concurrency = 8 }}
[providers.beta.models.b1]
input_per_mtok = 2.0
output_per_mtok = 2.0

[routes.work]
strategy = "fastest"
free = ["alpha:a1", "beta:b1"]

[simulator]
seed = 5
latency_ms = {{ median = 20, p95 = 40 }}
{simulator}
"""


def run_jobs(
    tmp_path: Path,
    redis_url: str,
    count: int,
    simulator: str = "",
    faults: dict | None = None,
    timeout_s: float = 120,
) -> tuple[LocalStack, dict, dict, float]:
    config = tmp_path / "limits.toml"
    config.write_text(CONFIG.format(simulator=simulator))
    stack = LocalStack(config, redis_url=redis_url, workdir=str(tmp_path))
    stack.start()
    for provider, fault in (faults or {}).items():
        stack.set_faults(provider, fault)
    stack.start_worker(concurrency=24, loglevel="WARNING")
    stack.wait_for_workers()
    with stack.applied():
        from producer import submit

        started = time.monotonic()
        ids = [submit(f"job {i}: say something", task="work", tier="free").id for i in range(count)]
        store = default_client().runtime.store
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = store.count_by_status()
            if counts.get("succeeded", 0) + counts.get("failed", 0) >= count:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        jobs = store.jobs(ids)
    return stack, store.count_by_status(), {j.id: j for j in jobs.values()}, elapsed


def test_limits_that_match_the_provider_mean_zero_429s(tmp_path, redis_server) -> None:
    stack, counts, jobs, elapsed = run_jobs(tmp_path, redis_server.url(6), 200)
    try:
        stats = stack.simulator_stats()
    finally:
        stack.close()
    assert counts == {"succeeded": 200}
    assert stats["alpha"].get("rate_limited", 0) == 0 and stats["beta"].get("rate_limited", 0) == 0
    used = {p: sum(1 for j in jobs.values() if j.provider == p) for p in ("alpha", "beta")}
    assert used["alpha"] > used["beta"] > 40  # both quotas used, alpha's (twice as large) more
    # 180 requests at once, then 3 a second: the last 20 need about 7 s
    assert elapsed < 60


def test_a_provider_limit_lower_than_configured_is_learned(tmp_path, redis_server) -> None:
    lower = "[simulator.providers.alpha]\nlimits = { rpm = 60, tpm = 60000, concurrency = 8 }"
    # configured 120 + 60 a minute, really 60 + 60: alpha gets more than it can take at first
    stack, counts, _, _ = run_jobs(tmp_path, redis_server.url(7), 150, simulator=lower)
    try:
        stats = stack.simulator_stats()
        with stack.applied():
            from workers.store import Attempt

            with default_client().runtime.store.session() as s:
                limited = s.query(Attempt.started_at).filter(Attempt.outcome == "rate_limited").all()
    finally:
        stack.close()
    assert counts == {"succeeded": 150}
    assert stats["alpha"].get("rate_limited", 0) <= 10  # a few at first…
    if limited:
        first, last = min(t for (t,) in limited), max(t for (t,) in limited)
        assert (last - first).total_seconds() < 10  # …then they stop


def test_a_failing_provider_opens_its_circuit_and_work_finishes_elsewhere(tmp_path, redis_server) -> None:
    stack, counts, jobs, _ = run_jobs(tmp_path, redis_server.url(8), 60, faults={"alpha": {"error_500": 1.0}})
    try:
        stats = stack.simulator_stats()
    finally:
        stack.close()
    assert counts == {"succeeded": 60}
    assert {j.provider for j in jobs.values()} == {"beta"}
    # three failures open the circuit; calls already admitted when it opened may fail too
    assert 3 <= stats["alpha"].get("fault_error_500", 0) <= 3 + 24


def test_a_job_past_the_daily_quota_is_parked_with_its_chord_slot(tmp_path, redis_server) -> None:
    config = tmp_path / "daily.toml"
    config.write_text(
        CONFIG.format(simulator="")
        .replace("limits = { rpm = 120, tpm = 60000, concurrency = 8 }", "limits = { rpm = 120, rpd = 1 }")
        .replace('free = ["alpha:a1", "beta:b1"]', 'free = ["alpha:a1"]')
    )
    with LocalStack(config, redis_url=redis_server.url(10), workdir=str(tmp_path)) as stack:
        stack.start_worker(concurrency=4, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit
            from workers import parking

            first = submit("the day's one request", task="work", tier="free").wait(60)
            second = submit("one too many", task="work", tier="free")
            deadline = time.monotonic() + 30
            while (
                default_client().runtime.store.job(second.id).status != "parked"
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)
            parked = parking.parked_job_ids(default_client().runtime.redis, default_client().runtime.keys)
            [(member, due)] = default_client().runtime.redis.zrange(
                default_client().runtime.keys.parked(), 0, -1, withscores=True
            )
            now = default_client().runtime.limiter.now_s()
    assert first.status == "succeeded"
    assert parked == {second.id}
    midnight = (int(now) // 86400 + 1) * 86400
    assert due == pytest.approx(midnight, abs=2)
    signature = __import__("json").loads(member)["signature"]
    assert signature["options"]["task_id"] == second.id and signature["options"]["queue"] == "llm.alpha"


QUIET = """
[spillway]
default_max_tokens = 32
[providers.quiet]
api = "openai"
signals = "none"               # no x-ratelimit-* headers: only a 429 and its retry-after
base_url = "https://quiet.example/v1"
key_env = "QUIET_KEY"
timeout_s = 5
limits = { rpm = 120, tpm = 1000000 }
[providers.quiet.models.q1]
[routes.work]
free = ["quiet:q1"]
[simulator]
seed = 6
latency_ms = { median = 20, p95 = 40 }
[simulator.providers.quiet]
limits = { rpm = 60, tpm = 1000000 }   # really half what is configured
"""


def test_a_provider_without_headers_teaches_a_lower_limit_by_its_429s(tmp_path, redis_server) -> None:
    config = tmp_path / "quiet.toml"
    config.write_text(QUIET)
    url = redis_server.url(10)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(config, redis_url=url, workdir=str(tmp_path))
    stack.start()
    try:
        stack.start_worker(concurrency=8, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            ids = [client.submit(f"job {i}", task="work", tier="free").id for i in range(90)]
            store = client.runtime.store
            deadline = time.monotonic() + 150
            while store.count_by_status().get("succeeded", 0) < 90 and time.monotonic() < deadline:
                time.sleep(0.5)
            counts = store.count_by_status()
            status = client.runtime.limiter.snapshots([Candidate("quiet", "q1")])
        stats = stack.simulator_stats()
    finally:
        stack.close()
    assert counts == {"succeeded": 90} and len(ids) == 90
    rpm = next(b for b in status[Candidate("quiet", "q1")].accounts[0].buckets if b.spec.field == "rpm")
    assert rpm.cap < 120  # it learned a lower limit than the configured one…
    assert stats["quiet"].get("rate_limited", 0) <= 10  # …after a handful of 429s (2–7 here; 18 of 60 before)
