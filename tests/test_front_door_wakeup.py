"""`/v1/chat/completions` answers when a worker says the job is final (`workers.notify`), and
finds it anyway when that word is lost: real sockets — `spillway serve`'s server in this
process (with no calls of its own: `workers.inline` is off), a Redis of its own, a SQLite
store, the simulator in a thread — no Celery worker: the tests play it (`execution.run_job`, which calls `notify.finished`; a worker that does not is
played by silencing it). Every wait is bounded in time."""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from producer.client import Client
from producer.ops.openai.chat import ChatCompletions, Waiters
from tests.servekit import front_stack, serve_in_thread
from workers import execution, notify
from workers.config import Candidate
from workers.embedded import EmbeddedRedis, free_port, start_redis
from workers.keyspace import Keyspace
from workers.runtime import Runtime
from workers.store import QUEUED, SUCCEEDED

TOKEN = "sk-front-door-wakeup"
CONFIG = """
[spillway]
default_max_tokens = 16

[providers.a]
api = "openai"
base_url = "https://a.example/v1"
key_env = "A_KEY"
timeout_s = 5
limits = { rpm = 100000, tpm = 100000000 }
[providers.a.models.am]

[routes.chat]
free = ["a:am"]

[simulator]
latency_ms = { median = 1, p95 = 2 }
"""
A = Candidate("a", "am")
BODY = {"model": "spillway/chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
NEVER_S = 30.0  # a sweep interval no test waits out: an answer sooner came from a notification


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own: one test stops and restarts it."""
    server = start_redis()
    if server.kind != "server":
        server.stop()
        pytest.skip("needs a redis-server binary (to stop and restart it)")
    yield server
    server.stop()


@pytest.fixture
def front(private_redis: EmbeddedRedis, tmp_path: Path) -> Iterator[Any]:
    """A runtime on a fresh store and Redis; `serve()` starts the server on it."""
    variables = {"A_KEY": "sk-a", "SPILLWAY_SERVE_INLINE_CALLS": "0"}  # workers (the tests) run every job
    with front_stack(CONFIG, private_redis.url(0), tmp_path / "store.db", **variables) as stack:
        stack.redis = private_redis
        yield stack


@contextmanager
def serving(client: Client) -> Iterator[tuple[str, Waiters]]:
    """`spillway serve`'s server in a thread of this process: its URL and its chat waiters."""
    with serve_in_thread(client, TOKEN) as (url, server):
        app = server.request_callback
        waiters = next(
            rule.target_kwargs["waiters"]
            for rule in app.wildcard_router.rules
            if rule.target is ChatCompletions
        )
        yield url, waiters


class Ask:
    """One chat completion in a thread of its own: `answer(timeout)` is its response."""

    def __init__(self, url: str) -> None:
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._post, args=(url,), daemon=True)
        self.thread.start()

    def _post(self, url: str) -> None:
        try:
            self.response = httpx.post(
                f"{url}/v1/chat/completions",
                json=BODY,
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=NEVER_S + 30,
            )
        except Exception as exc:  # handed to the test
            self.error = exc

    def answer(self, timeout_s: float) -> httpx.Response | None:
        self.thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        return self.response


def queued_job(rt: Runtime, timeout_s: float = 10) -> str:
    """The id of the one queued job, once the submit has stored it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with rt.store.session(write=False) as s:
            from workers.store import Job

            ids = [j.id for j in s.query(Job).filter(Job.status == QUEUED)]
        if ids:
            return ids[0]
        time.sleep(0.02)
    raise AssertionError(f"no job was queued within {timeout_s:g}s")


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s:g}s")


def subscribers(rt: Runtime) -> int:
    channel = rt.keys.finished_channel()
    try:
        return dict(rt.redis.pubsub_numsub(channel)).get(channel.encode(), 0)
    except redis.RedisError:
        return 0


def finish_in_store(rt: Runtime, job_id: str) -> None:
    """What a worker writes at the end of a run, without calling anyone (Redis may be away)."""
    claim = rt.store.claim(job_id, lease_s=60, max_crashes=3)
    assert claim.state == "run"
    assert rt.store.finish(
        job_id,
        claim.job.runs,
        None,
        status=SUCCEEDED,
        text="done",
        finish_reason="stop",
        provider="a",
        model="am",
    )


@pytest.fixture(autouse=True)
def notify_not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with workers.notify willing to publish (another test's may have quieted it)."""
    monkeypatch.setattr(notify, "_quiet_until", 0.0)


