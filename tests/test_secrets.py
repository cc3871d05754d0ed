"""Secrets and privacy: after a run with recognisable fake keys and prompts — successes, 429s,
rejected keys, a batch, a callback — no key and no prompt is in any broker message, result,
parked job, limiter key or log line, nor in `spillway status`; and no key is in the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import redis
from sqlalchemy import text

from producer.client import default_client
from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS
from tests.faultkit import LEDGER, Row, all_final, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def everything_in(client: redis.Redis) -> bytes:
    """Every key and value of one Redis database, whatever the type."""
    chunks = []
    for key in client.scan_iter(count=1000):
        chunks.append(key)
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"list":
            chunks += client.lrange(key, 0, -1)
        elif kind == b"hash":
            chunks += [k + b"=" + v for k, v in client.hgetall(key).items()]
        elif kind == b"zset":
            chunks += client.zrange(key, 0, -1)
        elif kind == b"set":
            chunks += list(client.smembers(key))
    return b"\n".join(chunks)


def test_no_key_and_no_prompt_leaks(tmp_path, redis_server) -> None:
    canary = f"PROMPT-CANARY-{uuid.uuid4().hex}"
    config = tmp_path / "secrets.toml"
    config.write_text(
        (CONFIGS / "faults.toml").read_text() + '\n[simulator.providers.beta]\nreject_keys = ["*"]\n'
    )  # beta's key is refused
    url = redis_server.url(10)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(
        config,
        redis_url=url,
        workdir=str(tmp_path),
        extra_env={"SPILLWAY_CALLBACK_SECRET": "whsec-secret-canary"},
    )
    try:
        stack.start()
        stack.set_faults("alpha", {"rate_limit": 0.3})
        stack.start_worker(concurrency=8, loglevel="INFO")
        stack.wait_for_workers()
        keys = [v for k, v in stack.env.items() if k.endswith("_KEY") or "_KEY_" in k]
        with stack.applied():
            from producer import submit, submit_batch

            store = default_client().runtime.store
            ids = [
                submit(f"{canary} single {i}", task="work", tier="free", system=f"{canary} system").id
                for i in range(10)
            ]
            ids.append(
                submit(
                    f"{canary} callback", task="work", tier="free", callback_url="http://127.0.0.1:9/nowhere"
                ).id
            )
            batch = submit_batch(
                [{"custom_id": f"s{i}", "prompt": f"{canary} batch {i}"} for i in range(20)],
                task="work",
                tier="free",
            )
            ids += [j.id for j in store.batch_jobs(batch.id, limit=100)]
            assert wait_until(all_final(store, ids), timeout_s=120)
            status = subprocess.run(
                [sys.executable, "-m", "producer.cli", "status", "--json"],
                env={**os.environ, **stack.env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            with store.session(write=False) as s:
                stored = "\n".join(
                    str(row)
                    for table in ("spillway_jobs", "spillway_attempts", "spillway_batches")
                    for row in s.execute(text(f"SELECT * FROM {table}"))
                )
        redis_dump = everything_in(redis.Redis.from_url(url))
        logs = "\n".join(p.read_text(errors="replace") for p in stack.workdir.glob("*.log"))
        stats = stack.simulator_stats()
    finally:
        stack.close()
    places = {
        "Redis (broker messages, results, parked jobs, limiter)": redis_dump.decode("utf-8", "replace"),
        "worker and simulator logs": logs,
        "spillway status --json": status.stdout + status.stderr,
    }
    for where, content in places.items():
        assert canary not in content, f"the prompt leaked into {where}"
        for key in keys:
            assert key not in content, f"an API key leaked into {where}"
    for key in [*keys, "whsec-secret-canary"]:
        assert key not in stored, "an API key is in the store"
    assert canary in stored  # the prompt lives in the store: it is the claim check
    assert stats["alpha"].get("fault_rate_limit", 0) > 0 and stats["beta"].get("auth_error", 0) > 0
    assert json.loads(status.stdout)["providers"]
    LEDGER.add(
        Row(
            "secrets: keys and prompts searched after a run",
            faults=stats["alpha"]["fault_rate_limit"],
            submitted=len(ids),
        )
    )
