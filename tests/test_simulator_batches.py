"""The simulator's batch APIs over real sockets, judged by the official SDKs where they exist
(openai: files + batches; anthropic: messages.batches) and by httpx for Gemini's REST shapes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.conftest import CONFIGS
from workers.config import Limits, parse_settings
from workers.errors import ConfigError
from workers.simulator import SimServer, sim_settings, start_in_thread
from workers.simulator.settings import BatchBehaviour

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

SDK_TIMEOUT_S = 30.0  # each SDK call's limit; the simulator answers in milliseconds
WAIT_S = 10.0  # the most any test waits for a batch to reach a state (turnarounds are < 1 s)

BASE = (CONFIGS / "e2e.toml").read_text()
OPENAI_MODELS = {"openai": "gpt-4o-mini", "groq": "llama-3.3-70b-versatile"}
OPENAI_PREFIX = {"openai": "/openai/v1", "groq": "/groq/openai/v1"}
CLAUDE = "claude-haiku-4-5"
GEMINI = "gemini-2.0-flash"
HTTP = httpx.Client(timeout=SDK_TIMEOUT_S)


@pytest.fixture
def sim(batch_sim: SimServer) -> SimServer:
    return batch_sim


def set_batch(sim: SimServer, provider: str, **changes: Any) -> None:
    config = sim.sim.settings.providers[provider]
    config.batch = replace(config.batch, **changes)


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# -- clients ----------------------------------------------------------------------------------


def openai_client(sim: SimServer, provider: str = "openai", key: str = "sk-batch") -> Any:
    return openai.OpenAI(
        base_url=sim.url + OPENAI_PREFIX[provider], api_key=key, max_retries=0, timeout=SDK_TIMEOUT_S
    )


def anthropic_client(sim: SimServer, key: str = "sk-ant-batch") -> Any:
    return anthropic.Anthropic(
        base_url=f"{sim.url}/anthropic", api_key=key, max_retries=0, timeout=SDK_TIMEOUT_S
    )


def chat_body(model: str, text: str, max_tokens: int = 12) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}


def openai_batch(client: Any, model: str, count: int, extra_lines: tuple[str, ...] = ()) -> Any:
    lines = [
        json.dumps(
            {
                "custom_id": f"job-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat_body(model, f"question {i}"),
            }
        )
        for i in range(count)
    ]
    upload = client.files.create(
        file=("in.jsonl", "\n".join([*lines, *extra_lines]).encode()), purpose="batch"
    )
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )


def openai_ended(client: Any, batch_id: str) -> Any:
    def ended() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "expired", "cancelled") else None

    return wait_until(ended, f"OpenAI batch {batch_id} to end")


def file_lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def anthropic_batch(client: Any, count: int, bad: tuple[str, ...] = ()) -> Any:
    requests = [
        {"custom_id": f"msg-{i}", "params": {**chat_body(CLAUDE, f"question {i}", 8)}} for i in range(count)
    ]
    requests += [{"custom_id": cid, "params": {"model": CLAUDE, "messages": []}} for cid in bad]
    return client.messages.batches.create(requests=requests)


def anthropic_ended(client: Any, batch_id: str) -> Any:
    def ended() -> Any:
        batch = client.messages.batches.retrieve(batch_id)
        return batch if batch.processing_status == "ended" else None

    return wait_until(ended, f"Anthropic batch {batch_id} to end")


def gemini(
    sim: SimServer, method: str, path: str, body: Any = None, key: str = "AIza-batch"
) -> httpx.Response:
    return HTTP.request(method, f"{sim.url}/gemini/v1beta/{path}", json=body, headers={"x-goog-api-key": key})


def gemini_batch(sim: SimServer, count: int) -> httpx.Response:
    requests = [
        {
            "request": {
                "contents": [{"role": "user", "parts": [{"text": f"question {i}"}]}],
                "generationConfig": {"maxOutputTokens": 12},
            },
            "metadata": {"key": f"req-{i}"},
        }
        for i in range(count)
    ]
    body = {"batch": {"display_name": "test", "input_config": {"requests": {"requests": requests}}}}
    return gemini(sim, "POST", f"models/{GEMINI}:batchGenerateContent", body)


def gemini_ended(sim: SimServer, name: str) -> dict[str, Any]:
    def ended() -> Any:
        op = gemini(sim, "GET", name).json()
        return op if op.get("done") else None

    return wait_until(ended, f"Gemini {name} to be done")


# -- completed batches ------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "groq"])
def test_openai_batch_completes_with_every_custom_id_answered_once(sim: SimServer, provider: str) -> None:
    client, model = openai_client(sim, provider), OPENAI_MODELS[provider]
    created = openai_batch(client, model, 5)
    assert created.status == "validating" and created.request_counts.total == 5
    assert created.output_file_id is None and created.metadata == {"run": "test"}

    done = openai_ended(client, created.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at and done.in_progress_at
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
    assert done.error_file_id is None and done.model == model
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    lines = file_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == [f"job-{i}" for i in range(5)]
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        assert line["response"]["body"]["object"] == "chat.completion"
    # Answered exactly as the synchronous endpoint answers the same request.
    sync = client.chat.completions.create(**chat_body(model, "question 3"))
    body = next(line["response"]["body"] for line in lines if line["custom_id"] == "job-3")
    assert body["choices"][0]["message"]["content"] == sync.choices[0].message.content
    assert body["usage"]["prompt_tokens"] == sync.usage.prompt_tokens
    assert body["usage"]["completion_tokens"] == sync.usage.completion_tokens
    assert done.usage.output_tokens == sum(
        ln["response"]["body"]["usage"]["completion_tokens"] for ln in lines
    )


def test_anthropic_batch_completes_and_bad_params_end_errored(sim: SimServer) -> None:
    client = anthropic_client(sim)
    created = anthropic_batch(client, 3, bad=("broken",))
    assert created.type == "message_batch" and created.processing_status == "in_progress"
    assert created.request_counts.processing == 4 and created.results_url is None
    assert created.expires_at.timestamp() - created.created_at.timestamp() == pytest.approx(86_400, abs=1)

    done = anthropic_ended(client, created.id)
    counts = done.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 3, 1)
    assert done.ended_at is not None and done.results_url.endswith(f"/v1/messages/batches/{done.id}/results")
    results = {r.custom_id: r.result for r in client.messages.batches.results(done.id)}
    assert sorted(results) == ["broken", "msg-0", "msg-1", "msg-2"]
    assert results["broken"].type == "errored"
    assert (
        results["broken"].error.type == "error"
        and results["broken"].error.error.type == "invalid_request_error"
    )
    sync = client.messages.create(**chat_body(CLAUDE, "question 1", 8))
    assert results["msg-1"].type == "succeeded"
    assert results["msg-1"].message.content[0].text == sync.content[0].text
    assert results["msg-1"].message.usage.input_tokens == sync.usage.input_tokens


def test_gemini_batch_succeeds_with_inline_responses_in_order(sim: SimServer) -> None:
    created = gemini_batch(sim, 3)
    assert created.status_code == 200
    op = created.json()
    assert op["name"].startswith("batches/") and "done" not in op
    meta = op["metadata"]
    assert meta["@type"].endswith("GenerateContentBatch") and meta["model"] == f"models/{GEMINI}"
    assert meta["state"] == "BATCH_STATE_PENDING" and meta["displayName"] == "test"
    assert meta["batchStats"] == {"requestCount": "3", "pendingRequestCount": "3"}

    done = gemini_ended(sim, op["name"])
    assert done["metadata"]["state"] == "BATCH_STATE_SUCCEEDED" and "endTime" in done["metadata"]
    assert done["metadata"]["batchStats"] == {"requestCount": "3", "successfulRequestCount": "3"}
    assert done["response"]["@type"].endswith("GenerateContentBatchOutput")
    inline = done["response"]["inlinedResponses"]["inlinedResponses"]
    assert inline == done["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert [r["metadata"]["key"] for r in inline] == ["req-0", "req-1", "req-2"]
    sync = gemini(
        sim,
        "POST",
        f"models/{GEMINI}:generateContent",
        {
            "contents": [{"role": "user", "parts": [{"text": "question 2"}]}],
            "generationConfig": {"maxOutputTokens": 12},
        },
    ).json()
    assert inline[2]["response"]["candidates"] == sync["candidates"]
    assert inline[2]["response"]["usageMetadata"] == sync["usageMetadata"]
    listed = gemini(sim, "GET", "batches?pageSize=1").json()
    assert [o["name"] for o in listed["operations"]] == [op["name"]] and "nextPageToken" not in listed


# -- partial failures, expiry, cancel ---------------------------------------------------------


def test_partial_failures_use_each_providers_per_request_error(sim: SimServer) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        set_batch(sim, provider, error_rate=0.5)
    oa, an = openai_client(sim), anthropic_client(sim)
    o_id, a_id = openai_batch(oa, "gpt-4o-mini", 10).id, anthropic_batch(an, 10).id
    g_name = gemini_batch(sim, 10).json()["name"]

    o = openai_ended(oa, o_id)
    assert o.status == "completed" and 0 < o.request_counts.failed < 10
    assert o.request_counts.completed + o.request_counts.failed == 10
    errors = file_lines(oa, o.error_file_id)
    assert (
        len(errors) == o.request_counts.failed
        and len(file_lines(oa, o.output_file_id)) == o.request_counts.completed
    )
    for line in errors:
        assert line["error"] is None and line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["type"] == "server_error"

    a = anthropic_ended(an, a_id)
    assert 0 < a.request_counts.errored < 10 and a.request_counts.succeeded + a.request_counts.errored == 10
    errored = [r.result for r in an.messages.batches.results(a_id) if r.result.type == "errored"]
    assert len(errored) == a.request_counts.errored
    assert all(r.error.error.type == "api_error" and r.error.request_id for r in errored)

    g = gemini_ended(sim, g_name)
    assert g["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    inline = g["response"]["inlinedResponses"]["inlinedResponses"]
    failed = [r for r in inline if "error" in r]
    assert 0 < len(failed) < 10 and all(r["error"]["code"] == 13 for r in failed)  # google.rpc INTERNAL
    assert g["metadata"]["batchStats"]["failedRequestCount"] == str(len(failed))


def test_expiry_leaves_requests_unanswered(sim: SimServer) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        set_batch(sim, provider, expire_rate=1.0)
    oa, an = openai_client(sim), anthropic_client(sim)
    o_id, a_id = openai_batch(oa, "gpt-4o-mini", 4).id, anthropic_batch(an, 4).id
    g_name = gemini_batch(sim, 4).json()["name"]

    o = openai_ended(oa, o_id)
    assert o.status == "expired" and o.expired_at and o.completed_at is None
    assert o.request_counts.completed == 2
    assert {line["custom_id"] for line in file_lines(oa, o.output_file_id)} == {"job-0", "job-1"}
    expired = file_lines(oa, o.error_file_id)
    assert {line["custom_id"] for line in expired} == {"job-2", "job-3"}
    assert all(ln["response"] is None and ln["error"]["code"] == "batch_expired" for ln in expired)

    a = anthropic_ended(an, a_id)
    assert (a.request_counts.succeeded, a.request_counts.expired) == (2, 2)
    kinds = {r.custom_id: r.result.type for r in an.messages.batches.results(a_id)}
    assert kinds == {"msg-0": "succeeded", "msg-1": "succeeded", "msg-2": "expired", "msg-3": "expired"}

    g = gemini_ended(sim, g_name)
    # The guide: an expired job "will not have any results to retrieve".
    assert g["metadata"]["state"] == "BATCH_STATE_EXPIRED" and "output" not in g["metadata"]
    assert "response" not in g


def test_cancel_mid_way_keeps_answered_results(sim: SimServer) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        set_batch(sim, provider, turnaround_s=4.0)
    oa, an = openai_client(sim), anthropic_client(sim)
    o_id, a_id = openai_batch(oa, "gpt-4o-mini", 10).id, anthropic_batch(an, 10).id
    g_name = gemini_batch(sim, 10).json()["name"]
    wait_until(lambda: oa.batches.retrieve(o_id).request_counts.completed >= 1, "a first OpenAI answer")
    wait_until(
        lambda: gemini(sim, "GET", g_name).json()["metadata"]["batchStats"].get("successfulRequestCount"),
        "a first Gemini answer",
    )

    cancelling = oa.batches.cancel(o_id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    canceling = an.messages.batches.cancel(a_id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at
    assert gemini(sim, "POST", f"{g_name}:cancel").json() == {}

    o = openai_ended(oa, o_id)
    kept = file_lines(oa, o.output_file_id)
    assert o.status == "cancelled" and o.cancelled_at and 0 < len(kept) < 10
    assert o.request_counts.completed == len(kept)
    cancelled = file_lines(oa, o.error_file_id)
    assert len(kept) + len(cancelled) == 10 and all(
        ln["error"]["code"] == "batch_cancelled" for ln in cancelled
    )
    assert oa.batches.cancel(o_id).status == "cancelled"  # an ended batch stays as it is

    a = anthropic_ended(an, a_id)
    assert a.request_counts.canceled > 0 and a.request_counts.succeeded + a.request_counts.canceled == 10
    assert {r.result.type for r in an.messages.batches.results(a_id)} == {"succeeded", "canceled"}

    g = gemini_ended(sim, g_name)
    assert g["metadata"]["state"] == "BATCH_STATE_CANCELLED" and g["error"]["code"] == 1
    inline = g["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    answered = [r for r in inline if "response" in r]
    assert 0 < len(answered) < 10 and all(r["error"]["code"] == 1 for r in inline if "response" not in r)


# -- limits, auth, counters, settings ---------------------------------------------------------


def test_batch_requests_do_not_draw_from_sync_per_minute_limits(sim: SimServer) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        sim.sim.settings.providers[provider].limits = Limits(rpm=2)
    sim.sim.reset()
    oa, an = openai_client(sim), anthropic_client(sim)
    o_id, a_id = openai_batch(oa, "gpt-4o-mini", 6).id, anthropic_batch(an, 6).id
    g_name = gemini_batch(sim, 6).json()["name"]
    assert openai_ended(oa, o_id).request_counts.completed == 6
    assert anthropic_ended(an, a_id).request_counts.succeeded == 6
    assert gemini_ended(sim, g_name)["metadata"]["batchStats"]["successfulRequestCount"] == "6"

    for _ in range(2):  # the sync quota is untouched: both calls of the minute are still there
        oa.chat.completions.create(**chat_body("gpt-4o-mini", "sync"))
        an.messages.create(**chat_body(CLAUDE, "sync", 8))
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(**chat_body("gpt-4o-mini", "sync"))
    with pytest.raises(anthropic.RateLimitError):
        an.messages.create(**chat_body(CLAUDE, "sync", 8))
    stats = sim.sim.snapshot()
    assert stats["openai"]["ok"] == 2 and stats["openai"]["batch_requests"] == 6


def test_batch_queue_limit_refuses_with_each_providers_error(sim: SimServer) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        set_batch(sim, provider, queue_tokens=30, turnaround_s=2.0)
    oa, an = openai_client(sim), anthropic_client(sim)

    first = openai_batch(oa, "gpt-4o-mini", 3)  # 18 input tokens: under the limit
    refused = openai_batch(oa, "gpt-4o-mini", 6)  # 36 more: past it while the first is queued
    assert refused.status == "validating"
    failed = openai_ended(oa, refused.id)
    assert (
        failed.status == "failed"
        and failed.failed_at
        and failed.errors.data[0].code == "token_limit_exceeded"
    )
    assert oa.batches.retrieve(first.id).status != "failed"

    with pytest.raises(anthropic.RateLimitError) as info:
        anthropic_batch(an, 10)
    assert info.value.body["error"]["type"] == "rate_limit_error"

    too_big = gemini_batch(sim, 10)
    assert too_big.status_code == 429 and too_big.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    stats = sim.sim.snapshot()
    assert {p: stats[p]["batch_refused"] for p in ("openai", "anthropic", "gemini")} == dict.fromkeys(
        ("openai", "anthropic", "gemini"), 1
    )


def test_wrong_or_missing_key_is_refused_like_the_sync_endpoints(sim: SimServer) -> None:
    bad = openai_client(sim, key="bad-key")
    with pytest.raises(openai.AuthenticationError) as info:
        bad.batches.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.files.create(file=("in.jsonl", b"{}"), purpose="batch")
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic_client(sim, key="bad-key").messages.batches.list()
    assert denied.value.status_code == 401 and denied.value.body["error"]["type"] == "authentication_error"
    # Gemini answers a bad key 400 API_KEY_INVALID, batch or not, as the real API does.
    refused = gemini(sim, "GET", "batches", key="bad-key")
    assert refused.status_code == 400 and refused.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert HTTP.get(f"{sim.url}/gemini/v1beta/batches").status_code == 400  # no key at all
    assert sim.sim.snapshot()["openai"]["auth_error"] == 2


def test_stats_count_batches_and_reset_clears_them(sim: SimServer) -> None:
    oa, an = openai_client(sim), anthropic_client(sim)
    o_id = openai_batch(oa, "gpt-4o-mini", 3).id
    a_id = anthropic_batch(an, 2).id
    gemini_batch(sim, 4)
    stats = HTTP.get(f"{sim.url}/_sim/stats").json()
    assert {
        p: (stats[p]["batches_created"], stats[p]["batch_requests"])
        for p in ("openai", "anthropic", "gemini")
    } == {
        "openai": (1, 3),
        "anthropic": (1, 2),
        "gemini": (1, 4),
    }
    assert [b.id for b in oa.batches.list()] == [o_id]

    HTTP.post(f"{sim.url}/_sim/reset").raise_for_status()
    assert HTTP.get(f"{sim.url}/_sim/stats").json()["openai"].get("batches_created", 0) == 0
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve(o_id)
    with pytest.raises(anthropic.NotFoundError):
        an.messages.batches.retrieve(a_id)
    assert list(oa.batches.list()) == []


def test_openai_input_file_problems(sim: SimServer) -> None:
    client = openai_client(sim)
    duplicate = json.dumps(
        {
            "custom_id": "job-0",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat_body("gpt-4o-mini", "x"),
        }
    )
    failed = openai_ended(client, openai_batch(client, "gpt-4o-mini", 2, (duplicate, "not json")).id)
    assert failed.status == "failed" and failed.output_file_id is None
    assert [(e.code, e.line) for e in failed.errors.data] == [
        ("duplicate_custom_id", 3),
        ("invalid_json_line", 4),
    ]

    bad_body = json.dumps(
        {"custom_id": "no-messages", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    )
    unknown_model = json.dumps(
        {
            "custom_id": "typo",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat_body("gpt-4o-minj", "x"),
        }
    )
    done = openai_ended(client, openai_batch(client, "gpt-4o-mini", 1, (bad_body, unknown_model)).id)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (
        1,
        2,
    )
    statuses = {
        ln["custom_id"]: ln["response"]["status_code"] for ln in file_lines(client, done.error_file_id)
    }
    assert statuses == {"no-messages": 400, "typo": 404}

    with pytest.raises(openai.BadRequestError):
        client.batches.create(
            input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    page = client.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more and page.data[0].id == done.id  # newest first
    assert [b.id for b in client.batches.list(limit=1, after=done.id).data] == [failed.id]


def test_default_turnaround_and_batch_settings() -> None:
    defaults = sim_settings(parse_settings(BASE, "e2e.toml"))
    assert all(p.batch == BatchBehaviour() for p in defaults.providers.values())
    assert BatchBehaviour().turnaround_s == 5.0 and BatchBehaviour().queue_tokens is None

    server = start_in_thread(defaults)
    try:
        created = anthropic_client(server).messages.batches.create(
            requests=[{"custom_id": "a", "params": chat_body(CLAUDE, "x", 4)}]
        )
        batch = server.sim.batch_book.batch("anthropic", created.id)
        assert batch is not None and batch.ends_at - batch.created_at == pytest.approx(5.0)
        assert (
            anthropic_client(server).messages.batches.retrieve(created.id).processing_status == "in_progress"
        )
    finally:
        server.shutdown()
        server.server_close()

    tuned = sim_settings(
        parse_settings(
            BASE
            + "[simulator.batch]\nturnaround_s = 2\n"
            + "[simulator.providers.gemini]\nbatch = { error_rate = 0.25, queue_tokens = 1000 }\n",
            "t.toml",
        )
    )
    assert tuned.providers["openai"].batch == BatchBehaviour(turnaround_s=2.0)
    assert tuned.providers["gemini"].batch == BatchBehaviour(
        turnaround_s=2.0, error_rate=0.25, queue_tokens=1000
    )

    for bad, key in (
        ('batch = { turnaround_s = "fast" }', "simulator.providers.openai.batch.turnaround_s"),
        ("batch = { error_rate = 1.5 }", "simulator.providers.openai.batch.error_rate"),
        ("batch = { queue_tokens = 0 }", "simulator.providers.openai.batch.queue_tokens"),
        ("batch = { turnaround = 1 }", "simulator.providers.openai.batch.turnaround"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            sim_settings(parse_settings(BASE + f"[simulator.providers.openai]\n{bad}\n", "bad.toml"))
