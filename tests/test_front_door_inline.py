"""`spillway serve` calls the provider itself for a chat completion when there is room at once
(`workers.inline`), and queues the rest: real sockets — serve's server in this process, a
Redis of its own, a SQLite store, the simulator in a thread — and no Celery worker, so an
answer can only have come from serve's own call. Every wait is bounded in time."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from producer.jobs import submit_many
from tests.faultkit import wait_for
from tests.servekit import front_stack, serve_in_thread
from workers import execution, parking
from workers.broker import message_task_ids
from workers.config import Candidate
from workers.embedded import start_redis
from workers.limiter import Costs
from workers.reconciler import recover_once
from workers.store import IN_DOUBT, PARKED, QUEUED, RUNNING, SUCCEEDED, FirstRun, Job

TOKEN = "sk-front-door-inline"
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

[providers.once]
api = "anthropic"
base_url = "https://once.example"
key_env = "ONCE_KEY"
timeout_s = 5
limits = { rpm = 1 }  # one request, then none for a minute
[providers.once.models.om]

[routes.chat]
free = ["a:am"]
[routes.scarce]
free = ["once:om"]

[simulator]
latency_ms = { median = 1, p95 = 2 }
"""
KEYS = {"A_KEY": "sk-a", "ONCE_KEY": "sk-once"}
QUEUES = ["llm.a", "llm.once"]


@contextmanager
def stack(tmp_path: Path, **variables: str) -> Iterator[Any]:
    redis_server = start_redis()
    try:
        with front_stack(CONFIG, redis_server.url(0), tmp_path / "store.db", **KEYS, **variables) as front:
            yield front
    finally:
        redis_server.stop()


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Any]:
    with stack(tmp_path) as front:  # serve's defaults
        yield front


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)


def ask_in_background(url: str, model: str) -> threading.Thread:
    """A chat completion in a thread; with no worker here, one that is queued ends when its
    client gives up or serve stops (errors the test does not look at)."""

    def ask() -> None:
        with contextlib.suppress(openai.APIError):
            sdk(url).chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, timeout=5
            )

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread


def jobs(front: Any) -> list[Job]:
    with front.rt.store.session(write=False) as s:
        return list(s.query(Job))


def handed_on(front: Any) -> set[str]:
    """Jobs the workers will run: published to a queue, or parked until their quota is back."""
    published = message_task_ids(front.client.app, QUEUES) or set()
    return published | parking.parked_job_ids(front.rt.redis, front.rt.keys)


def provider_requests(front: Any, provider: str) -> int:
    return front.sim.sim.stats[provider]["ok"]


def test_serve_answers_a_chat_completion_with_its_own_call_when_there_is_room(front) -> None:
    with serve_in_thread(front.client, TOKEN) as (url, _):
        answer = sdk(url).chat.completions.create(
            model="spillway/chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
    (job,) = jobs(front)
    assert (job.status, job.provider, job.calls) == (SUCCEEDED, "a", 1)
    # answered from the job as serve wrote it, not read back: the same as the store holds
    assert answer.choices[0].message.content == job.text and job.text
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        job.input_tokens,
        job.output_tokens,
    )
    assert answer.id == f"chatcmpl-{job.id}" and answer.model == job.model
    assert provider_requests(front, "a") == 1  # what the provider saw: one call, no worker here
    assert [a.outcome for a in front.rt.store.attempts(job.id)] == [SUCCEEDED]
    assert message_task_ids(front.client.app, QUEUES) == set()  # nothing went through the broker


def test_a_job_that_must_wait_is_queued_for_the_workers_not_refused(front) -> None:
    with serve_in_thread(front.client, TOKEN) as (url, _):
        ask_in_background(url, "spillway/scarce").join(10)  # takes the minute's only request
        ask_in_background(url, "spillway/scarce")
        wait_for(lambda: len(jobs(front)) == 2, 10, "the second job stored")
        waiting = next(j for j in jobs(front) if j.status != SUCCEEDED)
        wait_for(lambda: waiting.id in handed_on(front), 10, "the job that must wait handed to the workers")
    assert front.rt.store.job(waiting.id).status in (QUEUED, PARKED)
    # the second never reached the provider: one request, answered, none refused with a 429
    assert dict(front.sim.sim.stats["once"]) == {"requests": 1, "ok": 1}


