"""Workers SIGKILLed mid-call: every job ends succeeded or failed, none is lost or stored twice,
each successful call is charged once, the chord callback runs once; a job that kills its
worker every time is failed after a bounded number of redeliveries."""

from __future__ import annotations

import time

import pytest
import redis

from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS
from tests.faultkit import (
    LEDGER,
    Row,
    all_final,
    audit,
    ledger_calls,
    provider_calls,
    size,
    wait_for,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: Dead workers' messages come back within seconds (the visibility timeout stays above the
#: longest call plus the longest countdown of this config).
FAST_RECOVERY = {
    "SPILLWAY_VISIBILITY_TIMEOUT_S": "6",
    "SPILLWAY_UNACKED_RESTORE_S": "1",
    "SPILLWAY_RECOVER_EVERY_S": "3",
    "SPILLWAY_RECOVER_IDLE_S": "8",
}


POLL_S = 0.05  # how often the poison test looks at its job


def make_stack(
    tmp_path, redis_url: str, config_text: str | None = None, *, recovery: dict[str, str] = FAST_RECOVERY
) -> LocalStack:
    """A stack on an emptied Redis database; `recovery={}` keeps every shipped default."""
    config = tmp_path / "faults.toml"
    config.write_text(config_text or (CONFIGS / "faults.toml").read_text())
    redis.Redis.from_url(redis_url).flushdb()
    return LocalStack(config, redis_url=redis_url, workdir=str(tmp_path), extra_env=recovery)


def test_workers_killed_mid_batch_lose_nothing(tmp_path, redis_server) -> None:
    jobs, kills = size(300, 1000), size(3, 6)
    stack = make_stack(tmp_path, redis_server.url(13))
    try:
        stack.start()
        worker = stack.start_worker(concurrency=16, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit_batch
            from producer.client import default_client

            store = default_client().runtime.store
            handle = submit_batch(
                [{"custom_id": f"k{i}", "prompt": f"kill test {i}"} for i in range(jobs)],
                task="work",
                tier="free",
            )
            ids = [j.id for j in store.batch_jobs(handle.id, limit=jobs + 1)]
            step = jobs // (kills + 2)
            for k in range(1, kills + 1):
                wait_for(
                    lambda k=k: handle.progress().done >= k * step,
                    timeout_s=120,
                    what=f"{k * step} of {jobs} jobs done before kill {k}",
                    every_s=0.05,
                )
                stack.kill_worker(worker)  # SIGKILL, calls in flight
                worker = stack.start_worker(concurrency=16, loglevel="WARNING")
            leak_restore_mutex()  # and one of them died restoring the others' messages
            assert wait_until(all_final(store, ids), timeout_s=240), store.count_by_status(handle.id)
            wait_for(
                lambda: store.batch(handle.id).finished_at is not None,
                timeout_s=30,
                what="the batch's chord callback to finish it",
            )
            result, batch = audit(store, ids), store.batch(handle.id)
            seen, (on_ledger, in_doubt) = provider_calls(stack.simulator_stats()), ledger_calls(store, ids)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "worker SIGKILLed mid-batch",
            faults=kills,
            submitted=jobs,
            lost=result.lost,
            charged_twice=result.charged_twice,
            provider_calls=seen,
            ledger_calls=on_ledger,
            in_doubt=in_doubt,
        )
    )
    assert result.lost == 0 and result.charged_twice == 0 and result.ledger_mismatch == 0
    # every call the provider saw is on the ledger, and every call on it beyond those is marked
    # in doubt: a run the SIGKILL cut between its claim and the request.
    # Each kill cuts at most the worker's 16 runs.
    assert on_ledger - in_doubt <= seen <= on_ledger, (seen, on_ledger, in_doubt)
    assert in_doubt <= kills * 16, (in_doubt, kills)
    assert batch.finished_at is not None and batch.summary["total"] == jobs
    assert batch.callback_runs == batch.chords  # one callback per chord, each run once


