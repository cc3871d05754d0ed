"""Rate-limit signals: what a provider said, on 2xx and on 429, about its quota.

Each header style (``openai``, ``groq``, ``anthropic``, ``gemini``, ``none``) has a parser
registered in `SIGNAL_PARSERS`; a provider names its style in the config. A value a parser
cannot read is logged once and ignored: parsing never fails a job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.providers.timeparse import (
    parse_duration_s,
    parse_retry_after_s,
    parse_rfc3339_s,
)

log = logging.getLogger("spillway.signals")

UNITS = ("requests", "tokens", "input_tokens", "output_tokens")
#: "unknown": OpenAI's headers do not say which window they describe (the limiter decides).
PERIODS = ("minute", "day", "unknown")


@dataclass(frozen=True)
class Window:
    """One quota dimension as the provider reported it."""

    unit: str  # requests | tokens | input_tokens | output_tokens
    period: str  # minute | day | unknown
    limit: int | None = None
    remaining: int | None = None
    reset_at_s: float | None = None  # absolute time the bucket is full again


@dataclass(frozen=True)
class RateLimitSignal:
    received_at_s: float
    windows: tuple[Window, ...] = ()
    retry_after_s: float | None = None  # retry-after(-ms) header or Gemini RetryInfo
    message_retry_s: float | None = None  # "Please try again in 2s" in an error message
    quota_ids: tuple[str, ...] = ()  # Gemini QuotaFailure quota ids
    per_day: bool = False  # the provider said a daily quota ran out
    should_retry: bool | None = None  # x-should-retry

    def retry_at_s(self, fallback_s: float = 2.0) -> float:
        """When the account is usable again, by the provider's own word.

        retry-after wins; else the latest reset of a window with nothing left, or the
        message's "try again in"; else a short fallback.
        """
        if self.retry_after_s is not None:
            return self.received_at_s + self.retry_after_s
        times = [w.reset_at_s for w in self.windows if w.remaining == 0 and w.reset_at_s]
        if self.message_retry_s is not None:
            times.append(self.received_at_s + self.message_retry_s)
        return max(times) if times else self.received_at_s + fallback_s

    @property
    def empty(self) -> bool:
        return not (self.windows or self.retry_after_s is not None or self.message_retry_s)


Headers = Mapping[str, str]
Parser = Callable[[Headers, Any, float], RateLimitSignal]
SIGNAL_PARSERS: dict[str, Parser] = {}
_reported: set[str] = set()


def read_signal(style: str, headers: Headers, body: Any, now_s: float) -> RateLimitSignal:
    """Parse with the named style; a parser bug is logged once and reads as no signal at all."""
    try:
        return SIGNAL_PARSERS[style](headers, body, now_s)
    except Exception as exc:  # a signal is advice; the job must go on without it
        unreadable(f"{style} signal", f"{type(exc).__name__}: {exc}")
        return RateLimitSignal(received_at_s=now_s)


def signal_parser(name: str) -> Callable[[Parser], Parser]:
    def register(fn: Parser) -> Parser:
        SIGNAL_PARSERS[name] = fn
        return fn

    return register


def unreadable(name: str, value: object) -> None:
    """Log a value we cannot read, once per name per process."""
    if name not in _reported:
        _reported.add(name)
        log.warning("ignoring unreadable rate-limit value %s=%r", name, value)


def _int(headers: Headers, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = int(float(value.strip()))
    except ValueError:
        unreadable(name, value)
        return None
    return number if number >= 0 else None


def _duration(headers: Headers, name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    seconds = parse_duration_s(value)
    if seconds is None:
        unreadable(name, value)
    return seconds


def _retry_after(headers: Headers, now_s: float) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = parse_duration_s(ms)
        if seconds is not None:
            return seconds / 1000
        unreadable("retry-after-ms", ms)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = parse_retry_after_s(value, now_s)
    if seconds is None:
        unreadable("retry-after", value)
    return seconds


def _should_retry(headers: Headers) -> bool | None:
    value = (headers.get("x-should-retry") or "").strip().lower()
    return {"true": True, "false": False}.get(value)


def error_message(body: Any) -> str:
    """The human message of an error body, whatever the format nests it in."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(body.get("message"), str):
            return body["message"]
    return ""


