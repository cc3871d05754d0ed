"""Every error Spillway raises, in one tree.

    SpillwayError
    ├── ConfigError            the TOML file or environment is wrong (names file and key path)
    ├── InputError             a job or batch line is wrong (names the field or line)
    │   ├── NoRouteError       no candidate of the chain is usable (says why, per candidate)
    │   └── IdempotencyConflict  an idempotency key already names a different request
    ├── BudgetExhausted        a `spillway serve` tenant's daily token budget is spent (HTTP 429)
    ├── ServiceUnavailable     Redis, the broker or the store cannot be reached
    └── ProviderError          a provider call failed (provider, status, what it said)
        ├── RetryableError     worth trying again, here later or elsewhere now
        │   ├── RateLimited    a quota is empty until `retry_at` (per minute or per day)
        │   ├── Overloaded     the provider is busy (529, 503): back off, quota untouched
        │   ├── ServerError    5xx, or a body that is not what the format promises
        │   ├── ProviderTimeout
        │   └── ProviderConnectionError
        └── FinalError         retrying the same request on the same account never helps
            ├── QuotaExhausted billing: credits or spend cap gone on that account
            ├── AuthError      the key is wrong; it is disabled until the config changes
            └── BadRequest     the request itself is wrong
                └── ContextTooLong

Library errors (httpx, redis, SQLAlchemy) are translated where they are caught,
always with ``raise ... from``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.providers.signals import RateLimitSignal


class SpillwayError(Exception):
    """Root of every error Spillway raises on purpose."""


class ConfigError(SpillwayError):
    """The configuration is invalid; the message names the file and the key path."""


class InputError(SpillwayError, ValueError):
    """A job, request or batch line is invalid; the message names what was wrong."""


class IdempotencyConflict(InputError):
    """The idempotency key was used for a different request: answering with that job would
    hand one client's answer to another (HTTP 409)."""


class BudgetExhausted(SpillwayError):
    """A tenant's daily token budget cannot hold the job (or batch): nothing was submitted."""


class NoRouteError(InputError):
    """No candidate of the route can take the job; `reasons` says why, per candidate."""

    def __init__(self, message: str, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or {}


class ServiceUnavailable(SpillwayError):
    """A service Spillway needs (Redis, the broker, the store) does not answer."""


@dataclass(eq=False)
class ProviderError(SpillwayError):
    """A provider call failed. `kind` is a short stable name used in the store and reports."""

    message: str
    provider: str = ""
    status: int | None = None
    signal: RateLimitSignal | None = field(default=None, repr=False)
    kind = "provider_error"

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        status = f" HTTP {self.status}" if self.status else ""
        where = f"{self.provider}{status}: " if self.provider or status else ""
        return f"{where}{self.message}"


class RetryableError(ProviderError):
    kind = "retryable"


@dataclass(eq=False)
class RateLimited(RetryableError):
    """A quota is empty. `retry_at_s` is the absolute epoch second the account is usable again."""

    retry_at_s: float | None = None
    per_day: bool = False
    kind = "rate_limited"


class Overloaded(RetryableError):
    kind = "overloaded"


class ServerError(RetryableError):
    kind = "server_error"


class ProviderTimeout(RetryableError):
    kind = "timeout"


class ProviderConnectionError(RetryableError):
    kind = "connection_error"


class FinalError(ProviderError):
    kind = "final"


@dataclass(eq=False)
class QuotaExhausted(FinalError):
    """Billing quota or spend cap gone: no retry on this account until `retry_at_s` (if known)."""

    retry_at_s: float | None = None
    kind = "quota_exhausted"


class AuthError(FinalError):
    kind = "auth"


class BadRequest(FinalError):
    kind = "bad_request"


class ContextTooLong(BadRequest):
    kind = "context_too_long"
