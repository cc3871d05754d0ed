"""Redis restarted empty mid-batch, unreachable at submit, and blipping under a worker: the
store knows every job, the reconciler sends the lost ones again exactly once, the limiter
relearns from the providers' headers, and no call is ever made unlimited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import redis

from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS
from tests.faultkit import LEDGER, Row, all_final, audit, size, wait_for, wait_until
from tests.test_faults_workers import FAST_RECOVERY

pytestmark = [pytest.mark.integration, pytest.mark.faults]
RECOVER_IDLE_S = 2  # `spillway recover --idle`: jobs untouched this long count as lost


def own_redis_stack(tmp_path, limits: str | None = None) -> LocalStack:
    text = (CONFIGS / "faults.toml").read_text()
    if limits:
        text = text.replace("limits = { rpm = 100000, tpm = 100000000, concurrency = 64 }", limits)
        text = text.replace(
            "limits = { rpm = 100000, itpm = 100000000, otpm = 100000000, concurrency = 64 }",
            limits.replace("tpm", "itpm"),
        )
    config = tmp_path / "faults.toml"
    config.write_text(text)
    return LocalStack(config, workdir=str(tmp_path), extra_env=FAST_RECOVERY)  # a Redis of its own


def test_redis_restarted_empty_mid_batch(tmp_path) -> None:
    jobs = size(600, 1500)
    stack = own_redis_stack(tmp_path, "limits = { rpm = 240, tpm = 100000000, concurrency = 64 }")
    try:
        stack.start()
        stack.start_worker(concurrency=16, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit_batch
            from producer.client import default_client

            store = default_client().runtime.store
            handle = submit_batch(
                [{"custom_id": f"r{i}", "prompt": f"restart test {i}"} for i in range(jobs)],
                task="work",
                tier="free",
            )
            ids = [j.id for j in store.batch_jobs(handle.id, limit=jobs + 1)]
            wait_for(
                lambda: handle.progress().done >= jobs // 3,
                timeout_s=120,
                what=f"a third of the {jobs} jobs done before the restart",
                every_s=0.05,
            )
            queued_before = store.count_by_status(handle.id).get("queued", 0)
            stack.redis.restart()  # queues, unacked messages, chord state and buckets: all gone
            restarted = time.monotonic()
            from workers.store import utcnow

            restarted_at = utcnow()
            # The scenario, not a wait for a condition: the operator runs `recover --idle N` a
            # little after the restart. Only jobs nothing touched for N seconds qualify, and only
            # time passing makes the jobs lost with Redis that old.
            time.sleep(RECOVER_IDLE_S + 1)
            cli = subprocess.run(
                [sys.executable, "-m", "producer.cli", "recover", "--idle", str(RECOVER_IDLE_S), "--json"],
                env={**os.environ, **stack.env},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert cli.returncode == 0, cli.stderr
            republished = json.loads(cli.stdout)["republished"]
            assert wait_until(all_final(store, ids), timeout_s=200), store.count_by_status(handle.id)
            assert wait_until(lambda: store.batch(handle.id).finished_at is not None, timeout_s=30)
            result = audit(store, ids)
            limited = _rate_limited_since(store, restarted_at)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "Redis restarted empty mid-batch",
            faults=1,
            submitted=jobs,
            lost=result.lost,
            charged_twice=result.charged_twice,
        )
    )
    assert queued_before > 0 and len(republished) == len(set(republished))
    assert result.lost == 0 and result.charged_twice == 0 and result.ledger_mismatch == 0
    # the empty limiter trusts full buckets until the first answers' headers say otherwise
    assert len(limited) <= 40, f"{len(limited)} 429s after the restart"
    if limited:
        assert (max(limited) - min(limited)).total_seconds() < 10  # they stop soon
    assert time.monotonic() - restarted < 300


def _rate_limited_since(store, moment) -> list:
    from sqlalchemy import select

    from workers.store import Attempt, aware

    with store.session(write=False) as s:
        rows = s.scalars(
            select(Attempt.started_at).where(Attempt.outcome == "rate_limited", Attempt.started_at >= moment)
        )
        return [aware(t) for t in rows]


def test_redis_unreachable_at_submit_then_back(tmp_path) -> None:
    stack = own_redis_stack(tmp_path)
    try:
        stack.start()
        stack.start_worker(concurrency=4, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit
            from producer.client import default_client
            from workers.errors import ServiceUnavailable
            from workers.reconciler import recover_once

            client = default_client()
            store = client.runtime.store
            assert submit("before the outage", task="work", tier="free").wait(60).status == "succeeded"
            before = store.count_by_status()
            stack.redis.stop()
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="does not answer"):
                submit("during the outage", task="work", tier="free")
            failed_fast = time.monotonic() - started
            assert store.count_by_status() == before  # nothing half-stored
            stack.env["SPILLWAY_SUBMIT_WHEN_BROKER_DOWN"] = "store"  # a producer that keeps jobs
            kept = stack.client().submit("kept for later", task="work", tier="free")
            assert store.job(kept.id).status == "queued"
            stack.redis.restart()
            wait_for(client.runtime.redis.ping, 10, "Redis to answer again", retry_on=(redis.RedisError,))
            recovery = recover_once(client.runtime, client.app, idle_for_s=0, confirm_s=0.5)
            kept_result = kept.wait(60)
            after = submit("after the outage", task="work", tier="free").wait(60)  # the worker carried on
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "Redis unreachable at submit, then back",
            faults=1,
            submitted=3,
            lost=int(kept_result.status != "succeeded"),
        )
    )
    assert failed_fast < 5
    assert recovery.republished == [kept.id]
    assert kept_result.status == "succeeded" and after.status == "succeeded"


def test_a_worker_rides_out_a_redis_blip(tmp_path) -> None:
    jobs = size(60, 200)
    stack = own_redis_stack(tmp_path)
    try:
        stack.start()
        stack.start_worker(concurrency=8, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit
            from producer.client import default_client

            rt = default_client().runtime
            store = rt.store
            first = [submit(f"blip {i}", task="work", tier="free").id for i in range(jobs // 2)]
            stack.redis.restart()  # a blip: Redis gone and back, empty
            wait_for(rt.redis.ping, 10, "Redis to answer again", retry_on=(redis.RedisError,))
            second = [submit(f"after blip {i}", task="work", tier="free").id for i in range(jobs // 2)]
            assert wait_until(all_final(store, first + second), timeout_s=180), store.count_by_status()
            result = audit(store, first + second)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "Redis blip under a running worker",
            faults=1,
            submitted=jobs,
            lost=result.lost,
            charged_twice=result.charged_twice,
        )
    )
    assert result.lost == 0 and result.charged_twice == 0
