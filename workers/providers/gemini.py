"""Google Gemini ``generateContent``: ``contents``/``parts``, role ``model``,
``systemInstruction``, ``generationConfig``, key in ``x-goog-api-key``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.errors import AuthError, ProviderError, RateLimited
from workers.messages import ChatRequest
from workers.providers.base import Adapter, pick, register
from workers.providers.signals import RateLimitSignal

if TYPE_CHECKING:
    from workers.config import ProviderConfig

FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "MALFORMED_FUNCTION_CALL": "error",
}


@register
class GeminiAdapter(Adapter):
    name = "gemini"

    def url(self, provider: ProviderConfig, model: str) -> str:
        return f"{provider.base_url}/models/{model}:generateContent"

    def headers(self, provider: ProviderConfig, api_key: str | None) -> dict[str, str]:
        headers = dict(provider.headers)
        if api_key:
            headers["x-goog-api-key"] = api_key
        return headers

    def body(self, provider: ProviderConfig, model: str, request: ChatRequest) -> dict[str, Any]:
        contents = [
            {"role": "model" if m.role == "assistant" else "user", "parts": [{"text": m.content}]}
            for m in request.turns()
        ]
        config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.stop:
            config["stopSequences"] = list(request.stop)
        if request.json_mode:
            config["responseMimeType"] = "application/json"
        body: dict[str, Any] = {"contents": contents, "generationConfig": config}
        system = request.system_text()
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        return body

    def parse(self, body: Any, request: ChatRequest) -> tuple[str, str, int, int]:
        usage = body.get("usageMetadata") or {}
        input_tokens = int(usage.get("promptTokenCount") or 0)
        output_tokens = int(usage.get("candidatesTokenCount") or 0) + int(
            usage.get("thoughtsTokenCount") or 0
        )
        candidates = body.get("candidates") or []
        if not candidates:
            if (body.get("promptFeedback") or {}).get("blockReason"):
                return "", "content_filter", input_tokens, output_tokens
            raise KeyError("candidates")
        first = candidates[0]
        parts = (first.get("content") or {}).get("parts") or []
        text = "".join(p.get("text", "") for p in parts if not p.get("thought"))
        return text, pick(FINISH, first.get("finishReason")), input_tokens, output_tokens

    def _classify(
        self, status: int, body: Any, signal: RateLimitSignal, provider: ProviderConfig
    ) -> ProviderError:
        error = super()._classify(status, body, signal, provider)
        if status == 400 and "API_KEY_INVALID" in str(body):
            return AuthError(error.message, provider.name, status, signal)
        return error

    def rate_limited(
        self, body: Any, signal: RateLimitSignal, provider: ProviderConfig, common: dict[str, Any]
    ) -> ProviderError:
        if not signal.per_day:
            return super().rate_limited(body, signal, provider, common)
        # A daily quota (RPD) is gone: Gemini's days end at midnight Pacific (the config's reset).
        retry_at = max(signal.retry_at_s(), provider.daily_reset.next_reset_s(signal.received_at_s))
        return RateLimited(**common, retry_at_s=retry_at, per_day=True)
