"""The rate-limit headers and 429 bodies each provider family sends, written by the simulator.

OpenAI: ``x-ratelimit-*`` with Go durations (time until full), ``retry-after(-ms)`` on 429.
Groq: the same names, but requests are per DAY and tokens per MINUTE; ``retry-after`` seconds.
Anthropic: ``anthropic-ratelimit-*`` with RFC 3339 resets, ``retry-after`` on 429.
Gemini: no headers; the 429 body carries QuotaFailure and RetryInfo.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from workers.simulator.formats import SimFormat, SimRequest
from workers.simulator.quota import Refusal
from workers.simulator.settings import SimProvider

QUOTA_METRIC = "generate_content_free_tier_requests"
Report = dict[str, tuple[int, int, float]]  # name -> (limit, remaining, seconds until full)

NAMES = {
    "rpm": ("requests per min", "RPM", "GenerateRequestsPerMinutePerProjectPerModel"),
    "tpm": ("tokens per min", "TPM", "GenerateContentInputTokensPerModelPerMinute"),
    "itpm": ("input tokens per min", "ITPM", "GenerateContentInputTokensPerModelPerMinute"),
    "otpm": ("output tokens per min", "OTPM", "GenerateContentOutputTokensPerModelPerMinute"),
    "rpd": ("requests per day", "RPD", "GenerateRequestsPerDayPerProjectPerModel"),
    "tpd": ("tokens per day", "TPD", "GenerateContentInputTokensPerModelPerDay"),
    "concurrency": ("concurrent requests", "CONC", "ConcurrentRequestsPerProject"),
}


def go_duration(seconds: float) -> str:
    """``20ms``, ``1s``, ``7.66s``, ``6m0s``, ``2m59.56s``, ``1h2m3s`` — as OpenAI and Groq write them."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text


def rfc3339(moment_s: float) -> str:
    return datetime.fromtimestamp(math.ceil(moment_s), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _x_ratelimit(report: Report, requests: tuple[str, ...], tokens: tuple[str, ...]) -> dict[str, str]:
    headers = {}
    for unit, names in (("requests", requests), ("tokens", tokens)):
        name = next((n for n in names if n in report), None)
        if name is None:
            continue
        limit, remaining, full_in = report[name]
        headers[f"x-ratelimit-limit-{unit}"] = str(limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(remaining)
        headers[f"x-ratelimit-reset-{unit}"] = go_duration(full_in)
    return headers


def success_headers(provider: SimProvider, report: Report, now: float) -> dict[str, str]:
    style = provider.signals
    if style == "openai":
        return _x_ratelimit(report, ("rpm", "rpd"), ("tpm", "tpd"))
    if style == "groq":
        return _x_ratelimit(report, ("rpd",), ("tpm",))
    if style == "anthropic":
        headers = {}
        for unit, name in (
            ("requests", "rpm"),
            ("tokens", "tpm"),
            ("input-tokens", "itpm"),
            ("output-tokens", "otpm"),
        ):
            if name in report:
                limit, remaining, full_in = report[name]
                prefix = f"anthropic-ratelimit-{unit}"
                headers[f"{prefix}-limit"] = str(limit)
                headers[f"{prefix}-remaining"] = str(remaining)
                headers[f"{prefix}-reset"] = rfc3339(now + full_in)
        return headers
    return {}


def refusal_body_and_headers(
    provider: SimProvider,
    fmt: SimFormat,
    req: SimRequest,
    refusal: Refusal | None,
    report: Report,
    now: float,
) -> tuple[dict[str, Any], dict[str, str]]:
    """A 429 exactly as the family sends it. `refusal` None: a 429 with no empty bucket."""
    wait_s = refusal.retry_after_s if refusal else 1.0
    name = refusal.bucket.name if refusal else "rpm"
    words, abbr, quota_id = NAMES.get(name, NAMES["rpm"])
    headers = success_headers(provider, report, now)
    style = provider.signals
    if style == "openai":
        headers["retry-after-ms"] = str(math.ceil(wait_s * 1000))
        headers["retry-after"] = str(math.ceil(wait_s))
    elif style in ("groq", "anthropic", "none"):
        headers["retry-after"] = str(math.ceil(wait_s))
    if provider.api == "gemini":
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": f"generativelanguage.googleapis.com/{QUOTA_METRIC}",
                        "quotaId": f"{quota_id}-FreeTier",
                        "quotaDimensions": {"location": "global", "model": req.model},
                    }
                ],
            },
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{math.ceil(wait_s)}s"},
        ]
        message = "You exceeded your current quota, please check your plan and billing details."
        return fmt.error(429, "rate_limit", message, {"details": details}), headers
    if refusal is not None and provider.api == "anthropic":
        message = (
            f"This request would exceed the rate limit for your organization (org-simulated) of "
            f"{refusal.bucket.limit} {words.replace(' min', ' minute')}. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits."
        )
    elif refusal is not None:
        message = (
            f"Rate limit reached for {req.model} in organization org-simulated on {words} ({abbr}): "
            f"Limit {refusal.bucket.limit}, Requested {math.ceil(refusal.requested)}. "
            f"Please try again in {go_duration(wait_s)}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more."
        )
    else:
        message = f"Rate limit reached for {req.model}. Please try again in {go_duration(wait_s)}."
    extra = {"type": "tokens" if "token" in words else "requests"}
    return fmt.error(429, "rate_limit", message, extra), headers
