"""Anthropic Messages API: ``system`` at the top level, ``max_tokens`` required,
``x-api-key`` + ``anthropic-version``, temperature 0–1, no JSON switch (prefill ``{``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from workers.errors import ProviderError, QuotaExhausted
from workers.messages import ChatRequest
from workers.providers.base import Adapter, pick, register
from workers.providers.signals import RateLimitSignal

if TYPE_CHECKING:
    from workers.config import ProviderConfig

API_VERSION = "2023-06-01"
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "other",
}
JSON_PREFILL = "{"
JSON_INSTRUCTION = "Answer with one JSON object and nothing else."


def first_of_next_month_s(now_s: float) -> float:
    now = datetime.fromtimestamp(now_s, UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


@register
class AnthropicAdapter(Adapter):
    name = "anthropic"

    def url(self, provider: ProviderConfig, model: str) -> str:
        return f"{provider.base_url}/v1/messages"

    def headers(self, provider: ProviderConfig, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION, **provider.headers}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def body(self, provider: ProviderConfig, model: str, request: ChatRequest) -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.content} for m in request.turns()]
        system = request.system_text()
        if request.json_mode:
            system = f"{system}\n\n{JSON_INSTRUCTION}".strip()
            messages.append({"role": "assistant", "content": JSON_PREFILL})
        body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens, "messages": messages}
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = min(request.temperature, 1.0)  # Anthropic's range is 0–1
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        return body

    def parse(self, body: Any, request: ChatRequest) -> tuple[str, str, int, int]:
        text = "".join(b["text"] for b in body["content"] if b.get("type") == "text")
        if request.json_mode:
            text = JSON_PREFILL + text
        usage = body["usage"]
        input_tokens = (
            int(usage["input_tokens"])
            + int(usage.get("cache_creation_input_tokens") or 0)
            + int(usage.get("cache_read_input_tokens") or 0)
        )
        return text, pick(FINISH, body.get("stop_reason")), input_tokens, int(usage["output_tokens"])

    def _classify(
        self, status: int, body: Any, signal: RateLimitSignal, provider: ProviderConfig
    ) -> ProviderError:
        error = super()._classify(status, body, signal, provider)
        if status == 400 and "API usage limits" in error.message:
            return QuotaExhausted(error.message, provider.name, status, signal)  # self-set spend limit
        return error

    def rate_limited(
        self, body: Any, signal: RateLimitSignal, provider: ProviderConfig, common: dict[str, Any]
    ) -> ProviderError:
        error = body.get("error") if isinstance(body, dict) else None
        details = error.get("details") if isinstance(error, dict) else None
        if isinstance(details, dict) and details.get("error_code") == "enforced_spend_limit_reached":
            return QuotaExhausted(**common, retry_at_s=first_of_next_month_s(signal.received_at_s))
        return super().rate_limited(body, signal, provider, common)
