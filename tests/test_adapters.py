"""Adapters against bodies and headers shaped exactly as each provider documents them
(httpx.MockTransport: no network). Fixtures quote shared/provider-protocols.md."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from workers.config import parse_settings
from workers.errors import (
    AuthError,
    BadRequest,
    ContextTooLong,
    FinalError,
    Overloaded,
    ProviderConnectionError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    ServerError,
)
from workers.messages import build_request
from workers.providers.transport import complete

CONFIG = """
[providers.openai]
api = "openai"
base_url = "https://api.openai.com/v1"
key_env = "OPENAI_API_KEY"
max_tokens_field = "max_completion_tokens"
[providers.openai.models."gpt-4o-mini"]
[providers.groq]
api = "openai"
signals = "groq"
base_url = "https://api.groq.com/openai/v1"
key_env = "GROQ_API_KEY"
[providers.groq.models."llama-3.3-70b-versatile"]
[providers.openrouter]
api = "openai"
signals = "none"
base_url = "https://openrouter.ai/api/v1"
key_env = "OPENROUTER_API_KEY"
headers = { "HTTP-Referer" = "https://example.com", "X-Title" = "Spillway" }
[providers.openrouter.models."m"]
[providers.ollama]
api = "openai"
signals = "none"
base_url = "http://localhost:11434/v1"
[providers.ollama.models."llama3.2"]
[providers.anthropic]
api = "anthropic"
base_url = "https://api.anthropic.com"
key_env = "ANTHROPIC_API_KEY"
[providers.anthropic.models."claude-haiku-4-5"]
[providers.gemini]
api = "gemini"
base_url = "https://generativelanguage.googleapis.com/v1beta"
key_env = "GEMINI_API_KEY"
daily_reset = "00:00 America/Los_Angeles"
[providers.gemini.models."gemini-2.0-flash"]
[routes."*"]
free = ["openai:gpt-4o-mini"]
"""
SETTINGS = parse_settings(CONFIG, "test.toml")
REQUEST = build_request(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ],
    max_tokens=20,
    temperature=1.5,
    stop=["END"],
)

OPENAI_OK = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Blue.", "refusal": None},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 13,
        "completion_tokens": 5,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}
ANTHROPIC_OK = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Blue."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 25,
        "output_tokens": 12,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 2,
    },
}
GEMINI_OK = {
    "candidates": [
        {
            "content": {"role": "model", "parts": [{"text": "hidden", "thought": True}, {"text": "Blue."}]},
            "finishReason": "MAX_TOKENS",
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 9,
        "candidatesTokenCount": 12,
        "thoughtsTokenCount": 3,
        "totalTokenCount": 24,
    },
}


def call(
    provider: str,
    status: int,
    body: Any,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
    key: str | None = "sk-test",
    seen: list | None = None,
):
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        content = raw if raw is not None else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers or {})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    config = SETTINGS.providers[provider]
    return complete(client, config, next(iter(config.models)), REQUEST, key, clock=lambda: 1000.0)


# -- requests ---------------------------------------------------------------------------------


def test_openai_request_shape() -> None:
    seen: list[httpx.Request] = []
    done = call("openai", 200, OPENAI_OK, seen=seen)
    req = seen[0]
    body = json.loads(req.content)
    assert str(req.url) == "https://api.openai.com/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test"
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_completion_tokens"] == 20 and "max_tokens" not in body
    assert body["temperature"] == 1.5 and body["stop"] == ["END"]
    assert (done.text, done.finish_reason, done.input_tokens, done.output_tokens) == ("Blue.", "stop", 13, 5)


def test_openai_family_quirks_live_in_config() -> None:
    seen: list[httpx.Request] = []
    call("groq", 200, OPENAI_OK, seen=seen)
    assert "max_tokens" in json.loads(seen[0].content)
    call("openrouter", 200, OPENAI_OK, seen=seen)
    assert seen[1].headers["http-referer"] == "https://example.com"
    assert seen[1].headers["x-title"] == "Spillway"
    call("ollama", 200, OPENAI_OK, key=None, seen=seen)
    assert "authorization" not in seen[2].headers
    assert str(seen[2].url) == "http://localhost:11434/v1/chat/completions"


def test_json_mode_per_format() -> None:
    json_request = build_request("Give JSON", max_tokens=10, json_mode=True)
    seen: list[httpx.Request] = []
    for provider, ok in (("openai", OPENAI_OK), ("anthropic", ANTHROPIC_OK), ("gemini", GEMINI_OK)):

        def handler(request: httpx.Request, ok: Any = ok) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, json=ok)

        config = SETTINGS.providers[provider]
        done = complete(
            httpx.Client(transport=httpx.MockTransport(handler)),
            config,
            next(iter(config.models)),
            json_request,
            "k",
        )
        if provider == "anthropic":
            assert done.text.startswith("{")  # the prefill is part of the answer
    bodies = [json.loads(r.content) for r in seen]
    assert bodies[0]["response_format"] == {"type": "json_object"}
    assert bodies[1]["messages"][-1] == {"role": "assistant", "content": "{"}
    assert bodies[2]["generationConfig"]["responseMimeType"] == "application/json"


def test_anthropic_request_shape() -> None:
    seen: list[httpx.Request] = []
    done = call("anthropic", 200, ANTHROPIC_OK, seen=seen)
    req = seen[0]
    body = json.loads(req.content)
    assert str(req.url) == "https://api.anthropic.com/v1/messages"
    assert req.headers["x-api-key"] == "sk-test" and req.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in req.headers
    assert body["system"] == "Be brief."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["max_tokens"] == 20 and body["temperature"] == 1.0  # clamped to Anthropic's 0–1
    assert body["stop_sequences"] == ["END"]
    # thinking blocks skipped; input = input + cache creation + cache read
    assert (done.text, done.finish_reason, done.input_tokens, done.output_tokens) == ("Blue.", "stop", 30, 12)


def test_gemini_request_shape() -> None:
    seen: list[httpx.Request] = []
    done = call("gemini", 200, GEMINI_OK, seen=seen)
    req = seen[0]
    body = json.loads(req.content)
    assert str(req.url) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
    )
    assert req.headers["x-goog-api-key"] == "sk-test"
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["generationConfig"] == {"maxOutputTokens": 20, "temperature": 1.5, "stopSequences": ["END"]}
    assert (done.text, done.finish_reason, done.input_tokens, done.output_tokens) == (
        "Blue.",
        "length",
        9,
        15,
    )


def test_gemini_blocked_prompt_is_a_content_filter_finish() -> None:
    done = call(
        "gemini", 200, {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}}
    )
    assert (done.text, done.finish_reason, done.input_tokens) == ("", "content_filter", 4)


# -- errors -----------------------------------------------------------------------------------


def test_openai_rate_limit_429_with_retry_after_ms() -> None:
    body = {
        "error": {
            "message": "Rate limit reached for gpt-4o-mini on tokens per min (TPM): Limit 30000, "
            "Used 29990, Requested 50. Please try again in 2s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(RateLimited) as info:
        call("openai", 429, body, {"retry-after-ms": "1500", "retry-after": "2"})
    assert info.value.retry_at_s == pytest.approx(1001.5) and not info.value.per_day


def test_openai_rate_limit_without_retry_after_uses_reset_of_empty_window_and_message() -> None:
    headers = {
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
    }
    body = {
        "error": {
            "message": "... Please try again in 5.289s. ...",
            "type": "tokens",
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(RateLimited) as info:
        call("openai", 429, body, headers)
    assert info.value.retry_at_s == pytest.approx(1360.0)  # the empty window's reset wins (later)


def test_openai_insufficient_quota_is_billing_not_rate_limit() -> None:
    body = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    with pytest.raises(QuotaExhausted):
        call("openai", 429, body)


def test_groq_daily_request_limit_blocks_until_the_daily_reset() -> None:
    headers = {
        "x-ratelimit-limit-requests": "14400",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2m59.56s",
        "x-ratelimit-limit-tokens": "18000",
        "x-ratelimit-remaining-tokens": "17997",
        "x-ratelimit-reset-tokens": "7.66s",
    }
    body = {
        "error": {
            "message": "Rate limit reached for model `llama-3.3-70b-versatile` on requests per day (RPD): "
            "Limit 14400, Used 14400, Requested 1. Please try again in 2m59.56s.",
            "type": "requests",
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(RateLimited) as info:
        call("groq", 429, body, {**headers, "retry-after": "180"})
    assert info.value.per_day and info.value.retry_at_s == pytest.approx(1180.0)
    windows = {w.unit: w for w in info.value.signal.windows}
    assert windows["requests"].period == "day" and windows["tokens"].period == "minute"


def test_anthropic_errors() -> None:
    def err(kind: str, **extra: Any) -> dict:
        return {"type": "error", "error": {"type": kind, "message": "m", **extra}, "request_id": "req_1"}

    with pytest.raises(RateLimited) as info:
        call("anthropic", 429, err("rate_limit_error"), {"retry-after": "7"})
    assert info.value.retry_at_s == pytest.approx(1007.0)
    with pytest.raises(QuotaExhausted) as spend:
        call(
            "anthropic", 429, err("rate_limit_error", details={"error_code": "enforced_spend_limit_reached"})
        )
    assert spend.value.retry_at_s == pytest.approx(2678400.0)  # 1970-02-01 00:00 UTC, the next month
    with pytest.raises(Overloaded):
        call("anthropic", 529, err("overloaded_error"))
    with pytest.raises(AuthError):
        call("anthropic", 401, err("authentication_error"))
    with pytest.raises(QuotaExhausted):
        call(
            "anthropic",
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "You have reached your specified workspace API usage limits.",
                },
            },
        )
    with pytest.raises(ContextTooLong):
        call(
            "anthropic",
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "prompt is too long: 210000 tokens > 200000 maximum",
                },
            },
        )


def test_gemini_429_body_retry_info_and_daily_quota() -> None:
    def body(quota_id: str, delay: str = "47s") -> dict:
        return {
            "error": {
                "code": 429,
                "message": "You exceeded your current quota",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/x",
                                "quotaId": quota_id,
                                "quotaDimensions": {"model": "gemini-2.0-flash"},
                            }
                        ],
                    },
                    {"@type": "type.googleapis.com/google.rpc.Help", "links": []},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
                ],
            }
        }

    with pytest.raises(RateLimited) as minute:
        call("gemini", 429, body("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "1.5s"))
    assert minute.value.retry_at_s == pytest.approx(1001.5) and not minute.value.per_day
    with pytest.raises(RateLimited) as day:
        call("gemini", 429, body("GenerateRequestsPerDayPerProjectPerModel-FreeTier"))
    # 1000 s after the epoch is 1969-12-31 16:16 in Los Angeles: the next Pacific midnight is 08:00 UTC
    assert day.value.per_day and day.value.retry_at_s == pytest.approx(8 * 3600)
    with pytest.raises(RateLimited) as bare:
        call(
            "gemini",
            429,
            {
                "error": {
                    "code": 429,
                    "message": "Resource has been exhausted (e.g. check quota).",
                    "status": "RESOURCE_EXHAUSTED",
                }
            },
        )
    assert bare.value.retry_at_s == pytest.approx(1002.0)  # no hint: a short backoff, then probe
    with pytest.raises(AuthError):
        call(
            "gemini",
            400,
            {
                "error": {
                    "code": 400,
                    "message": "API key not valid.",
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
                    ],
                }
            },
        )
    with pytest.raises(Overloaded):
        call("gemini", 503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequest),
        (404, BadRequest),
        (422, BadRequest),
        (401, AuthError),
        (403, AuthError),
        (402, QuotaExhausted),
        (413, ContextTooLong),
        (500, ServerError),
        (502, ServerError),
        (503, Overloaded),
        (504, ProviderTimeout),
        (408, ProviderTimeout),
    ],
)
def test_status_mapping(status: int, error: type) -> None:
    with pytest.raises(error):
        call("openai", status, {"error": {"message": "x", "type": "t", "code": None}})


def test_context_length_exceeded_and_x_should_retry_false() -> None:
    with pytest.raises(ContextTooLong):
        call(
            "openai",
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 128000 tokens.",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            },
        )
    with pytest.raises(FinalError) as info:
        call("openai", 500, {"error": {"message": "no"}}, {"x-should-retry": "false"})
    assert not isinstance(info.value, ServerError)


def test_malformed_bodies_are_server_errors() -> None:
    with pytest.raises(ServerError, match="malformed JSON"):
        call("openai", 200, None, raw=b'{"choices": [')
    with pytest.raises(ServerError, match="shape"):
        call("openai", 200, {"choices": []})
    with pytest.raises(ServerError):
        call("gemini", 200, {"candidates": []})


def test_transport_errors_are_translated_in_one_place() -> None:
    config = SETTINGS.providers["openai"]

    def raises(exc: Exception):
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc

        return httpx.Client(transport=httpx.MockTransport(handler))

    with pytest.raises(ProviderTimeout) as timeout:
        complete(raises(httpx.ReadTimeout("slow")), config, "gpt-4o-mini", REQUEST, "k")
    assert isinstance(timeout.value.__cause__, httpx.ReadTimeout)
    with pytest.raises(ProviderConnectionError):
        complete(raises(httpx.ConnectError("refused")), config, "gpt-4o-mini", REQUEST, "k")
    with pytest.raises(ProviderConnectionError):
        complete(raises(httpx.RemoteProtocolError("reset")), config, "gpt-4o-mini", REQUEST, "k")


def test_success_signal_carries_remaining_budget() -> None:
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    done = call("openai", 200, OPENAI_OK, headers)
    windows = {w.unit: w for w in done.signal.windows}
    assert windows["tokens"].remaining == 149984 and windows["tokens"].reset_at_s == pytest.approx(1360.0)
