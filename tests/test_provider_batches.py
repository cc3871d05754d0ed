"""Jobs through the providers' own batch APIs, over real workers and the simulator's OpenAI,
Anthropic and Gemini batch endpoints: `auto` sends a batch with a deadline there at half the
price, answers come back once per job and the chord's callback runs once; without a deadline
`auto` calls now; requests a provider batch leaves unanswered go in another, then are called
synchronously; and killing
every worker and restarting Redis while provider batches are out loses and repeats nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bench.events import EventCounter
from producer.ops.stack import LocalStack
from producer.status import status_report
from tests.conftest import CONFIGS
from tests.faultkit import LEDGER, Row, all_final, audit, wait_until
from workers.constants import POLL_PROVIDER_BATCH_TASK

pytestmark = pytest.mark.integration
DB = 4
OPERATOR = "sk-operator-pb-93c1"


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    stack = LocalStack(
        CONFIGS / "provider_batches.toml",
        redis_url=redis_server.url(DB),
        workdir=str(tmp_path_factory.mktemp("provider-batches")),
        extra_env={"SPILLWAY_API_TOKEN": OPERATOR},
    )
    stack.start()
    stack.start_worker(concurrency=16, loglevel="WARNING")
    stack.wait_for_workers()
    yield stack
    stack.close()


def run_batch(stack: LocalStack, tmp: Path, items: int, *args: str, task: str = "analysis") -> list[dict]:
    source = tmp / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"custom_id": f"c{i}", "prompt": f"question {i}"}) + "\n" for i in range(items))
    )
    argv = ["batch", str(source), "--task", task, "--tier", "free", "-o", str(tmp / "out.jsonl"), *args]
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", *argv],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"c{i}" for i in range(items)]  # each once, in order
    return lines


def counts(stack: LocalStack) -> dict[str, dict[str, int]]:
    return {p: dict(c) for p, c in stack.simulator_stats().items()}


def delta(before: dict, after: dict, what: str) -> dict[str, int]:
    return {p: after[p].get(what, 0) - before.get(p, {}).get(what, 0) for p in after}


def test_auto_sends_a_batch_with_a_deadline_to_the_batch_apis_at_half_price(stack, tmp_path) -> None:
    before = counts(stack)
    lines = run_batch(stack, tmp_path, 45, "--mode", "auto", "--deadline", "2h")
    after = counts(stack)
    assert all(x["status"] == "succeeded" and x["text"] for x in lines)
    batch_requests = delta(before, after, "batch_requests")
    assert batch_requests == {"oa": 15, "an": 15, "ge": 15, "ex": 0}  # three wire formats, in turn
    assert sum(delta(before, after, "requests").values()) == 0  # no synchronous call at all
    assert sum(delta(before, after, "batches_created").values()) >= 3
    with stack.applied() as client:
        total = client.runtime.store.usage_report(by="provider")["total"]
    assert total["via_batch"] >= 45
    # half price: what was saved equals what was paid
    assert total["saved_usd"] == pytest.approx(total["cost_usd"], rel=1e-6)


def test_the_chord_callback_runs_once_for_a_batch_through_provider_batches(stack, tmp_path) -> None:
    run_batch(stack, tmp_path, 12, "--mode", "batch")
    with stack.applied() as client:
        store = client.runtime.store
        batches = store.provider_batches(states=("applied",))
        assert batches and all(b.ref and b.submitted_at for b in batches)  # each had its id stored
        [job] = store.provider_batch_jobs(batches[-1].id)[:1]
        summary = store.batch(job.batch_id)
        assert summary.finished_at is not None and summary.callback_runs == 1


def test_auto_without_a_deadline_calls_now(stack, tmp_path) -> None:
    before = counts(stack)
    lines = run_batch(stack, tmp_path, 6, "--mode", "auto")
    after = counts(stack)
    assert all(x["status"] == "succeeded" for x in lines)
    assert sum(delta(before, after, "batch_requests").values()) == 0
    assert sum(delta(before, after, "requests").values()) == 6


def test_requests_a_provider_batch_leaves_unanswered_go_again_then_synchronously(stack, tmp_path) -> None:
    before = counts(stack)
    lines = run_batch(stack, tmp_path, 10, task="expiring")  # the route's mode: batch; they expire
    after = counts(stack)
    assert all(x["status"] == "succeeded" for x in lines)
    with stack.applied() as client:
        report = client.runtime.store.usage_report(by="provider")
    ex = next(g for g in report["groups"] if g["provider"] == "ex")
    called_now = delta(before, after, "requests")["ex"]
    # every batch of "ex" expires with half its requests unanswered: those go in a second
    # provider batch, and what that one leaves is called synchronously (MAX_BATCH_ROUNDS)
    assert delta(before, after, "batches_created")["ex"] == 2
    assert delta(before, after, "batch_requests")["ex"] == 10 + (10 - 5)
    assert ex["via_batch"] + called_now == 10 and called_now == 3
    assert ex["requests"] == 10  # each job answered once: no expired request is on the ledger


def test_status_and_flower_show_provider_batches_in_flight(stack) -> None:
    with stack.applied() as client, EventCounter(client.app, task=POLL_PROVIDER_BATCH_TASK) as polls:
        from producer import submit_batch

        store = client.runtime.store
        handle = submit_batch(
            [{"custom_id": f"s{i}", "prompt": f"status {i}"} for i in range(4)],
            task="analysis",
            tier="free",
            mode="batch",
        )
        assert wait_until(lambda: bool(store.provider_batches(states=("submitted",))), timeout_s=30)
        # read in this process: a batch is in flight for about its 2 s turnaround, less than a
        # `spillway status` process may take to start on a busy machine
        shown: list[dict] = []

        def in_flight() -> bool:
            shown[:] = status_report(client.runtime)["provider_batches"]
            return bool(shown)

        assert wait_until(in_flight, timeout_s=10, every_s=0.05)
        assert {b["provider"] for b in shown} <= {"oa", "an", "ge"}
        assert all(b["jobs"] >= 1 and b["age_s"] >= 0 for b in shown)
        assert any(b["state"] == "submitted" and b["expected_in_s"] is not None for b in shown)
        assert wait_until(lambda: handle.progress().done == 4, timeout_s=60)
        out = subprocess.run(  # the command prints what status_report gives
            [sys.executable, "-m", "producer.cli", "status", "--json"],
            env={**os.environ, **stack.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["provider_batches"] == []  # none in flight any more
        # the polling tasks, as Flower counts them from the workers' events
        assert wait_until(lambda: polls.counts["task-succeeded"] >= 1, timeout_s=10), polls.counts


def test_an_upload_to_the_openai_batch_api_goes_through_provider_batches(stack) -> None:
    """Its 24 h completion window is the jobs' deadline, and the route says auto."""
    import io

    import openai

    url = stack.start_service(["serve"], "/v1/models")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=OPERATOR, max_retries=0, timeout=60)
    lines = [
        {
            "custom_id": f"api-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "g1", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 16},
        }
        for i in range(5)
    ]
    upload = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    upload.name = "in.jsonl"
    before = counts(stack)
    file = client.files.create(file=upload, purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", timeout_s=60)
    done = client.batches.retrieve(batch.id)
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == [f"api-{i}" for i in range(5)]
    after = counts(stack)
    assert delta(before, after, "batch_requests")["ge"] == 5  # the model picked its provider
    assert sum(delta(before, after, "requests").values()) == 0


@pytest.mark.faults
def test_workers_killed_and_redis_restarted_while_provider_batches_run(tmp_path) -> None:
    """A Redis of its own, restarted empty while provider batches are at the providers, and
    every worker killed meanwhile: the poller resumes from the store, every job is answered
    once, no request is sent to a provider twice, and the batch's callback still runs."""
    config = tmp_path / "pb.toml"
    config.write_text(
        (CONFIGS / "provider_batches.toml").read_text().replace("turnaround_s = 1.0", "turnaround_s = 6.0")
    )
    stack = LocalStack(config, workdir=str(tmp_path))
    jobs = 60
    try:
        stack.start()
        worker = stack.start_worker(concurrency=16, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            from producer import submit_batch

            store = client.runtime.store
            handle = submit_batch(
                [{"custom_id": f"k{i}", "prompt": f"kill test {i}"} for i in range(jobs)],
                task="analysis",
                tier="free",
                mode="batch",
            )
            ids = [j.id for j in store.batch_jobs(handle.id, limit=jobs + 1)]
            assert wait_until(
                lambda: len(store.provider_batches(states=("submitted",))) >= 3, timeout_s=60
            ), store.provider_batch_counts()
            stack.kill_worker(worker)
            stack.redis.restart()  # the poll tasks, chord state and queues: all gone
            stack.start_worker(concurrency=16, loglevel="WARNING")
            assert wait_until(all_final(store, ids), timeout_s=120), store.count_by_status(handle.id)
            assert wait_until(lambda: store.batch(handle.id).finished_at is not None, timeout_s=60)
            result = audit(store, ids)
            seen = counts(stack)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "workers killed + Redis restarted, provider batches out",
            faults=2,
            submitted=jobs,
            lost=result.lost,
            charged_twice=result.charged_twice,
        )
    )
    assert result.lost == 0 and result.charged_twice == 0 and result.ledger_mismatch == 0
    # what the providers saw: each job once, in a batch, never again synchronously
    assert sum(c.get("batch_requests", 0) for c in seen.values()) == jobs
    assert sum(c.get("requests", 0) for c in seen.values()) == 0
