"""Batch adapters: over real sockets against the simulator's batch APIs (every format: answers
equal to the synchronous endpoint's, partial failures, expiry, cancel, auth, queue refusals),
and with httpx.MockTransport against bodies shaped as the providers document them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.conftest import BATCH_SIM_CONFIG, CONFIGS
from workers.config import ProviderConfig, parse_settings
from workers.errors import (
    AuthError,
    BadRequest,
    InputError,
    Overloaded,
    ProviderConnectionError,
    ProviderTimeout,
    RateLimited,
    RetryableError,
    ServerError,
)
from workers.messages import ChatRequest, build_request
from workers.providers.base import ADAPTERS
from workers.providers.batch import (
    BATCH_ADAPTERS,
    BatchAdapter,
    BatchItem,
    BatchNotEnded,
    BatchState,
    ItemResult,
    batch_adapter,
)
from workers.providers.batch.anthropic import AnthropicBatches
from workers.providers.batch.base import ENVELOPE_BYTES
from workers.providers.batch.gemini import GeminiBatches
from workers.providers.batch.openai import OpenAIBatches
from workers.providers.transport import complete
from workers.simulator import SimServer

WAIT_S = 10.0  # the most a test waits for a batch to end (turnarounds are 0.5-2 s)
KEY = "sk-batch-test"
BASE = (CONFIGS / "e2e.toml").read_text()
MODELS = {
    "openai": "gpt-4o-mini",
    "groq": "llama-3.3-70b-versatile",
    "anthropic": "claude-haiku-4-5",
    "gemini": "gemini-2.0-flash",
}
THREE = ("openai", "anthropic", "gemini")


@pytest.fixture
def sim(batch_sim: SimServer) -> SimServer:
    return batch_sim


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def providers(sim: SimServer) -> dict[str, ProviderConfig]:
    return parse_settings(BATCH_SIM_CONFIG, "batch.toml", simulator_url=sim.url).providers


def set_batch(sim: SimServer, provider: str, **changes: Any) -> None:
    config = sim.sim.settings.providers[provider]
    config.batch = replace(config.batch, **changes)


def make_items(count: int, prefix: str = "job") -> list[BatchItem]:
    """Plain prompts, plus one with a system message and one in JSON mode (Anthropic's prefill)."""
    items = []
    for i in range(count):
        extra: dict[str, Any] = {"system": "Be brief."} if i == 1 else {}
        request = build_request(f"question {i}", max_tokens=12, json_mode=i == 2, **extra)
        items.append(BatchItem(f"{prefix}-{i}", request))
    return items


EMPTY = ChatRequest(messages=(), max_tokens=8)  # every simulated format refuses no messages (400)


def wait_ended(
    adapter: BatchAdapter, http: httpx.Client, provider: ProviderConfig, batch_id: str
) -> BatchState:
    return wait_for(
        lambda: adapter.state(http, provider, KEY, batch_id), lambda s: s.ended, "the batch to end"
    )


def wait_for(read: Callable[[], Any], done: Callable[[Any], bool], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = read()
        if done(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")


def by_outcome(results: list[ItemResult]) -> dict[str, list[ItemResult]]:
    out: dict[str, list[ItemResult]] = {}
    for result in results:
        out.setdefault(result.outcome, []).append(result)
    return out


# -- over real sockets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["openai", "groq", "anthropic", "gemini"])
def test_every_item_is_answered_once_like_the_sync_endpoint(
    sim: SimServer, http: httpx.Client, name: str
) -> None:
    provider, model = providers(sim)[name], MODELS[name]
    adapter = batch_adapter(provider)
    items = make_items(5)
    batch_id = adapter.submit(http, provider, KEY, model, items, metadata={"spillway_run": "test"})
    first = adapter.state(http, provider, KEY, batch_id)
    assert not first.ended and first.total == 5 and first.failed_whole is None

    done = wait_ended(adapter, http, provider, batch_id)
    assert (done.done, done.total, done.failed_whole) == (5, 5, None)
    results = adapter.results(http, provider, KEY, batch_id, items)
    assert [r.custom_id for r in results] == [i.custom_id for i in items]
    for item, result in zip(items, results, strict=True):
        sync = complete(http, provider, model, item.request, KEY)
        assert result.outcome == "succeeded" and result.error is None
        assert (result.text, result.finish_reason) == (sync.text, sync.finish_reason)
        assert (result.input_tokens, result.output_tokens) == (sync.input_tokens, sync.output_tokens)
    assert results[2].text.startswith("{")  # JSON mode, Anthropic's prefill put back


@pytest.mark.parametrize("name", THREE)
def test_partial_failures_come_back_classified(sim: SimServer, http: httpx.Client, name: str) -> None:
    set_batch(sim, name, error_rate=0.5)
    provider, model = providers(sim)[name], MODELS[name]
    adapter = batch_adapter(provider)
    items = [*make_items(10), BatchItem("no-messages", EMPTY)]
    batch_id = adapter.submit(http, provider, KEY, model, items)
    wait_ended(adapter, http, provider, batch_id)

    results = {r.custom_id: r for r in adapter.results(http, provider, KEY, batch_id, items)}
    assert sorted(results) == sorted(i.custom_id for i in items)
    refused = results.pop("no-messages")
    assert refused.outcome == "failed" and type(refused.error) is BadRequest  # final: never retried
    outcomes = by_outcome(list(results.values()))
    assert set(outcomes) == {"succeeded", "failed"}
    for failed in outcomes["failed"]:
        assert isinstance(failed.error, ServerError) and failed.error.provider == name  # retryable
    assert all(r.text and r.output_tokens for r in outcomes["succeeded"])


@pytest.mark.parametrize("name", THREE)
def test_expired_batch_gives_expired_for_the_unanswered(
    sim: SimServer, http: httpx.Client, name: str
) -> None:
    set_batch(sim, name, expire_rate=1.0)
    provider, model = providers(sim)[name], MODELS[name]
    adapter = batch_adapter(provider)
    items = make_items(4)
    batch_id = adapter.submit(http, provider, KEY, model, items)
    state = wait_ended(adapter, http, provider, batch_id)
    assert state.status == {"openai": "expired", "anthropic": "ended", "gemini": "BATCH_STATE_EXPIRED"}[name]

    outcomes = [r.outcome for r in adapter.results(http, provider, KEY, batch_id, items)]
    if name == "gemini":  # the guide: an expired job "will not have any results to retrieve"
        assert outcomes == ["expired"] * 4
    else:  # the simulator answers the first half before the window closes
        assert outcomes == ["succeeded", "succeeded", "expired", "expired"]


@pytest.mark.parametrize("name", THREE)
def test_cancel_mid_way_keeps_answered_results(sim: SimServer, http: httpx.Client, name: str) -> None:
    set_batch(sim, name, turnaround_s=4.0)  # answers 0.4-3.6 s after the create
    provider, model = providers(sim)[name], MODELS[name]
    adapter = batch_adapter(provider)
    items = make_items(10)
    batch_id = adapter.submit(http, provider, KEY, model, items)
    if name == "anthropic":  # its counts stay zero until the batch ends: wait by the clock
        time.sleep(1.0)
    else:
        wait_for(lambda: adapter.state(http, provider, KEY, batch_id), lambda s: s.done >= 1, "an answer")

    adapter.cancel(http, provider, KEY, batch_id)  # cancelling takes a while: poll until ended
    wait_ended(adapter, http, provider, batch_id)
    adapter.cancel(http, provider, KEY, batch_id)  # an ended batch: harmless

    outcomes = by_outcome(adapter.results(http, provider, KEY, batch_id, items))
    assert set(outcomes) == {"succeeded", "cancelled"}
    assert len(outcomes["succeeded"]) + len(outcomes["cancelled"]) == 10
    assert all(r.error is None and not r.text for r in outcomes["cancelled"])


@pytest.mark.parametrize("name", THREE)
def test_wrong_key_raises_auth_error(sim: SimServer, http: httpx.Client, name: str) -> None:
    provider = providers(sim)[name]
    adapter = batch_adapter(provider)
    with pytest.raises(AuthError) as refused:
        adapter.submit(http, provider, "bad-secret-key", MODELS[name], make_items(2))
    assert "bad-secret-key" not in str(refused.value) and "question" not in str(refused.value)
    batch_id = adapter.submit(http, provider, KEY, MODELS[name], make_items(2))
    with pytest.raises(AuthError):
        adapter.state(http, provider, "bad-secret-key", batch_id)


@pytest.mark.parametrize("name", THREE)
def test_batch_queue_limit(sim: SimServer, http: httpx.Client, name: str) -> None:
    set_batch(sim, name, queue_tokens=30)  # six items of about six input tokens each pass it
    provider, model = providers(sim)[name], MODELS[name]
    adapter = batch_adapter(provider)
    items = make_items(6)
    if name != "openai":  # refused at create time, with the format's 429
        with pytest.raises(RateLimited) as refused:
            adapter.submit(http, provider, KEY, model, items)
        assert refused.value.retry_at_s is not None and refused.value.provider == name
        return
    batch_id = adapter.submit(http, provider, KEY, model, items)  # OpenAI: accepted, then failed
    state = wait_ended(adapter, http, provider, batch_id)
    assert state.status == "failed" and "token_limit_exceeded" in (state.failed_whole or "")
    results = adapter.results(http, provider, KEY, batch_id, items)
    assert [r.outcome for r in results] == ["failed"] * 6
    assert all(isinstance(r.error, RateLimited) for r in results)  # the queue frees up: later


def test_results_before_the_end_raise(sim: SimServer, http: httpx.Client) -> None:
    set_batch(sim, "anthropic", turnaround_s=30.0)
    provider = providers(sim)["anthropic"]
    adapter = batch_adapter(provider)
    items = make_items(1)
    batch_id = adapter.submit(http, provider, KEY, MODELS["anthropic"], items)
    with pytest.raises(BatchNotEnded, match="has not ended"):
        adapter.results(http, provider, KEY, batch_id, items)
    adapter.cancel(http, provider, KEY, batch_id)


# -- split and local checks -------------------------------------------------------------------


SETTINGS = parse_settings(BASE, "batch.toml")


@pytest.mark.parametrize("name", THREE)
def test_split_respects_count_and_byte_limits(name: str) -> None:
    base = type(BATCH_ADAPTERS[name])
    provider, model = SETTINGS.providers[name], MODELS[name]
    sizes = [10, 400, 30, 30, 30, 3000, 10, 10, 10, 10]
    items = [BatchItem(f"job-{i}", build_request("x" * n, max_tokens=8)) for i, n in enumerate(sizes)]
    line = base().item_line(provider, model, items[0])

    class Small(base):
        max_requests = 3
        max_bytes = ENVELOPE_BYTES + 3 * (len(line) + 1) + 500

    small = Small()
    chunks = small.split(items, provider, model)
    assert [i for chunk in chunks for i in chunk] == items  # every item once, in order
    for chunk in chunks:
        size = sum(len(small.item_line(provider, model, i)) + 1 for i in chunk) + ENVELOPE_BYTES
        assert len(chunk) <= 3
        assert size <= Small.max_bytes or len(chunk) == 1  # too big alone: a chunk of its own
    # Full at three; then "job-5" does not fit beside two others, and alone passes the limit.
    assert [len(c) for c in chunks] == [3, 2, 1, 3, 1] and chunks[2] == [items[5]]

    never = httpx.Client(transport=httpx.MockTransport(lambda r: pytest.fail(f"sent {r.url}")))
    with pytest.raises(InputError, match="at most 3"):
        small.submit(never, provider, KEY, model, items[6:])
    with pytest.raises(InputError, match="split first"):
        small.submit(never, provider, KEY, model, [items[5]])
    with pytest.raises(InputError, match="twice"):
        small.submit(never, provider, KEY, model, [items[0], items[0]])
    with pytest.raises(InputError, match="at least one"):
        small.submit(never, provider, KEY, model, [])


def test_documented_limits_and_registry() -> None:
    assert (OpenAIBatches.max_requests, OpenAIBatches.max_bytes) == (50_000, 200_000_000)
    assert (AnthropicBatches.max_requests, AnthropicBatches.max_bytes) == (100_000, 256_000_000)
    assert GeminiBatches.max_bytes == 20_000_000
    assert batch_adapter(SETTINGS.providers["groq"]) is BATCH_ADAPTERS["openai"]
    odd = ProviderConfig(name="cohere-eu", api="cohere", base_url="https://example.invalid")
    with pytest.raises(InputError, match="cohere-eu"):
        batch_adapter(odd)
    anthropic = SETTINGS.providers["anthropic"]
    with pytest.raises(InputError, match="custom_id"):
        BATCH_ADAPTERS["anthropic"].item_line(anthropic, "m", BatchItem("job/1", make_items(1)[0].request))


# -- documented shapes over httpx.MockTransport -----------------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def mock(routes: dict[tuple[str, str], Any], seen: list[httpx.Request] | None = None) -> httpx.Client:
    """A client answering (method, path) from `routes`: a dict/list is JSON, bytes raw, a
    Response as is, an exception is raised."""

    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        answer = routes.get((request.method, request.url.path))
        if answer is None:
            return httpx.Response(404, json={"error": {"message": f"no route {request.url.path}"}})
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        if isinstance(answer, bytes):
            return httpx.Response(200, content=answer)
        return httpx.Response(200, json=answer)

    return httpx.Client(transport=httpx.MockTransport(handle))


def jsonl(*lines: Any) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def ids(*names: str) -> list[BatchItem]:
    return [BatchItem(name, build_request(f"prompt of {name}", max_tokens=16)) for name in names]


CHAT_COMPLETION = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "created": 1711652795,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there."},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24},
}


def test_openai_files_and_lines_as_documented() -> None:
    provider = SETTINGS.providers["groq"]  # OpenAI-compatible: its own base URL and prefix
    items = ids("ok", "bad-shape", "refused", "timed-out", "expired", "missing")
    batch = {
        "id": "batch_abc123",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "status": "completed",
        "output_file_id": "file-out",
        "error_file_id": "file-err",
        "request_counts": {"total": 6, "completed": 2, "failed": 3},
        "errors": None,
    }
    output = jsonl(
        {
            "id": "batch_req_1",
            "custom_id": "ok",
            "response": {"status_code": 200, "request_id": "req_1", "body": CHAT_COMPLETION},
            "error": None,
        },
        {
            "id": "batch_req_2",
            "custom_id": "bad-shape",
            "response": {"status_code": 200, "request_id": "req_2", "body": {"object": "chat.completion"}},
            "error": None,
        },
        {"id": "batch_req_9", "custom_id": "someone-else", "response": None, "error": None},
        b"this line is not JSON",
    )
    errors = jsonl(
        {
            "id": "batch_req_3",
            "custom_id": "refused",
            "response": {
                "status_code": 400,
                "request_id": "req_3",
                "body": {
                    "error": {
                        "message": "Invalid 'messages': empty array.",
                        "type": "invalid_request_error",
                        "param": "messages",
                        "code": "empty_array",
                    }
                },
            },
            "error": None,
        },
        {
            "id": "batch_req_4",
            "custom_id": "timed-out",
            "response": None,
            "error": {"code": "request_timeout", "message": "The underlying call to the model timed out."},
        },
        {
            "id": "batch_req_5",
            "custom_id": "expired",
            "response": None,
            "error": {
                "code": "batch_expired",
                "message": "This request could not be executed before the completion window expired.",
            },
        },
    )
    seen: list[httpx.Request] = []
    prefix = "/openai/v1"
    client = mock(
        {
            ("POST", f"{prefix}/files"): {"id": "file-in", "object": "file", "purpose": "batch"},
            ("POST", f"{prefix}/batches"): {**batch, "status": "validating"},
            ("GET", f"{prefix}/batches/batch_abc123"): batch,
            ("GET", f"{prefix}/files/file-out/content"): output,
            ("GET", f"{prefix}/files/file-err/content"): errors,
        },
        seen,
    )
    adapter = BATCH_ADAPTERS["openai"]
    assert adapter.submit(client, provider, KEY, MODELS["groq"], items, metadata={"k": "v"}) == "batch_abc123"
    upload, create = seen
    assert str(upload.url) == "https://api.groq.com/openai/v1/files"
    assert upload.headers["authorization"] == f"Bearer {KEY}"
    assert upload.headers["content-type"].startswith("multipart/form-data")
    content = upload.read()
    assert b'name="purpose"\r\n\r\nbatch' in content
    first = json.loads(next(line for line in content.splitlines() if line.startswith(b'{"custom_id"')))
    assert first == {
        "custom_id": "ok",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": ADAPTERS["openai"].body(provider, MODELS["groq"], items[0].request),
    }
    assert json.loads(create.content) == {
        "input_file_id": "file-in",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v"},
    }

    assert adapter.state(client, provider, KEY, "batch_abc123") == BatchState(True, "completed", 5, 6)
    results = {r.custom_id: r for r in adapter.results(client, provider, KEY, "batch_abc123", items)}
    assert results["ok"] == ItemResult("ok", "succeeded", "Hello there.", "stop", 22, 2)
    assert type(results["bad-shape"].error) is ServerError and "shape" in results["bad-shape"].error.message
    assert type(results["refused"].error) is BadRequest and results["refused"].error.status == 400
    assert type(results["timed-out"].error) is ProviderTimeout
    assert results["expired"].outcome == "expired" and results["expired"].error is None
    assert results["missing"].outcome == "failed" and type(results["missing"].error) is ServerError


def test_openai_failed_validation_is_a_whole_batch_failure() -> None:
    provider = SETTINGS.providers["openai"]
    batch = {
        "id": "batch_x",
        "status": "failed",
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "errors": {
            "object": "list",
            "data": [{"code": "invalid_json_line", "message": "This line is not valid JSON.", "line": 2}],
        },
    }
    client = mock({("GET", "/v1/batches/batch_x"): batch})
    adapter = BATCH_ADAPTERS["openai"]
    state = adapter.state(client, provider, KEY, "batch_x")
    assert state.ended and state.failed_whole == "invalid_json_line (line 2): This line is not valid JSON."
    [result] = adapter.results(client, provider, KEY, "batch_x", ids("a"))
    assert type(result.error) is BadRequest  # our file was wrong: sending it again will not help


def test_anthropic_results_as_documented() -> None:
    provider = SETTINGS.providers["anthropic"]
    items = ids("ok", "invalid", "server", "busy", "canceled", "expired", "json")
    items[-1] = BatchItem("json", build_request("answer in JSON", max_tokens=16, json_mode=True))
    batch = {
        "id": "msgbatch_01",
        "type": "message_batch",
        "processing_status": "ended",
        "request_counts": {"processing": 0, "succeeded": 2, "errored": 3, "canceled": 1, "expired": 1},
        "results_url": "https://files.example.net/v1/messages/batches/msgbatch_01/results",  # off-origin
    }

    def message(text: str) -> dict[str, Any]:
        return {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 3},
        }

    def error(kind: str, text: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": kind, "message": text}, "request_id": "req_011"}

    lines = jsonl(
        {"custom_id": "json", "result": {"type": "succeeded", "message": message('"a": 1}')}},
        {
            "custom_id": "invalid",
            "result": {"type": "errored", "error": error("invalid_request_error", "bad")},
        },
        {"custom_id": "server", "result": {"type": "errored", "error": error("api_error", "Internal")}},
        {
            "custom_id": "busy",
            "result": {"type": "errored", "error": error("overloaded_error", "Overloaded")},
        },
        {"custom_id": "canceled", "result": {"type": "canceled"}},
        {"custom_id": "expired", "result": {"type": "expired"}},
        {"custom_id": "ok", "result": {"type": "succeeded", "message": message("Hi.")}},
    )
    seen: list[httpx.Request] = []
    client = mock(
        {
            ("POST", "/v1/messages/batches"): {**batch, "processing_status": "in_progress"},
            ("GET", "/v1/messages/batches/msgbatch_01"): batch,
            ("GET", "/v1/messages/batches/msgbatch_01/results"): lines,
        },
        seen,
    )
    adapter = BATCH_ADAPTERS["anthropic"]
    assert adapter.submit(client, provider, KEY, MODELS["anthropic"], items) == "msgbatch_01"
    create = seen[0]
    assert create.headers["x-api-key"] == KEY and create.headers["anthropic-version"]
    sent = json.loads(create.content)["requests"]
    assert sent[0] == {
        "custom_id": "ok",
        "params": ADAPTERS["anthropic"].body(provider, MODELS["anthropic"], items[0].request),
    }

    assert adapter.state(client, provider, KEY, "msgbatch_01") == BatchState(True, "ended", 7, 7)
    results = {r.custom_id: r for r in adapter.results(client, provider, KEY, "msgbatch_01", items)}
    assert all(r.url.host == "api.anthropic.com" for r in seen)  # the key never left the origin
    assert results["ok"] == ItemResult("ok", "succeeded", "Hi.", "stop", 10, 3)
    assert results["json"].text == '{"a": 1}'  # the prefill, put back as the sync parser does
    assert type(results["invalid"].error) is BadRequest
    assert type(results["server"].error) is ServerError
    assert type(results["busy"].error) is Overloaded
    assert (results["canceled"].outcome, results["expired"].outcome) == ("cancelled", "expired")


def test_gemini_inline_responses_as_documented() -> None:
    provider = SETTINGS.providers["gemini"]
    items = ids("ok", "invalid", "quota", "no-metadata", "odd")
    answer = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "Blue."}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 2, "totalTokenCount": 9},
    }
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}
    inline = [
        {"response": answer, "metadata": {"key": "ok"}},
        {
            "error": {"code": 3, "message": "Request contains an invalid argument."},
            "metadata": {"key": "invalid"},
        },
        {
            "error": {"code": 8, "message": "Resource exhausted.", "details": [retry]},
            "metadata": {"key": "quota"},
        },
        {"response": answer},  # no metadata: the documented order says "no-metadata"
        {"response": {"modelVersion": "gemini-2.0-flash"}, "metadata": {"key": "odd"}},
    ]
    operation = {
        "name": "batches/abc123",
        "metadata": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "model": "models/gemini-2.0-flash",
            "state": "BATCH_STATE_SUCCEEDED",
            "batchStats": {"requestCount": "5", "successfulRequestCount": "3", "failedRequestCount": "2"},
            "output": {"inlinedResponses": {"inlinedResponses": inline}},
        },
        "done": True,
        "response": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput",
            "inlinedResponses": {"inlinedResponses": inline},
        },
    }
    seen: list[httpx.Request] = []
    client = mock(
        {
            ("POST", "/v1beta/models/gemini-2.0-flash:batchGenerateContent"): {"name": "batches/abc123"},
            ("GET", "/v1beta/batches/abc123"): operation,
        },
        seen,
    )
    adapter = BATCH_ADAPTERS["gemini"]
    assert adapter.submit(client, provider, KEY, MODELS["gemini"], items) == "batches/abc123"
    create = json.loads(seen[0].content)
    assert seen[0].headers["x-goog-api-key"] == KEY
    assert create["batch"]["displayName"]
    assert create["batch"]["inputConfig"]["requests"]["requests"][0] == {
        "request": ADAPTERS["gemini"].body(provider, MODELS["gemini"], items[0].request),
        "metadata": {"key": "ok"},
    }

    assert adapter.state(client, provider, KEY, "batches/abc123") == BatchState(
        True, "BATCH_STATE_SUCCEEDED", 5, 5
    )
    before = time.time()
    results = {r.custom_id: r for r in adapter.results(client, provider, KEY, "batches/abc123", items)}
    assert results["ok"] == ItemResult("ok", "succeeded", "Blue.", "stop", 7, 2)
    assert results["no-metadata"] == ItemResult("no-metadata", "succeeded", "Blue.", "stop", 7, 2)
    assert type(results["invalid"].error) is BadRequest
    quota = results["quota"].error
    assert isinstance(quota, RateLimited) and quota.retry_at_s == pytest.approx(before + 30, abs=5)
    assert type(results["odd"].error) is ServerError  # no candidates: not the documented shape


