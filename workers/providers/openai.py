"""OpenAI Chat Completions, and the OpenAI-compatible family (Groq, Mistral, OpenRouter,
Together, xAI, DeepSeek, Ollama). Their differences live in the config: base URL,
``max_tokens_field``, extra ``headers``, ``signals`` style, and no ``key_env`` for Ollama.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.errors import ProviderError, QuotaExhausted
from workers.messages import ChatRequest
from workers.providers.base import Adapter, pick, register
from workers.providers.signals import RateLimitSignal

if TYPE_CHECKING:
    from workers.config import ProviderConfig

FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


@register
class OpenAIAdapter(Adapter):
    name = "openai"

    def url(self, provider: ProviderConfig, model: str) -> str:
        return f"{provider.base_url}/chat/completions"

    def headers(self, provider: ProviderConfig, api_key: str | None) -> dict[str, str]:
        headers = dict(provider.headers)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def body(self, provider: ProviderConfig, model: str, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            provider.max_tokens_field: request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop"] = list(request.stop)
        if request.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def parse(self, body: Any, request: ChatRequest) -> tuple[str, str, int, int]:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
        usage = body.get("usage") or {}
        return (
            text,
            pick(FINISH, choice.get("finish_reason")),
            int(usage["prompt_tokens"]),
            int(usage["completion_tokens"]),
        )

    def rate_limited(
        self, body: Any, signal: RateLimitSignal, provider: ProviderConfig, common: dict[str, Any]
    ) -> ProviderError:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and "insufficient_quota" in (error.get("code"), error.get("type")):
            return QuotaExhausted(**common)
        return super().rate_limited(body, signal, provider, common)
