"""Header and duration parsers, table-driven over every example in provider-protocols.md."""

from __future__ import annotations

import logging

import pytest

from workers.providers import signals
from workers.providers.signals import SIGNAL_PARSERS
from workers.providers.timeparse import (
    parse_duration_s,
    parse_http_date_s,
    parse_retry_after_s,
    parse_rfc3339_s,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("12ms", 0.012),
        ("2ms", 0.002),
        ("11m32.334s", 692.334),
        ("2m59.56s", 179.56),
        ("7.66s", 7.66),
        ("1h2m3s", 3723.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("47s", 47.0),  # Gemini RetryInfo.retryDelay
        ("2", 2.0),
        ("0.5", 0.5),
        ("60", 60.0),  # retry-after, Azure's integer resets
        ("250us", 0.00025),
        ("0s", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5x", "m5", "1s2", "-3", "nan", "inf", "1..2s", None])
def test_unreadable_durations_are_none(text: str | None) -> None:
    assert parse_duration_s(text) is None


def test_times() -> None:
    assert parse_rfc3339_s("2025-08-21T12:40:59Z") == 1755780059.0
    assert parse_rfc3339_s("2025-08-21T14:40:59+02:00") == 1755780059.0
    assert parse_rfc3339_s("2025-08-21T12:40:59.5Z") == 1755780059.5
    assert parse_rfc3339_s("2025-08-21 12:40:59") is None  # no zone: not RFC 3339
    assert parse_http_date_s("Wed, 21 Oct 2015 07:28:00 GMT") == 1445412480.0
    assert parse_retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert parse_retry_after_s("3", 0) == 3.0


def test_openai_headers() -> None:
    headers = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    s = SIGNAL_PARSERS["openai"](headers, None, 100.0)
    by_unit = {w.unit: w for w in s.windows}
    assert by_unit["requests"].limit == 60 and by_unit["requests"].remaining == 59
    assert by_unit["requests"].reset_at_s == 101.0 and by_unit["tokens"].reset_at_s == 460.0
    assert {w.period for w in s.windows} == {"unknown"}  # OpenAI does not say minute or day


def test_groq_headers_mean_requests_per_day_and_tokens_per_minute() -> None:
    headers = {
        "retry-after": "2",
        "x-ratelimit-limit-requests": "14400",
        "x-ratelimit-remaining-requests": "14370",
        "x-ratelimit-reset-requests": "2m59.56s",
        "x-ratelimit-limit-tokens": "18000",
        "x-ratelimit-remaining-tokens": "17997",
        "x-ratelimit-reset-tokens": "7.66s",
    }
    s = SIGNAL_PARSERS["groq"](headers, None, 0.0)
    by_unit = {w.unit: w for w in s.windows}
    assert by_unit["requests"].period == "day" and by_unit["tokens"].period == "minute"
    assert by_unit["requests"].reset_at_s == pytest.approx(179.56)
    assert s.retry_after_s == 2.0 and not s.per_day


def test_anthropic_headers() -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "1000",
        "anthropic-ratelimit-requests-remaining": "999",
        "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:59Z",
        "anthropic-ratelimit-input-tokens-limit": "80000",
        "anthropic-ratelimit-input-tokens-remaining": "80000",
        "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:59Z",
        "anthropic-ratelimit-output-tokens-limit": "16000",
        "anthropic-ratelimit-output-tokens-remaining": "16000",
        "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:40:59Z",
        "anthropic-ratelimit-tokens-limit": "96000",
        "anthropic-ratelimit-tokens-remaining": "96000",
        "anthropic-ratelimit-tokens-reset": "2025-08-21T12:40:59Z",
        "retry-after": "12",
    }
    s = SIGNAL_PARSERS["anthropic"](headers, None, 1755780000.0)
    assert {w.unit for w in s.windows} == {"requests", "tokens", "input_tokens", "output_tokens"}
    assert all(w.reset_at_s == 1755780059.0 and w.period == "minute" for w in s.windows)
    assert s.retry_at_s() == 1755780012.0


def test_retry_after_ms_wins_over_seconds_like_the_sdks() -> None:
    s = SIGNAL_PARSERS["openai"]({"retry-after-ms": "250", "retry-after": "3"}, None, 10.0)
    assert s.retry_at_s() == pytest.approx(10.25)


def test_message_try_again_and_per_day() -> None:
    body = {
        "error": {
            "message": "Rate limit reached for model `llama` on tokens per day (TPD): Limit 100000, "
            "Used 99990, Requested 4351. Please try again in 1m30.5s. Need more tokens?"
        }
    }
    s = SIGNAL_PARSERS["groq"]({}, body, 0.0)
    assert s.message_retry_s == pytest.approx(90.5) and s.per_day
    assert s.retry_at_s() == pytest.approx(90.5)


def test_gemini_details() -> None:
    body = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {"quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier"},
                        {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"},
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"},
            ],
        }
    }
    s = SIGNAL_PARSERS["gemini"]({}, body, 5.0)
    assert s.retry_after_s == 30.0 and s.per_day and len(s.quota_ids) == 2


def test_no_headers_means_an_empty_signal_and_a_short_fallback() -> None:
    s = SIGNAL_PARSERS["none"]({}, None, 50.0)
    assert s.empty and s.retry_at_s() == 52.0


def test_unreadable_values_are_logged_once_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    signals._reported.discard("x-ratelimit-reset-tokens")
    headers = {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "5",
        "x-ratelimit-reset-tokens": "whenever",
    }
    with caplog.at_level(logging.WARNING, logger="spillway.signals"):
        first = SIGNAL_PARSERS["openai"](headers, None, 0.0)
        SIGNAL_PARSERS["openai"](headers, None, 0.0)
    assert first.windows[0].remaining == 5 and first.windows[0].reset_at_s is None
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring unreadable rate-limit value x-ratelimit-reset-tokens='whenever'"
    ]


def test_garbage_never_raises() -> None:
    junk_headers = {
        "x-ratelimit-remaining-requests": "lots",
        "retry-after": "🙂",
        "anthropic-ratelimit-requests-reset": "tomorrow",
        "anthropic-ratelimit-requests-limit": "-5",
    }
    for body in (
        None,
        [],
        "text",
        {"error": "flat"},
        {"error": {"details": "x"}},
        {"error": {"details": [1, None]}},
    ):
        for parser in SIGNAL_PARSERS.values():
            parser(junk_headers, body, 0.0)
