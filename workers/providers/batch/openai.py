"""OpenAI Batch, for every provider on the OpenAI wire format (Groq and the others that offer
it), under the provider's own base URL: ``POST {base_url}/files`` (the JSONL, purpose
``batch``), ``POST {base_url}/batches``, ``GET {base_url}/batches/{id}``,
``POST {base_url}/batches/{id}/cancel``, ``GET {base_url}/files/{id}/content`` for the output
and error files.

Limits (OpenAI API reference, "Create batch", input_file_id): "The file can contain up to
50,000 requests, and can be up to 200 MB in size"; each input file holds requests to a single
model (Batch guide), which `submit`'s one `model` guarantees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from workers.errors import BadRequest, ProviderError, ProviderTimeout, RateLimited, ServerError
from workers.messages import ChatRequest
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

ENDPOINT = "/v1/chat/completions"
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
#: BatchRequestOutput ``error.code`` of a request the batch never ran.
NOT_RUN = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
#: Whole-batch error codes that mean "later", not "never": the enqueued-token queue is full.
QUEUE_FULL = frozenset({"token_limit_exceeded"})


@register
class OpenAIBatches(BatchAdapter):
    name = "openai"
    max_requests = 50_000
    max_bytes = 200_000_000  # 200 MB, read as decimal megabytes: the smaller reading

    def item_line(self, provider: ProviderConfig, model: str, item: BatchItem) -> bytes:
        body = self.sync.body(provider, model, item.request)
        return dumps({"custom_id": item.custom_id, "method": "POST", "url": ENDPOINT, "body": body})

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
        headers = self.sync.headers(provider, api_key)
        upload_headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}  # multipart's own
        content = b"".join(line + b"\n" for line in lines)
        uploaded = send_json(
            client,
            provider,
            "POST",
            f"{provider.base_url}/files",
            headers=upload_headers,
            files={"file": ("spillway-batch.jsonl", content, "application/jsonl")},
            data={"purpose": "batch"},
        )
        body: dict[str, Any] = {
            "input_file_id": string(uploaded, "id", provider, "the file upload"),
            "endpoint": ENDPOINT,
            "completion_window": "24h",  # the only window the API accepts
        }
        if metadata:
            body["metadata"] = metadata
        url = f"{provider.base_url}/batches"
        created = send_json(client, provider, "POST", url, headers=headers, json=body)
        return string(created, "id", provider, "the batch create")

    def find(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, marker: str
    ) -> str | None:
        """The newest 100 batches (newest first, as OpenAI lists them), by their metadata."""
        url = f"{provider.base_url}/batches?limit=100"
        listed = send_json(client, provider, "GET", url, headers=self.sync.headers(provider, api_key))
        for batch in listed.get("data") or []:
            if isinstance(batch, dict) and (batch.get("metadata") or {}).get("spillway") == marker:
                return str(batch["id"])
        return None

    def _fetch(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> dict[str, Any]:
        url = f"{provider.base_url}/batches/{quote(batch_id, safe='')}"
        return send_json(client, provider, "GET", url, headers=self.sync.headers(provider, api_key))

    def cancel(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> None:
        url = f"{provider.base_url}/batches/{quote(batch_id, safe='')}/cancel"
        send_json(client, provider, "POST", url, headers=self.sync.headers(provider, api_key))

    def _state(self, batch: dict[str, Any]) -> BatchState:
        status = str(batch.get("status") or "")
        counts = batch.get("request_counts") or {}
        return BatchState(
            ended=status in ENDED,
            status=status,
            done=number(counts.get("completed")) + number(counts.get("failed")),
            total=number(counts.get("total")),
            failed_whole=_why_failed(batch) if status == "failed" else None,
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
        headers = self.sync.headers(provider, api_key)
        for field in ("output_file_id", "error_file_id"):
            file_id = batch.get(field)
            if not isinstance(file_id, str) or not file_id:
                continue
            url = f"{provider.base_url}/files/{quote(file_id, safe='')}/content"
            for line in objects(json_lines(client, provider, url, headers)):
                result = _line_result(provider, line, requests)
                if result is not None:
                    yield result

    def _unanswered(self, batch: dict[str, Any], provider: ProviderConfig) -> Unanswered:
        status = batch.get("status")
        if status in ("expired", "cancelled"):
            return str(status), None
        if status == "failed":
            message = _why_failed(batch)
            codes = {e.get("code") for e in _errors(batch)}
            if codes & QUEUE_FULL:
                return "failed", RateLimited(message, provider.name)
            return "failed", BadRequest(message, provider.name)
        return "failed", not_listed(provider)


def _line_result(
    provider: ProviderConfig, line: dict[str, Any], requests: dict[str, ChatRequest]
) -> ItemResult | None:
    """One output or error file line: ``{"custom_id", "response": {"status_code", "body"},
    "error"}``; the status code decides, not the file it came in."""
    custom_id = line.get("custom_id")
    request = requests.get(custom_id) if isinstance(custom_id, str) else None
    if request is None:  # not one of ours, or no id at all
        return None
    response, error = line.get("response"), line.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        if 200 <= status < 300:
            return answered(provider, custom_id, response.get("body"), request)
        return errored(provider, custom_id, status, response.get("body"))
    if isinstance(error, dict):
        code = error.get("code")
        if code in NOT_RUN:
            return ItemResult(custom_id, NOT_RUN[code])
        return ItemResult(custom_id, "failed", error=_not_http(provider, error))
    return ItemResult(
        custom_id, "failed", error=ServerError("result line has neither response nor error", provider.name)
    )


def _not_http(provider: ProviderConfig, error: dict[str, Any]) -> ProviderError:
    """A failure with no HTTP answer (BatchRequestOutput ``error``): ``request_timeout`` is the
    model call timing out; an unknown code is taken as transient too."""
    message = f"{error.get('code')}: {error.get('message') or 'no message'}"
    if error.get("code") == "request_timeout":
        return ProviderTimeout(message, provider.name)
    return ServerError(message, provider.name)


def _errors(batch: dict[str, Any]) -> list[dict[str, Any]]:
    data = (batch.get("errors") or {}).get("data") if isinstance(batch.get("errors"), dict) else None
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def _why_failed(batch: dict[str, Any]) -> str:
    """The validation errors of a failed batch, one clause each (they name lines, not content)."""
    clauses = []
    for error in _errors(batch):
        where = f" (line {error['line']})" if error.get("line") is not None else ""
        clauses.append(f"{error.get('code')}{where}: {error.get('message') or ''}".strip())
    return "; ".join(clauses) or "the batch failed validation"