def test_gemini_failed_and_cancelled_operations() -> None:
    provider = SETTINGS.providers["gemini"]
    failed = {
        "name": "batches/f",
        "metadata": {"state": "BATCH_STATE_FAILED", "batchStats": {"requestCount": "2"}},
        "done": True,
        "error": {"code": 3, "message": "Invalid input config."},
    }
    cancelled = {
        "name": "batches/c",
        "metadata": {
            "state": "BATCH_STATE_CANCELLED",
            "output": {
                "inlinedResponses": {
                    "inlinedResponses": [
                        {"error": {"code": 1, "message": "Cancelled."}, "metadata": {"key": "a"}},
                    ]
                }
            },
        },
        "done": True,
        "error": {"code": 1, "message": "The batch was cancelled."},
    }
    client = mock({("GET", "/v1beta/batches/f"): failed, ("GET", "/v1beta/batches/c"): cancelled})
    adapter = BATCH_ADAPTERS["gemini"]
    assert adapter.state(client, provider, KEY, "f").failed_whole == "Invalid input config."
    assert [type(r.error) for r in adapter.results(client, provider, KEY, "f", ids("a", "b"))] == [
        BadRequest
    ] * 2
    state = adapter.state(client, provider, KEY, "batches/c")
    assert state.ended and state.failed_whole is None
    assert [r.outcome for r in adapter.results(client, provider, KEY, "c", ids("a", "b"))] == [
        "cancelled"
    ] * 2