def run_silently(monkeypatch: pytest.MonkeyPatch, rt: Runtime, job_id: str) -> None:
    """A worker that does not announce what it finished (an older one, or its publish lost)."""
    with monkeypatch.context() as quiet:
        quiet.setattr(notify, "finished", lambda rt, job_id, final=None: None)
        assert isinstance(execution.run_job(rt, job_id, A), execution.Done)


def tune(monkeypatch: pytest.MonkeyPatch, **values: float) -> None:
    for name, value in values.items():
        monkeypatch.setattr(Waiters, name, value)


# -- workers.notify -----------------------------------------------------------------------------


def test_a_notification_carries_the_job_id_and_nothing_else(front) -> None:
    pubsub = front.rt.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(front.rt.keys.finished_channel())
    wait_until(lambda: subscribers(front.rt) >= 1, 5, "subscribed")
    notify.finished(front.rt, "0123456789abcdef0123456789abcdef")
    message = None
    deadline = time.monotonic() + 5
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
    pubsub.close()
    assert message is not None and message["data"] == b"0123456789abcdef0123456789abcdef"
    assert message["channel"] == b"spillway:finished"


class CountingRedis:
    """A Redis client's `publish`, counted: `to` is the real client, or None for one that is away."""

    def __init__(self, to: redis.Redis) -> None:
        self.to, self.published = to, 0

    def publish(self, channel: str, message: str) -> int:
        self.published += 1
        return self.to.publish(channel, message)


def test_notify_never_raises_and_keeps_quiet_while_redis_is_away(monkeypatch) -> None:
    monkeypatch.setattr(notify, "QUIET_S", NEVER_S)  # however long the refused connect takes
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    counted = CountingRedis(away)
    rt = types.SimpleNamespace(redis=counted, keys=Keyspace("t"))
    notify.finished(rt, "a" * 32)  # refused: logged at debug, nothing raised
    assert notify._quiet_until > time.monotonic()
    for _ in range(100):
        notify.finished(rt, "b" * 32)
    assert counted.published == 1  # no command tried while quiet
    away.close()


def test_a_worker_that_nobody_hears_publishes_twice_a_second_not_per_job(front, monkeypatch) -> None:
    monkeypatch.setattr(notify, "UNHEARD_S", NEVER_S)  # no quiet period ends during the loop
    counted = CountingRedis(front.rt.redis)
    rt = types.SimpleNamespace(redis=counted, keys=front.rt.keys)
    for _ in range(100):
        notify.finished(rt, "c" * 32)
    assert counted.published == 1
    assert notify._quiet_until > time.monotonic() + NEVER_S / 2
    pubsub = front.rt.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(front.rt.keys.finished_channel())
    wait_until(lambda: subscribers(front.rt) >= 1, 5, "subscribed")
    monkeypatch.setattr(notify, "_quiet_until", 0.0)  # the quiet period is over
    for _ in range(3):
        notify.finished(rt, "d" * 32)
    pubsub.close()
    assert counted.published == 4  # heard: one per job again


# -- the waiters -------------------------------------------------------------------------------


def test_a_notified_job_is_answered_at_once_not_at_a_sweep(front, monkeypatch) -> None:
    tune(monkeypatch, FAST_S=NEVER_S, SLOW_S=NEVER_S)
    with serving(front.client) as (url, waiters):
        ask = Ask(url)
        job_id = queued_job(front.rt)
        wait_until(lambda: subscribers(front.rt) >= 1, 10, "serve subscribed")
        started = time.monotonic()
        assert isinstance(execution.run_job(front.rt, job_id, A), execution.Done)  # notifies
        response = ask.answer(10)
        took = time.monotonic() - started
    assert response is not None and response.status_code == 200, response
    assert response.headers["x-request-id"] == job_id
    assert response.json()["choices"][0]["message"]["content"]
    assert took < 5 < NEVER_S
    assert waiters.counts["notified"] == 1 and waiters.counts["swept"] == 0