def leak_restore_mutex() -> None:
    """Leave kombu's restore lock as a worker SIGKILLed while restoring dead workers' messages
    leaves it: taken, never released, expiring after the configured `unacked_mutex_expire`."""
    from producer.client import default_client

    with default_client().app.connection_for_write() as conn:
        channel = conn.default_channel
        lock = channel.client.lock(channel.unacked_mutex_key, timeout=channel.unacked_mutex_expire)
        if lock.acquire(blocking=True, blocking_timeout=10):  # a live worker's hold is short
            return
        # held longer: a worker SIGKILLed just now died holding it, so the fault is in place
        # already, as long as the lock expires on its own like the one this would have leaked
        ttl = channel.client.pttl(channel.unacked_mutex_key)
        assert 0 < ttl <= channel.unacked_mutex_expire * 1000, ttl


def test_a_job_that_kills_its_worker_every_time_is_failed(tmp_path, redis_server) -> None:
    crashes = size(2, 3)
    text = (CONFIGS / "faults.toml").read_text().replace("max_crashes = 3", f"max_crashes = {crashes}")
    stack = make_stack(tmp_path, redis_server.url(14), text)
    kills = 0
    try:
        stack.start()
        worker = stack.start_worker(concurrency=4, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit
            from producer.client import default_client

            store = default_client().runtime.store
            job_id = submit("this prompt takes its worker down", task="poison", tier="free").id
            seen_runs = 0
            deadline = time.monotonic() + 180
            for _ in range(int(180 / POLL_S)):  # bounded in looks and in time
                if time.monotonic() >= deadline:
                    break
                job = store.job(job_id)
                if job.status in ("succeeded", "failed"):
                    break
                if job.status == "running" and job.runs > seen_runs:  # a new run has it: kill that worker
                    seen_runs = job.runs
                    stack.kill_worker(worker)
                    kills += 1
                    worker = stack.start_worker(concurrency=4, loglevel="WARNING")
                time.sleep(POLL_S)  # the poll interval: each new run of the job is seen, and killed
            job = store.job(job_id)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "poison job kills its worker",
            faults=kills,
            submitted=1,
            lost=int(job.status not in ("succeeded", "failed")),
        )
    )
    assert job.status == "failed" and job.error_kind == "poison"
    assert job.error == (
        f"the worker running this job died {crashes} times; it is failed so it cannot take more workers down"
    )
    assert kills == crashes


#: Shipped defaults everywhere (visibility timeout 900 s, a 60 s provider timeout, so a store
#: lease of about 77 s): only the provider is slow, so a killed worker holds running and
#: prefetched jobs.
DEFAULTS_CONFIG = """
[providers.steady]
api = "openai"
base_url = "https://steady.example/v1"
key_env = "STEADY_KEY"
[providers.steady.models.s1]
[routes.work]
free = ["steady:s1"]
[simulator]
seed = 5
[simulator.providers.steady]
latency_ms = { median = 4000, p95 = 4100 }
"""


def test_a_dead_workers_jobs_run_again_within_a_minute_with_defaults(tmp_path, redis_server) -> None:
    stack = make_stack(tmp_path, redis_server.url(12), DEFAULTS_CONFIG, recovery={})  # no overrides
    try:
        stack.start()
        doomed = stack.start_worker(concurrency=4, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            store = client.runtime.store
            ids = [client.submit(f"held job {i}", task="work", tier="free").id for i in range(8)]
            wait_for(
                lambda: sum(store.job(i).status == "running" for i in ids) == 4,
                timeout_s=60,
                what="the first worker to run four jobs",
            )
            time.sleep(1.0)  # and to hold the next ones it prefetched
            running = {i for i in ids if store.job(i).status == "running"}
            stack.kill_worker(doomed)  # SIGKILL: four calls in flight, messages unacked
            killed_at = time.monotonic()
            stack.start_worker(concurrency=4, loglevel="WARNING")

            def again() -> bool:
                jobs = [store.job(i) for i in running]
                return all(j.runs >= 2 or j.status in ("succeeded", "failed") for j in jobs)

            wait_for(again, timeout_s=120, what="the dead worker's running jobs to run again")
            back_after_s = time.monotonic() - killed_at
            assert wait_until(all_final(store, ids), timeout_s=90), store.count_by_status()
            result = audit(store, ids)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            f"worker SIGKILLed, defaults: its jobs ran again after {back_after_s:.0f} s",
            faults=1,
            submitted=len(ids),
            lost=result.lost,
            charged_twice=result.charged_twice,
        )
    )
    assert back_after_s <= 60, f"the dead worker's jobs ran again only after {back_after_s:.0f} s"
    assert result.lost == 0 and result.charged_twice == 0
