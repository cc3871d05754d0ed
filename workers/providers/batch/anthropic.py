"""Anthropic Message Batches: ``POST {base_url}/v1/messages/batches`` ``{"requests": [{custom_id,
params}]}``, ``GET .../{id}``, ``POST .../{id}/cancel``, and the results JSONL at the batch's
``results_url`` (the docs: take it from the batch, do not build it).

Limits (Anthropic, "Batch processing" guide, batch limitations): "A Message Batch is limited
to either 100,000 Message requests or 256 MB in size, whichever is reached first";
``custom_id`` matches ``^[a-zA-Z0-9_-]{1,64}$`` (API reference, Create a Message Batch). The
batches API has no batch-level metadata, so `submit` ignores it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from workers.errors import InputError, ServerError
from workers.providers.batch.base import (
    BatchAdapter,
    BatchItem,
    BatchState,
    ItemResult,
    Unanswered,
    answered,
    errored,
    not_listed,
    number,
    objects,
    register,
    string,
)
from workers.providers.batch.http import dumps, json_lines, send_json

if TYPE_CHECKING:
    from workers.config import ProviderConfig

log = logging.getLogger("spillway.batch")

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
COUNTS = ("succeeded", "errored", "canceled", "expired")
NOT_RUN = {"canceled": "cancelled", "expired": "expired"}
#: The HTTP status each error type stands for (Anthropic "Errors" page), so an errored
#: request is classified as the same error on the Messages endpoint would be.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


@register
class AnthropicBatches(BatchAdapter):
    name = "anthropic"
    max_requests = 100_000
    max_bytes = 256_000_000  # 256 MB, read as decimal megabytes: the smaller reading

    def item_line(self, provider: ProviderConfig, model: str, item: BatchItem) -> bytes:
        if not CUSTOM_ID.fullmatch(item.custom_id):
            raise InputError(
                f"custom_id {item.custom_id[:80]!r}: Anthropic takes 1-64 letters, digits, '_' or '-'"
            )
        return dumps({"custom_id": item.custom_id, "params": self.sync.body(provider, model, item.request)})

    def _create(
        self,
        client: httpx.Client,
        provider: ProviderConfig,
        api_key: str | None,
        model: str,
        items: Sequence[BatchItem],
        lines: list[bytes],
        metadata: dict[str, str],
    ) -> str:
        headers = {**self.sync.headers(provider, api_key), "content-type": "application/json"}
        content = b'{"requests":[' + b",".join(lines) + b"]}"
        created = send_json(client, provider, "POST", _batches(provider), headers=headers, content=content)
        return string(created, "id", provider, "the batch create")

    def _fetch(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> dict[str, Any]:
        url = f"{_batches(provider)}/{quote(batch_id, safe='')}"
        return send_json(client, provider, "GET", url, headers=self.sync.headers(provider, api_key))

    def cancel(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> None:
        url = f"{_batches(provider)}/{quote(batch_id, safe='')}/cancel"
        send_json(client, provider, "POST", url, headers=self.sync.headers(provider, api_key))

    def _state(self, batch: dict[str, Any]) -> BatchState:
        status = str(batch.get("processing_status") or "")
        counts = batch.get("request_counts") or {}
        done = sum(number(counts.get(name)) for name in COUNTS)  # zero until the batch has ended
        return BatchState(status == "ended", status, done, done + number(counts.get("processing")))

    def _answers(
        self,
        client: httpx.Client,
        provider: ProviderConfig,
        api_key: str | None,
        batch: dict[str, Any],
        items: Sequence[BatchItem],
    ) -> Iterator[ItemResult]:
        requests = {item.custom_id: item.request for item in items}
        url = _results_url(provider, batch)
        for line in objects(json_lines(client, provider, url, self.sync.headers(provider, api_key))):
            custom_id, result = line.get("custom_id"), line.get("result")
            request = requests.get(custom_id) if isinstance(custom_id, str) else None
            if request is None:  # not one of ours, or no id at all
                continue
            kind = result.get("type") if isinstance(result, dict) else None
            if kind == "succeeded":
                yield answered(provider, custom_id, result.get("message"), request)
            elif kind == "errored":
                yield _errored(provider, custom_id, result.get("error"))
            elif kind in NOT_RUN:
                yield ItemResult(custom_id, NOT_RUN[kind])
            else:
                error = ServerError(f"unknown result type {kind!r}", provider.name)
                yield ItemResult(custom_id, "failed", error=error)

    def _unanswered(self, batch: dict[str, Any], provider: ProviderConfig) -> Unanswered:
        return "failed", not_listed(provider)  # an ended batch lists every request it had


def _batches(provider: ProviderConfig) -> str:
    return f"{provider.base_url}/v1/messages/batches"


def _results_url(provider: ProviderConfig, batch: dict[str, Any]) -> str:
    """The batch's ``results_url`` when it is on the provider's own origin: the key goes with
    the request, and only there. Else the documented path under ``base_url``."""
    fallback = f"{_batches(provider)}/{quote(str(batch.get('id', '')), safe='')}/results"
    given = batch.get("results_url")
    if not isinstance(given, str) or not given:
        return fallback
    try:
        origin, base = httpx.URL(given), httpx.URL(provider.base_url)
    except httpx.InvalidURL:
        origin, base = None, None
    if (
        origin is None
        or base is None
        or (origin.scheme, origin.host, origin.port)
        != (
            base.scheme,
            base.host,
            base.port,
        )
    ):
        log.warning("%s: results_url is off the provider's origin; using the documented path", provider.name)
        return fallback
    return given


def _errored(provider: ProviderConfig, custom_id: str, error: Any) -> ItemResult:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}`` (the SDK's ErrorResponse);
    a bare ``{"type", "message"}`` error object is read too."""
    envelope = error if isinstance(error, dict) and isinstance(error.get("error"), dict) else {"error": error}
    inner = envelope["error"] if isinstance(envelope["error"], dict) else {}
    status = ERROR_STATUS.get(inner.get("type"), 500)  # unknown: a server-side failure, retryable
    return errored(provider, custom_id, status, envelope)