def test_a_job_nobody_announced_is_found_by_the_sweep(front, monkeypatch) -> None:
    tune(monkeypatch, FAST_S=0.05, SLOW_S=NEVER_S)
    with serving(front.client) as (url, waiters):
        ask = Ask(url)
        job_id = queued_job(front.rt)
        run_silently(monkeypatch, front.rt, job_id)
        response = ask.answer(10)
    assert response is not None and response.status_code == 200
    assert waiters.counts == {"here": 0, "notified": 0, "swept": 1, "missed": 0}


def test_after_a_missed_notification_the_sweeps_go_fast_again(front, monkeypatch) -> None:
    tune(monkeypatch, FAST_S=0.05, SLOW_S=1.0, GRACE_S=0.2)
    with serving(front.client) as (url, waiters):
        first = Ask(url)
        job_id = queued_job(front.rt)
        wait_until(lambda: subscribers(front.rt) >= 1, 10, "serve subscribed")
        execution.run_job(front.rt, job_id, A)
        assert first.answer(10).status_code == 200
        assert waiters.proven and waiters._interval() == 1.0  # trusted: slow sweeps
        second = Ask(url)  # its worker does not notify
        job_id = queued_job(front.rt)
        run_silently(monkeypatch, front.rt, job_id)
        assert second.answer(10).status_code == 200  # by a slow sweep
        third = Ask(url)  # keeps the sweeper going while the miss is judged
        wait_until(lambda: waiters.counts["missed"] == 1, 10, "the miss noticed")
        assert waiters._interval() == 0.05
        job_id = queued_job(front.rt)
        execution.run_job(front.rt, job_id, A)
        assert third.answer(10).status_code == 200


def test_a_job_heard_before_its_request_waits_is_answered_at_once(monkeypatch) -> None:
    tune(monkeypatch, FAST_S=NEVER_S, SLOW_S=NEVER_S)
    job = types.SimpleNamespace(id="c" * 32)
    store = types.SimpleNamespace(finished_jobs=lambda ids: [job] if job.id in ids else [])
    client: Any = types.SimpleNamespace(runtime=types.SimpleNamespace(store=store))
    with ThreadPoolExecutor(2) as pool:
        waiters = Waiters(client, pool, listen=False)
        waiters.heard[job.id] = None  # the worker was quicker than the request's own submit

        async def wait() -> Any:
            return await waiters.wait(job.id, 5)

        started = time.monotonic()
        assert asyncio.run(wait()) is job
    assert time.monotonic() - started < 2


def test_a_redis_restart_loses_no_answer(front, monkeypatch) -> None:
    """Redis away: a job that finishes meanwhile is found by the store sweeps (its notification
    is lost); Redis back: the listener subscribes again and notifications answer again."""
    tune(monkeypatch, FAST_S=0.1, SLOW_S=NEVER_S)
    with serving(front.client) as (url, waiters):
        first = Ask(url)
        job_id = queued_job(front.rt)
        wait_until(lambda: subscribers(front.rt) >= 1, 10, "serve subscribed")
        port = int(front.redis.address.rsplit(":", 1)[1])
        front.redis.stop()
        wait_until(lambda: not waiters.listening, 10, "the listener notices Redis is away")
        finish_in_store(front.rt, job_id)
        notify.finished(front.rt, job_id)  # lost: nothing raised
        response = first.answer(10)
        assert response is not None and response.status_code == 200
        assert waiters.counts["swept"] == 1
        restarted = start_redis(port=port)  # empty, as after a crash
        try:
            monkeypatch.setattr(notify, "_quiet_until", 0.0)
            wait_until(lambda: waiters.listening and subscribers(front.rt) >= 1, 15, "subscribed again")
            waiters.proven = True
            monkeypatch.setattr(Waiters, "FAST_S", NEVER_S)  # from now on only a notification is quick
            second = Ask(url)
            job_id = queued_job(front.rt)
            finish_in_store(front.rt, job_id)
            notify.finished(front.rt, job_id)
            response = second.answer(10)
            assert response is not None and response.status_code == 200
            assert waiters.counts["notified"] == 1
        finally:
            restarted.stop()