ENDPOINT_PATHS = {
    "openai": "/v1/batches/b1",
    "anthropic": "/v1/messages/batches/b1",
    "gemini": "/v1beta/batches/b1",
}
ENDPOINT_FAILURES = [
    (
        httpx.Response(401, json={"error": {"message": "Invalid API key.", "type": "authentication_error"}}),
        AuthError,
    ),
    (
        httpx.Response(429, headers={"retry-after": "7"}, json={"error": {"message": "Slow down."}}),
        RateLimited,
    ),
    (httpx.Response(500, json={"error": {"message": "Internal error."}}), ServerError),
    (httpx.Response(503, json={"error": {"message": "Unavailable."}}), Overloaded),
    (httpx.Response(200, content=b"<html>gateway</html>"), ServerError),
    (httpx.ReadTimeout("read timed out"), ProviderTimeout),
    (httpx.ConnectError("connection refused"), ProviderConnectionError),
]


@pytest.mark.parametrize("name", THREE)
@pytest.mark.parametrize(("answer", "raised"), ENDPOINT_FAILURES)
def test_batch_endpoint_failures_raise_the_sync_errors(name: str, answer: Any, raised: type) -> None:
    provider = SETTINGS.providers[name]
    client = mock({("GET", ENDPOINT_PATHS[name]): answer})
    before = time.time()
    with pytest.raises(raised) as info:
        BATCH_ADAPTERS[name].state(client, provider, KEY, "b1")
    assert info.value.provider == name and KEY not in str(info.value)
    if raised is RateLimited:
        assert info.value.retry_at_s == pytest.approx(before + 7, abs=2)  # Retry-After honoured
    assert issubclass(raised, RetryableError) == (raised is not AuthError)