_TRY_AGAIN = re.compile(r"try again in\s+([0-9.]+(?:ns|us|µs|ms|h|m|s)(?:[0-9.]+(?:ms|h|m|s))*)", re.I)
_PER_DAY = re.compile(r"per day|\((?:RPD|TPD)\)", re.I)


def _message_hints(body: Any) -> tuple[float | None, bool]:
    message = error_message(body)
    match = _TRY_AGAIN.search(message)
    return (parse_duration_s(match.group(1)) if match else None), bool(_PER_DAY.search(message))


def _base(headers: Headers, body: Any, now_s: float) -> dict[str, Any]:
    message_retry_s, per_day = _message_hints(body)
    return {
        "received_at_s": now_s,
        "retry_after_s": _retry_after(headers, now_s),
        "message_retry_s": message_retry_s,
        "per_day": per_day,
        "should_retry": _should_retry(headers),
    }


def _x_ratelimit(headers: Headers, now_s: float, periods: dict[str, str]) -> tuple[Window, ...]:
    windows = []
    for unit in ("requests", "tokens"):
        limit = _int(headers, f"x-ratelimit-limit-{unit}")
        remaining = _int(headers, f"x-ratelimit-remaining-{unit}")
        reset = _duration(headers, f"x-ratelimit-reset-{unit}")
        if limit is None and remaining is None:
            continue
        reset_at = None if reset is None else now_s + reset
        windows.append(Window(unit, periods[unit], limit, remaining, reset_at))
    return tuple(windows)


@signal_parser("openai")
def parse_openai(headers: Headers, body: Any, now_s: float) -> RateLimitSignal:
    """``x-ratelimit-*``: the window (minute or day) is not stated; durations are relative."""
    windows = _x_ratelimit(headers, now_s, {"requests": "unknown", "tokens": "unknown"})
    return RateLimitSignal(windows=windows, **_base(headers, body, now_s))


@signal_parser("groq")
def parse_groq(headers: Headers, body: Any, now_s: float) -> RateLimitSignal:
    """Groq's ``x-ratelimit-*``: requests are per DAY, tokens per MINUTE."""
    windows = _x_ratelimit(headers, now_s, {"requests": "day", "tokens": "minute"})
    base = _base(headers, body, now_s)
    if any(w.unit == "requests" and w.remaining == 0 for w in windows):
        base["per_day"] = True
    return RateLimitSignal(windows=windows, **base)


@signal_parser("anthropic")
def parse_anthropic(headers: Headers, body: Any, now_s: float) -> RateLimitSignal:
    """``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*``, RFC 3339 resets."""
    windows = []
    for unit in ("requests", "tokens", "input-tokens", "output-tokens"):
        prefix = f"anthropic-ratelimit-{unit}"
        limit = _int(headers, f"{prefix}-limit")
        remaining = _int(headers, f"{prefix}-remaining")
        if limit is None and remaining is None:
            continue
        raw_reset = headers.get(f"{prefix}-reset")
        reset_at = parse_rfc3339_s(raw_reset)
        if raw_reset is not None and reset_at is None:
            unreadable(f"{prefix}-reset", raw_reset)
        windows.append(Window(unit.replace("-", "_"), "minute", limit, remaining, reset_at))
    return RateLimitSignal(windows=tuple(windows), **_base(headers, body, now_s))


@signal_parser("gemini")
def parse_gemini(headers: Headers, body: Any, now_s: float) -> RateLimitSignal:
    """No headers: the 429 body's RetryInfo.retryDelay and QuotaFailure quota ids."""
    base = _base(headers, body, now_s)
    quota_ids: list[str] = []
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            delay = parse_duration_s(str(detail.get("retryDelay", "")))
            if delay is None:
                unreadable("RetryInfo.retryDelay", detail.get("retryDelay"))
            else:
                base["retry_after_s"] = delay
        elif kind.endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or []:
                if isinstance(violation, dict) and isinstance(violation.get("quotaId"), str):
                    quota_ids.append(violation["quotaId"])
    if any("PerDay" in q for q in quota_ids):
        base["per_day"] = True
    return RateLimitSignal(quota_ids=tuple(quota_ids), **base)


@signal_parser("none")
def parse_none(headers: Headers, body: Any, now_s: float) -> RateLimitSignal:
    """Providers that send no rate-limit headers (DeepSeek, Ollama): retry-after only."""
    return RateLimitSignal(**_base(headers, body, now_s))
