"""OpenAI's error shape, and Spillway's errors in it (the SDK raises its classes by status)."""

from __future__ import annotations

import logging
import math
import time

from tornado.web import HTTPError

from workers import constants
from workers.errors import BudgetExhausted, IdempotencyConflict, InputError, ServiceUnavailable, SpillwayError

log = logging.getLogger("spillway.openai")


class ApiError(HTTPError):
    """An error as OpenAI answers it: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}  # sent with the error (Tornado clears those set before it)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"No such {what}: {ident}", param="id", code="not_found")


def api_error(exc: SpillwayError) -> ApiError:
    """A Spillway error as OpenAI's SDK expects to see it."""
    if isinstance(exc, IdempotencyConflict):
        return ApiError(409, str(exc), param="Idempotency-Key", code="idempotency_conflict")
    if isinstance(exc, BudgetExhausted):  # the only 429 here: a provider's quota is waited for
        # back at the next UTC midnight: the SDK must not retry it in a second
        day_s = constants.DAY_MS / 1000
        headers = {"x-should-retry": "false", "retry-after": str(math.ceil(day_s - time.time() % day_s))}
        return ApiError(429, str(exc), type="insufficient_quota", code="daily_token_budget", headers=headers)
    if isinstance(exc, InputError):
        field = str(exc).partition(":")[0]
        return ApiError(400, str(exc), param=field if field.isidentifier() else None)
    if isinstance(exc, ServiceUnavailable):
        return ApiError(503, str(exc), type="server_error", code="unavailable")
    return ApiError(500, str(exc), type="server_error")
