"""The OpenAI-compatible front door, driven by the official `openai` SDK over real sockets:
`spillway serve`, a real worker and the simulator (two wire formats behind one route)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS
from workers.limiter import tenants
from workers.store import Job, aware, utcnow

pytestmark = pytest.mark.integration

DB = 9
TOKEN_A, TOKEN_B, TOKEN_C = "sk-team-a-5b1c0e", "sk-team-b-77d2aa", "sk-team-c-0f9e31"
OPERATOR = "sk-operator-4e8d21"  # $SPILLWAY_API_TOKEN


@pytest.fixture(scope="module")
def front(redis_server) -> Iterator[tuple[LocalStack, str]]:
    redis.Redis.from_url(redis_server.url(DB)).flushdb()
    stack = LocalStack(
        CONFIGS / "openai_api.toml",
        redis_url=redis_server.url(DB),
        extra_env={
            "TEAM_A_TOKEN": TOKEN_A,
            "TEAM_B_TOKEN": TOKEN_B,
            "TEAM_C_TOKEN": TOKEN_C,
            "SPILLWAY_API_TOKEN": OPERATOR,
        },
    )
    try:
        stack.start()
        stack.start_worker(concurrency=16, loglevel="WARNING")
        stack.wait_for_workers()
        url = stack.start_service(["serve"], "/v1/models")
        yield stack, url
    finally:
        stack.close()


def sdk(url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60)


def jsonl(lines: list[dict]) -> io.BytesIO:
    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    data.name = "input.jsonl"
    return data


def request(custom_id: str, model: str, text: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def wait_for_status(client: openai.OpenAI, batch_id: str, wanted: set[str], timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in wanted:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout_s:.0f}s")


def job_count(stack: LocalStack) -> int:
    with stack.client().runtime.store.session(write=False) as s:
        return s.query(Job).count()


def test_a_500_line_batch_round_trip(front) -> None:
    stack, url = front
    client = sdk(url, TOKEN_A)
    lines = [request(f"req-{i}", "spillway/analysis", f"summarise item {i}") for i in range(490)]
    lines += [request(f"named-{i}", "llama-3.3-70b-versatile", f"named model {i}") for i in range(7)]
    lines += [request(f"unknown-{i}", "gpt-nope", "no such model") for i in range(3)]
    upload = client.files.create(file=jsonl(lines), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status in ("in_progress", "finalizing", "completed") and batch.metadata == {"job": "nightly"}
    done = wait_for_status(client, batch.id, {"completed"})
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        500,
        497,
        3,
    )
    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    ids = Counter(r["custom_id"] for r in output + errors)
    assert set(ids) == {line["custom_id"] for line in lines} and set(ids.values()) == {1}
    answered = output[0]
    assert answered["response"]["status_code"] == 200 and answered["error"] is None
    assert answered["response"]["body"]["object"] == "chat.completion"
    assert answered["response"]["body"]["choices"][0]["message"]["content"]
    models = Counter(r["response"]["body"]["model"] for r in output)
    assert models["llama-3.3-70b-versatile"] >= 100 and models["claude-haiku-4-5"] >= 100, models
    assert {r["custom_id"] for r in errors} == {"unknown-0", "unknown-1", "unknown-2"}
    assert all(r["response"] is None and "gpt-nope" in r["error"]["message"] for r in errors)
    named = [r for r in output if r["custom_id"].startswith("named-")]
    assert {r["response"]["body"]["model"] for r in named} == {"llama-3.3-70b-versatile"}
    seen = stack.simulator_stats()
    assert seen["groq"]["requests"] >= 100 and seen["anthropic"]["requests"] >= 100  # two wire formats
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"


def test_a_cancelled_batch_keeps_what_finished_and_gives_its_reserved_budget_back(front) -> None:
    """Jobs waiting for the slow provider hold reservations of its budget; cancelled, they give
    them back at once, so a job after the cancel waits for one refill, not behind all of them."""
    stack, url = front
    rt = stack.client().runtime
    client = sdk(url, TOKEN_A)
    lines = [request(f"slow-{i}", "spillway/slow", f"slow {i}") for i in range(40)]
    upload = client.files.create(file=jsonl(lines), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    reserved = lambda: rt.redis.keys(rt.keys.reservation("slow", "*"))  # noqa: E731
    deadline = time.monotonic() + 30
    while not reserved() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reserved(), "jobs waiting for the slow provider hold reservations"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    # the parked ones gave theirs back with the cancel; one waiting in the broker (a countdown
    # of at most max_countdown_s, 10 s) gives its back when a worker takes it
    deadline = time.monotonic() + 20
    while reserved() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reserved() == []
    done = wait_for_status(client, batch.id, {"cancelled"}, timeout_s=60)
    counts = done.request_counts
    assert counts.completed >= 2 and counts.failed >= 20 and counts.completed + counts.failed == 40
    output = client.files.content(done.output_file_id).text.splitlines()
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"cancelled"}
    with rt.store.session(write=False) as s:  # cancelled when its last job ended, not at the request
        ended = max(
            j.finished_at for j in s.query(Job).filter(Job.batch_id == rt.store.batch_of_api_batch(batch.id))
        )
    assert done.cancelled_at == int(aware(ended).timestamp()) >= done.cancelling_at
    # one refill (10 s at 6 a minute) away, not behind the cancelled jobs' turns (minutes)
    again = (
        sdk(url, TOKEN_A)
        .with_options(timeout=45)
        .chat.completions.create(
            model="spillway/slow", messages=[{"role": "user", "content": "after the cancel"}], max_tokens=8
        )
    )
    assert again.choices[0].message.content
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(wait_for_status(client, _small_batch(client), {"completed"}).id)


def test_the_command_line_follows_a_front_door_batch_by_its_id(front) -> None:
    """`spillway batch --status` takes the id the SDK shows (`batch_…`) for the Spillway batch
    underneath (the operator's tool: any tenant's)."""
    stack, url = front
    api_id = wait_for_status(sdk(url, TOKEN_A), _small_batch(sdk(url, TOKEN_A)), {"completed"}).id

    def status(batch_id: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "producer.cli", "batch", "--status", batch_id, "--json"]
        return subprocess.run(
            argv, env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=60
        )

    shown = status(api_id)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["by_status"] == {"succeeded": 1} and report["finished"]
    assert not report["batch_id"].startswith("batch_")  # the Spillway batch underneath
    unknown = status("batch_" + "0" * 32)
    assert unknown.returncode != 0 and "no batch with id 'batch_000" in unknown.stderr


def _small_batch(client: openai.OpenAI) -> str:
    upload = client.files.create(file=jsonl([request("one", "spillway/analysis", "one")]), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def test_chat_completions_answer_in_openais_format(front) -> None:
    _, url = front
    client = sdk(url, TOKEN_A)
    answer = client.chat.completions.create(
        model="llama-3.3-70b-versatile", messages=[{"role": "user", "content": "Say hi"}], max_tokens=16
    )
    assert answer.object == "chat.completion" and answer.model == "llama-3.3-70b-versatile"
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0 and answer.usage.total_tokens > answer.usage.prompt_tokens
    raw = client.chat.completions.with_raw_response.create(
        model="spillway",
        messages=[{"role": "user", "content": "which route?"}],
        extra_headers={"X-Spillway-Task": "chat", "X-Spillway-Tier": "pro"},
    )
    assert raw.parse().model == "claude-haiku-4-5"  # chat/pro's only model
    assert len(raw.headers["x-request-id"]) == 32  # the job's id: findable after a disconnect
    models = {m.id for m in client.models.list()}
    assert {"llama-3.3-70b-versatile", "claude-haiku-4-5", "spillway/analysis", "spillway/chat"} <= models


def test_errors_raise_the_sdks_exception_classes(front) -> None:
    stack, url = front
    a, b = sdk(url, TOKEN_A), sdk(url, TOKEN_B)
    with pytest.raises(openai.AuthenticationError) as wrong:
        sdk(url, "sk-wrong").models.list()
    assert wrong.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown:
        a.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        a.chat.completions.create(model="spillway", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.BadRequestError) as tools:
        a.chat.completions.create(model="spillway", messages=[{"role": "user", "content": "x"}], tools=[])
    assert tools.value.param == "tools" and "not supported" in tools.value.message
    with pytest.raises(openai.PermissionDeniedError):  # team-b may use its own tier only
        b.chat.completions.create(
            model="spillway",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Spillway-Tier": "pro"},
        )
    # another tenant's file and batch do not exist for it
    upload = a.files.create(file=jsonl([request("mine", "spillway/analysis", "mine")]), purpose="batch")
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.files.retrieve(upload.id),
        lambda: b.files.content(upload.id),
        lambda: b.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in {x.id for x in b.batches.list()}
    # malformed uploads: an OpenAI-shaped 400 naming the line, and nothing stored or enqueued
    before = job_count(stack)
    bad_uploads = {
        "not JSON": b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n{oops\n',
        "duplicate": jsonl([request("same", "spillway", "1"), request("same", "spillway", "2")]).getvalue(),
        "method": json.dumps({**request("m", "spillway", "x"), "method": "GET"}).encode(),
        "url": json.dumps({**request("u", "spillway", "x"), "url": "/v1/embeddings"}).encode(),
    }
    for what, content in bad_uploads.items():
        with pytest.raises(openai.BadRequestError) as refused:
            a.files.create(file=("bad.jsonl", content), purpose="batch")
        assert "line " in refused.value.message and refused.value.param == "file", what
    with pytest.raises(openai.BadRequestError) as purpose:
        a.files.create(file=jsonl([request("p", "spillway", "x")]), purpose="fine-tune")
    assert purpose.value.param == "purpose"
    with pytest.raises(openai.BadRequestError):
        a.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert job_count(stack) == before


def test_batches_list_pages_newest_first(front) -> None:
    _, url = front
    client = sdk(url, TOKEN_B)
    made = [_small_batch(client) for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert made[0] in [b.id for b in rest.data]
    assert [b.id for b in client.batches.list()][:3] == made[::-1]


def test_a_tenants_daily_budget_is_its_own(front) -> None:
    """team-c has 100 tokens a day: a job holds its worst case until it ends, then only what it
    used counts; what cannot fit is a RateLimitError with nothing submitted."""
    stack, url = front
    c = sdk(url, TOKEN_C)
    rt = stack.client().runtime
    spent = lambda name: tenants.used(rt.redis, rt.keys, name, utcnow())  # noqa: E731
    before_a, before_jobs = spent("team-a"), job_count(stack)
    answer = c.chat.completions.create(
        model="spillway", messages=[{"role": "user", "content": "hi"}], max_tokens=16
    )
    assert spent("team-c") == answer.usage.total_tokens  # held the worst case, gave the rest back
    with pytest.raises(openai.RateLimitError) as refused:  # its worst case does not fit what is left
        c.chat.completions.create(
            model="spillway", messages=[{"role": "user", "content": "hi"}], max_tokens=90
        )
    assert refused.value.code == "daily_token_budget" and "team-c" in refused.value.message
    headers = refused.value.response.headers  # the SDK does not retry it: the budget is back tomorrow
    assert headers["x-should-retry"] == "false" and 0 < int(headers["retry-after"]) <= 86_400
    upload = c.files.create(
        file=jsonl([request(f"c{i}", "spillway", "x") for i in range(10)]), purpose="batch"
    )
    with pytest.raises(openai.RateLimitError):
        c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    [refused_batch] = c.batches.list().data  # kept as failed, saying why; none of its jobs exists
    assert refused_batch.status == "failed" and refused_batch.errors.data[0].code == "daily_token_budget"
    assert job_count(stack) == before_jobs + 1 and spent("team-c") == answer.usage.total_tokens
    # team-a, without a budget, holds nothing (no Redis round trip), and team-c's use is not its
    sdk(url, TOKEN_A).chat.completions.create(model="spillway", messages=[{"role": "user", "content": "a"}])
    assert spent("team-a") == before_a == 0 and spent("team-c") == answer.usage.total_tokens


def test_a_client_that_hangs_up_leaves_its_job_running_and_findable(front) -> None:
    """The job does not die with the connection; the same Idempotency-Key finds it again."""
    stack, url = front
    body = {"model": "spillway/slow", "messages": [{"role": "user", "content": "patience"}], "max_tokens": 8}
    hung = None
    for i in range(8):  # the slow provider takes 6 at once, then one every 10 s: one must wait
        headers = {"Authorization": f"Bearer {TOKEN_A}", "Idempotency-Key": f"hang-up-{i}"}
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=0.5)
        except httpx.TimeoutException:  # hangs up while its job waits for the provider
            hung = headers
            break
    assert hung is not None
    again = httpx.post(f"{url}/v1/chat/completions", json=body, headers=hung, timeout=60)
    assert again.status_code == 200, again.text
    job_id = again.headers["x-request-id"]
    with stack.client().runtime.store.session(write=False) as s:
        keyed = s.query(Job).filter(Job.idempotency_key.like(f"%:{hung['Idempotency-Key']}")).all()
    assert [j.id for j in keyed] == [job_id] and keyed[0].status == "succeeded"


def test_a_failed_job_is_one_error_the_sdk_does_not_retry(front) -> None:
    """A job that failed answers 502 with x-should-retry: false: the SDK (which retries 5xx
    twice by default) submits it once."""
    stack, url = front
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN_A, timeout=60)  # default retries
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="spillway/locked", messages=[{"role": "user", "content": "x"}])
    assert failed.value.status_code == 502 and failed.value.code == "auth"
    assert failed.value.response.headers["x-should-retry"] == "false"
    with stack.client().runtime.store.session(write=False) as s:
        assert s.query(Job).filter(Job.task_type == "locked").count() == 1
    assert stack.simulator_stats()["locked"]["auth_error"] == 1  # one call, not three


def test_serves_own_routes_keep_tenants_apart(front) -> None:
    """A job is its tenant's (and the operator's); a tenant keeps to its tiers on /v1/jobs too;
    the routes that show every tenant's usage take the operator's token."""
    _, url = front
    answer = sdk(url, TOKEN_A).chat.completions.with_raw_response.create(
        model="spillway", messages=[{"role": "user", "content": "mine"}]
    )
    job_id = answer.headers["x-request-id"]

    def get(path: str, token: str) -> httpx.Response:
        return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30)

    assert get(f"/v1/jobs/{job_id}", TOKEN_A).json()["status"] == "succeeded"
    assert get(f"/v1/jobs/{job_id}", OPERATOR).status_code == 200
    assert get(f"/v1/jobs/{job_id}", TOKEN_B).status_code == 404
    body = {"prompt": "hi", "task": "chat", "tier": "pro"}
    refused = httpx.post(
        f"{url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {TOKEN_B}"}, timeout=30
    )
    assert refused.status_code == 403 and "tier 'pro'" in refused.json()["error"]["message"]
    for path in ("/v1/usage", "/v1/status", "/v1/dashboard", "/metrics"):
        assert get(path, TOKEN_A).status_code == 403, path
        assert get(path, OPERATOR).status_code == 200, path


def test_models_retrieve_and_files_list(front) -> None:
    _, url = front
    a, b = sdk(url, TOKEN_A), sdk(url, TOKEN_B)
    assert a.models.retrieve("claude-haiku-4-5").owned_by == "anthropic"
    assert a.models.retrieve("spillway/analysis").owned_by == "spillway"
    with pytest.raises(openai.NotFoundError):
        a.models.retrieve("gpt-nope")
    upload = a.files.create(file=jsonl([request("listed", "spillway", "x")]), purpose="batch")
    assert upload.id in {f.id for f in a.files.list()}
    assert upload.id not in {f.id for f in b.files.list()}
