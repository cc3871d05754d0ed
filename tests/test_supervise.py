"""`spillway worker`: it says which providers it skips, restarts its Celery worker when it dies
on its own, passes a requested stop on without restarting, and the watchdog ends a worker that
stopped consuming while messages wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

from producer.client import default_client
from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS
from tests.faultkit import wait_for, wait_until


def _supervisor(
    tmp_path: Path, child_code: str, pause_s: float = 0.01, copies: int = 1
) -> subprocess.Popen[str]:
    """A supervisor (in a process of its own: it installs signal handlers) over tiny children."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(child_code))
    code = (
        "import sys, workers.supervise as s\n"
        f"s.RESTART_PAUSE_S = {pause_s}\n"
        f"sys.exit(s.supervise([sys.executable, {str(child)!r}], copies={copies}))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True
    )


def test_a_child_that_keeps_dying_is_restarted_then_given_up(tmp_path) -> None:
    starts = tmp_path / "starts"
    proc = _supervisor(
        tmp_path,
        f"""
        with open({str(starts)!r}, "a") as f:
            f.write("x")
        raise SystemExit(3)
        """,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert len(starts.read_text()) == 6  # the first start and five restarts within a minute
    assert err.count("the worker exited with code 3; starting it again") == 5
    assert "6 deaths within a minute; giving up" in err


def test_a_child_is_told_to_stop_when_its_supervisor_is_killed(tmp_path) -> None:
    got, ready = tmp_path / "got", tmp_path / "ready"
    proc = _supervisor(
        tmp_path,
        f"""
        import os, signal, sys, time
        def on(signum, _):
            open({str(got)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on)
        open({str(ready)!r}, "w").write(str(os.getpid()))
        for _ in range(600):  # at most 60 s: an orphan the test would otherwise leave behind
            time.sleep(0.1)
        """,
    )
    wait_for(lambda: ready.exists() and ready.read_text(), timeout_s=20, what="the child to start")
    child = psutil.Process(int(ready.read_text()))
    proc.kill()  # SIGKILL: the supervisor can pass nothing on
    proc.wait(10)
    wait_for(lambda: got.exists() and got.read_text(), timeout_s=10, what="the orphan to get SIGTERM")
    assert got.read_text() == "SIGTERM"
    psutil.wait_procs([child], timeout=10)
    assert not child.is_running()


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_a_requested_stop_reaches_the_child_as_a_warm_shutdown_and_ends_everything(tmp_path, sent) -> None:
    got, starts, ready = tmp_path / "got", tmp_path / "starts", tmp_path / "ready"
    proc = _supervisor(
        tmp_path,
        f"""
        import signal, sys, time
        with open({str(starts)!r}, "a") as f:
            f.write("x")
        def on(signum, _):
            open({str(got)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on)
        signal.signal(signal.SIGINT, on)
        open({str(ready)!r}, "w").close()  # the handlers are in place
        for _ in range(600):  # the scenario: a worker that runs (at most 60 s) until told to stop
            time.sleep(0.1)
        """,
    )
    wait_for(ready.exists, timeout_s=20, what="the child to start and install its signal handlers")
    os.kill(proc.pid, sent)  # the supervisor only, as `kill` would
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert got.read_text() == "SIGTERM"  # never a second SIGINT: Celery reads that as cold shutdown
    assert starts.read_text() == "x" and "starting it again" not in err


def test_several_children_one_that_dies_is_restarted_alone_and_a_stop_ends_them_all(tmp_path) -> None:
    starts = tmp_path / "starts"
    proc = _supervisor(
        tmp_path,
        f"""
        import os, signal, sys, time
        with open({str(starts)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        for _ in range(600):  # at most 60 s, until told to stop
            time.sleep(0.1)
        """,
        copies=3,
    )

    def started() -> list[str]:
        return starts.read_text().split() if starts.exists() else []

    wait_for(lambda: len(started()) == 3, timeout_s=20, what="three children")
    first = psutil.Process(int(started()[0]))
    first.kill()
    wait_for(lambda: len(started()) == 4, timeout_s=20, what="the killed one started again")
    children = psutil.Process(proc.pid).children()
    assert len(children) == 3 and first not in children  # the other two left as they were
    time.sleep(1)  # the new one's handler in place
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not any(child.is_running() for child in children)
    assert err.count("the worker was killed by SIGKILL; starting it again") == 1


@pytest.mark.integration
def test_a_provider_without_a_key_is_skipped_with_one_line(redis_server, tmp_path) -> None:
    url = redis_server.url(7)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(CONFIGS / "e2e.toml", redis_url=url, workdir=str(tmp_path))
    try:
        stack.start(simulator=False)
        stack.start_worker(concurrency=2, loglevel="INFO", extra_env={"OPENAI_API_KEY": ""})
        stack.wait_for_workers()
        log = (stack.workdir / "worker0.log").read_text()
    finally:
        stack.close()
    skipped = [line for line in log.splitlines() if "skipped" in line]
    assert skipped == [
        "spillway worker: provider openai skipped: no key in $OPENAI_API_KEY (nor $OPENAI_API_KEY_1, _2, …)"
    ]
    assert "llm.openai" not in log.split("threads", 1)[0]  # not among the queues it serves


@pytest.mark.integration
def test_a_worker_that_gives_up_exits_with_a_failure_for_its_supervisor(redis_server, tmp_path) -> None:
    """Celery's "Unrecoverable error" (as when the Redis broker vanishes while threads ack) must
    end the process non-zero, or the supervisor takes it for a stop asked for. Here the consumer
    raises as it starts: Celery's own handling does the rest."""
    url = redis_server.url(8)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(CONFIGS / "e2e.toml", redis_url=url, workdir=str(tmp_path))
    stack.start(simulator=False)
    code = textwrap.dedent(
        """
        from celery.worker.consumer.consumer import Consumer
        from producer.cli import main

        def broken(self):
            raise RuntimeError("the broker connection broke")

        Consumer.start = broken
        main(["worker", "--no-supervise", "-c", "2", "-l", "INFO"])
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **stack.env},
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stack.close()
    assert "Unrecoverable error: RuntimeError('the broker connection broke')" in out.stdout + out.stderr
    assert out.returncode == 1


@pytest.mark.integration
def test_a_celery_worker_killed_under_its_supervisor_is_started_again(redis_server, tmp_path) -> None:
    url = redis_server.url(5)
    redis.Redis.from_url(url).flushdb()
    with LocalStack(CONFIGS / "e2e.toml", redis_url=url, workdir=str(tmp_path)) as stack:
        supervisor = stack.start_worker(concurrency=4, loglevel="WARNING")
        stack.wait_for_workers()
        [child] = psutil.Process(supervisor.pid).children()
        os.kill(child.pid, signal.SIGKILL)  # the Celery worker dies; its supervisor does not

        def replaced() -> bool:
            kids = psutil.Process(supervisor.pid).children()
            return bool(kids) and kids[0].pid != child.pid

        assert wait_until(replaced, timeout_s=30)
        stack.wait_for_workers(count=1)
        with stack.applied():
            from producer import submit

            result = submit("after a restart", task="chat", tier="free").wait(60)
        log = (stack.workdir / "worker0.log").read_text()
    assert result.status == "succeeded"
    assert "the worker was killed by SIGKILL; starting it again" in log


@pytest.mark.integration
def test_the_watchdog_sees_a_worker_that_ignores_waiting_messages(
    redis_server, tmp_path, monkeypatch
) -> None:
    from workers import watchdog

    url = redis_server.url(6)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(CONFIGS / "e2e.toml", redis_url=url, workdir=str(tmp_path))
    stack.start(simulator=False)
    try:
        with stack.applied():
            from producer import submit

            app = default_client().app

            submit("nobody consumes this", task="chat", tier="free")  # waits in llm.groq
            dog = watchdog.Watchdog(app, ["llm.groq", "llm.gemini"], stuck_s=120.0)
            now = time.monotonic()
            monkeypatch.setattr(watchdog, "_last_start", now - dog.stuck_s - 5)
            assert dog.stuck_for_s(now) == 0.0  # messages just seen: they may have just arrived
            later = now + watchdog.GRACE_S
            assert dog.stuck_for_s(later) > dog.stuck_s  # still waiting, still idle: stuck
            monkeypatch.setattr(watchdog.state, "active_requests", {"busy"})
            assert dog.stuck_for_s(later) == 0.0  # a thread is busy: not stuck
            monkeypatch.setattr(watchdog.state, "active_requests", set())
            assert dog.stuck_for_s(later + 1) == 0.0  # the wait starts over after a busy moment
            assert (
                watchdog.Watchdog(app, ["llm.openai"], stuck_s=120.0).stuck_for_s(later) == 0.0
            )  # nothing waits there
            monkeypatch.setattr(watchdog, "_last_start", later)
            assert dog.stuck_for_s(later + watchdog.GRACE_S) == 0.0  # a task started just now
    finally:
        stack.close()