def test_requests_beyond_the_free_slots_are_published(tmp_path, monkeypatch) -> None:
    slots = 2
    gate = threading.Event()
    started: list[str] = []
    real = execution.run_claimed

    def held(rt: Any, job: Any, *args: Any, **kwargs: Any) -> Any:
        started.append(job.id)
        gate.wait(20)  # each slot stays busy until the test has looked
        return real(rt, job, *args, **kwargs)

    monkeypatch.setattr(execution, "run_claimed", held)
    with (
        stack(tmp_path, SPILLWAY_SERVE_INLINE_CALLS=str(slots)) as front,
        serve_in_thread(front.client, TOKEN) as (url, _),
    ):
        for _ in range(5):
            ask_in_background(url, "spillway/chat")
        wait_for(lambda: len(jobs(front)) == 5, 10, "five jobs stored")
        wait_for(lambda: len(handed_on(front)) == 3, 10, "three published")
        assert len(started) == slots
        assert handed_on(front).isdisjoint(started)  # a job runs here or goes to a worker, never both
        gate.set()
        wait_for(lambda: provider_requests(front, "a") == slots, 10, "the slots' calls made")


class DiesMidCall:
    """A `producer.jobs.Runner` whose process dies once the job is stored claimed for it: the
    job is never run, and no message carries it."""

    def __init__(self, rt: Any, lease_s: float) -> None:
        self.rt, self.lease_s = rt, lease_s
        self.given: list[Any] = []

    def reserve(self, candidate: Candidate) -> FirstRun:
        return FirstRun(self.lease_s)

    def release(self) -> None:
        raise AssertionError("a stored job's slot is not given back")

    def run(self, target: Any, job: Any) -> None:
        self.given.append(job)


def test_a_job_whose_inline_run_died_is_published_by_the_reconciler_and_charged_once(front) -> None:
    """The process that ran it is gone mid-call: the claim, stored with the job, is there (no
    round trip of its own), no message carries it."""
    runner = DiesMidCall(front.rt, lease_s=0.2)
    (handle,) = submit_many(front.client, [{"prompt": "hi", "task": "chat", "tier": "free"}], runner=runner)
    stored = front.rt.store.job(handle.id)
    assert (stored.status, stored.runs) == (RUNNING, 1) and stored.lease_until is not None
    assert [(j.id, j.status, j.runs) for j in runner.given] == [(handle.id, RUNNING, 1)]  # as claimed
    assert front.rt.store.attempts(handle.id) == []  # the running job is the mark of its call
    assert message_task_ids(front.client.app, QUEUES) == set()
    time.sleep(0.3)  # the lease runs out
    recovered = recover_once(front.rt, front.client.app, idle_for_s=0, confirm_s=0.1)
    assert recovered.republished == [handle.id]
    assert handle.id in (message_task_ids(front.client.app, QUEUES) or set())
    outcome = execution.run_job(front.rt, handle.id, Candidate("a", "am"))  # the worker's delivery
    assert isinstance(outcome, execution.Done) and outcome.summary["status"] == SUCCEEDED
    outcomes = [a.outcome for a in front.rt.store.attempts(handle.id)]
    assert outcomes == [IN_DOUBT, SUCCEEDED]  # the lost call at its estimate, the real one once
    assert provider_requests(front, "a") == 1


def queued_count(front: Any, provider: str) -> dict[str, float]:
    """The work the limiter counts as queued for `provider` (what placement reads)."""
    raw = front.rt.redis.hgetall(front.rt.keys.pending(provider))
    return {k.decode(): float(v) for k, v in raw.items()}


def increments(front: Any) -> int:
    """HINCRBYFLOATs this stack's Redis has run: how queued work is counted."""
    stats = front.rt.redis.info("commandstats").get("cmdstat_hincrbyfloat", {})
    return int(stats.get("calls", 0))


class NoSlots:
    """A `producer.jobs.Runner` with every slot busy: each job is published."""

    def reserve(self, candidate: Candidate) -> None:
        return None

    def release(self) -> None:
        raise AssertionError("nothing was reserved")

    def run(self, target: Any, job: Any) -> None:
        raise AssertionError("nothing was reserved")


def test_a_job_serve_runs_itself_is_never_counted_as_queued_and_a_published_one_is(front) -> None:
    front.rt.limiter.add_pending({Candidate("a", "am"): Costs.estimate(100, 50)})  # someone else's
    before = queued_count(front, "a")
    assert before["am|requests"] == 1
    with serve_in_thread(front.client, TOKEN) as (url, _):
        counted = increments(front)
        sdk(url).chat.completions.create(
            model="spillway/chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        assert increments(front) == counted  # no round trip to count it, none to take it off
    assert provider_requests(front, "a") == 1
    assert queued_count(front, "a") == before  # and the other job's count left as it was
    (handle,) = submit_many(
        front.client, [{"prompt": "hi", "task": "chat", "tier": "free"}], runner=NoSlots()
    )
    assert handle.id in (message_task_ids(front.client.app, QUEUES) or set())
    assert queued_count(front, "a")["am|requests"] == 2  # published: counted once
