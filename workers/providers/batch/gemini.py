"""Gemini Batch API with inline requests: ``POST {base_url}/models/{model}:batchGenerateContent``
``{"batch": {"displayName", "inputConfig": {"requests": {"requests": [{"request", "metadata"}]}}}}``
answers an Operation named ``batches/{id}`` (that name is the batch id here);
``GET {base_url}/batches/{id}`` reads it, ``POST {base_url}/batches/{id}:cancel`` cancels it.
Once done, the answers are in the Operation itself (``metadata.output``, as google-genai reads
them, or ``response``): ``inlinedResponses.inlinedResponses[]``, each ``response`` or ``error``
(a google.rpc.Status) plus the request's ``metadata``.

Limits: inline requests suit "smaller batches that keep the total request size under 20MB"
(Gemini API docs, Batch API guide, "Creating a batch job"). No request count is documented
for inline batches; `max_requests` is Spillway's own cap, because every answer comes back
inside the one Operation JSON a poll downloads.

Matching: each request carries ``metadata = {"key": custom_id}``. A response without its
metadata (reported on the Gemini forum for inline batches) is matched by position, which the
SDK documents: "The responses will be in the same order as the input requests." An expired
batch has no results at all (the guide), so its requests are all "expired".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from workers.errors import ProviderError, ServerError
from workers.providers.batch.base import (
    BatchAdapter,
    BatchItem,
    BatchState,
    ItemResult,
    Unanswered,
    answered,
    classified,
    not_listed,
    number,
    register,
    string,
)
from workers.providers.batch.http import dumps, send_json

if TYPE_CHECKING:
    from workers.config import ProviderConfig

SUCCEEDED, FAILED = "BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED"
CANCELLED, EXPIRED = "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"
ENDED = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
RPC_CANCELLED = 1
#: google.rpc.Code -> the HTTP status Google maps it to (google/rpc/code.proto), so an inline
#: error is classified as the same error on generateContent would be.
RPC_HTTP = {
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}
DISPLAY_NAME_CHARS = 128


@register
class GeminiBatches(BatchAdapter):
    name = "gemini"
    max_requests = 10_000
    max_bytes = 20_000_000  # "under 20MB", read as decimal megabytes: the smaller reading

    def item_line(self, provider: ProviderConfig, model: str, item: BatchItem) -> bytes:
        request = self.sync.body(provider, model, item.request)
        return dumps({"request": request, "metadata": {"key": item.custom_id}})

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
        name = " ".join(f"{k}={v}" for k, v in metadata.items()) or "spillway"  # required
        inline = {"requests": {"requests": [0]}}
        shell = dumps({"batch": {"displayName": name[:DISPLAY_NAME_CHARS], "inputConfig": inline}})
        before, after = shell.rsplit(b"[0]", 1)  # the lines go in as serialized (and measured)
        content = before + b"[" + b",".join(lines) + b"]" + after
        headers = {**self.sync.headers(provider, api_key), "content-type": "application/json"}
        url = f"{provider.base_url}/models/{quote(model, safe='')}:batchGenerateContent"
        operation = send_json(client, provider, "POST", url, headers=headers, content=content)
        return string(operation, "name", provider, "the batch create")

    def find(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, marker: str
    ) -> str | None:
        """The first page of batches (operations), by the display name `submit` gave them."""
        url = f"{provider.base_url}/batches?pageSize=100"
        listed = send_json(client, provider, "GET", url, headers=self.sync.headers(provider, api_key))
        for operation in listed.get("operations") or []:
            meta = (operation.get("metadata") or {}) if isinstance(operation, dict) else {}
            if meta.get("displayName") == f"spillway={marker}":
                return str(operation["name"])
        return None

    def _fetch(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> dict[str, Any]:
        url = f"{provider.base_url}/{_name(batch_id)}"
        return send_json(client, provider, "GET", url, headers=self.sync.headers(provider, api_key))

    def cancel(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> None:
        url = f"{provider.base_url}/{_name(batch_id)}:cancel"
        send_json(client, provider, "POST", url, headers=self.sync.headers(provider, api_key))

    def _state(self, batch: dict[str, Any]) -> BatchState:
        meta = _metadata(batch)
        state = str(meta.get("state") or "")
        stats = meta.get("batchStats") or {}  # int64 strings; zero counts are left out
        error = batch.get("error")
        failed = state == FAILED or (batch.get("done") is True and bool(error) and state not in ENDED)
        why = error.get("message") if isinstance(error, dict) else None
        return BatchState(
            ended=state in ENDED or batch.get("done") is True,
            status=state,
            done=number(stats.get("successfulRequestCount")) + number(stats.get("failedRequestCount")),
            total=number(stats.get("requestCount")),
            failed_whole=str(why or "the batch failed") if failed else None,
        )

    def _answers(
        self,
        client: httpx.Client,
        provider: ProviderConfig,
        api_key: str | None,
        batch: dict[str, Any],
        items: Sequence[BatchItem],
    ) -> Iterator[ItemResult]:
        requests = {item.custom_id: item.request for item in items}
        for index, entry in enumerate(_inlined(batch)):
            if not isinstance(entry, dict):
                continue
            metadata = entry.get("metadata")
            key = metadata.get("key") if isinstance(metadata, dict) else None
            if metadata is None and index < len(items):
                key = items[index].custom_id  # no metadata came back: the documented order
            if not isinstance(key, str) or key not in requests:
                continue
            if "response" in entry:
                yield answered(provider, key, entry["response"], requests[key])
            elif isinstance(entry.get("error"), dict):
                yield _inline_error(provider, key, entry["error"])
            else:
                error = ServerError("inline response has neither response nor error", provider.name)
                yield ItemResult(key, "failed", error=error)

    def _unanswered(self, batch: dict[str, Any], provider: ProviderConfig) -> Unanswered:
        state = _metadata(batch).get("state")
        if state == EXPIRED:
            return "expired", None
        if state == CANCELLED:
            return "cancelled", None
        error = batch.get("error")
        if state == FAILED and isinstance(error, dict):
            return "failed", _status_error(provider, error)
        return "failed", not_listed(provider)


def _name(batch_id: str) -> str:
    """``batches/{id}``, from the Operation name or the bare id."""
    bare = batch_id.removeprefix("batches/")
    return f"batches/{quote(bare, safe='')}"


def _metadata(batch: dict[str, Any]) -> dict[str, Any]:
    meta = batch.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _inlined(batch: dict[str, Any]) -> list[Any]:
    output = _metadata(batch).get("output") or batch.get("response") or {}
    holder = output.get("inlinedResponses") if isinstance(output, dict) else None
    entries = holder.get("inlinedResponses") if isinstance(holder, dict) else None
    return entries if isinstance(entries, list) else []


def _inline_error(provider: ProviderConfig, custom_id: str, status: dict[str, Any]) -> ItemResult:
    if status.get("code") == RPC_CANCELLED:
        return ItemResult(custom_id, "cancelled")
    return ItemResult(custom_id, "failed", error=_status_error(provider, status))


def _status_error(provider: ProviderConfig, status: dict[str, Any]) -> ProviderError:
    """A google.rpc.Status, classified as the HTTP error body Gemini sends for that code."""
    code = status.get("code")
    http_status = RPC_HTTP.get(code, 500) if isinstance(code, int) else 500
    body = {"error": {**status, "code": http_status, "message": status.get("message") or ""}}
    return classified(provider, http_status, body)
