"""What a wire format adapter is, the registry of them, and the status → error mapping they share."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from workers.errors import (
    AuthError,
    BadRequest,
    ContextTooLong,
    FinalError,
    Overloaded,
    ProviderError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    RetryableError,
    ServerError,
)
from workers.messages import ChatRequest
from workers.providers.signals import RateLimitSignal, error_message

if TYPE_CHECKING:
    from workers.config import ProviderConfig

_CONTEXT_TOO_LONG = re.compile(
    r"context[_ ]length|context window|prompt is too long|maximum number of tokens"
    r"|input token count.*exceeds|too many tokens",
    re.I,
)


class Adapter:
    """One wire format: build the HTTP request, read the answer, classify the errors.

    Subclasses fill in `url`, `headers`, `body` and `parse`; `classify` maps an error
    status and body to the exception tree and may be refined per format.
    """

    name: ClassVar[str]

    def url(self, provider: ProviderConfig, model: str) -> str:
        raise NotImplementedError

    def headers(self, provider: ProviderConfig, api_key: str | None) -> dict[str, str]:
        raise NotImplementedError

    def body(self, provider: ProviderConfig, model: str, request: ChatRequest) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, body: Any, request: ChatRequest) -> tuple[str, str, int, int]:
        """(text, finish_reason, input_tokens, output_tokens); KeyError/TypeError = malformed."""
        raise NotImplementedError

    def classify(
        self, status: int, body: Any, signal: RateLimitSignal, provider: ProviderConfig
    ) -> ProviderError:
        error = self._classify(status, body, signal, provider)
        if signal.should_retry is False and isinstance(error, RetryableError):
            return FinalError(
                f"{error.message} (the provider said not to retry)", provider.name, status, signal
            )
        return error

    def _classify(
        self, status: int, body: Any, signal: RateLimitSignal, provider: ProviderConfig
    ) -> ProviderError:
        message = error_message(body) or f"HTTP {status} with no error message"
        common = {"message": message, "provider": provider.name, "status": status, "signal": signal}
        if status == 429:
            return self.rate_limited(body, signal, provider, common)
        if status in (401, 403):
            return AuthError(**common)
        if status == 402:
            return QuotaExhausted(**common)
        if status == 413 or (400 <= status < 500 and _CONTEXT_TOO_LONG.search(message)):
            return ContextTooLong(**common)
        if status in (408, 504):
            return ProviderTimeout(**common)
        if status in (503, 529):
            return Overloaded(**common)
        if status >= 500 or status == 409:
            return ServerError(**common)
        return BadRequest(**common)

    def rate_limited(
        self, body: Any, signal: RateLimitSignal, provider: ProviderConfig, common: dict[str, Any]
    ) -> ProviderError:
        retry_at = signal.retry_at_s()
        if signal.per_day and signal.retry_after_s is None and signal.message_retry_s is None:
            retry_at = max(retry_at, provider.daily_reset.next_reset_s(signal.received_at_s))
        return RateLimited(**common, retry_at_s=retry_at, per_day=signal.per_day)


ADAPTERS: dict[str, Adapter] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.name] = cls()
    return cls


def pick(mapping: dict[str, str], value: Any, default: str = "other") -> str:
    return mapping.get(value, default) if isinstance(value, str) else default
