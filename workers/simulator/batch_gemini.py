"""Gemini's Batch API (Developer API, inline requests only).

Followed: the REST reference https://ai.google.dev/api/batch-api (models.batchGenerateContent,
batches.get/list/cancel, GenerateContentBatch, InlinedRequest(s), InlinedResponse(s),
BatchStats, BatchState, Operation), the Batch API guide
https://ai.google.dev/gemini-api/docs/batch-api (an expired job "will not have any results to
retrieve"), and google-genai's ``batches.py`` (``_BatchJob_from_mldev``: the SDK reads state,
times and ``output`` from the Operation's ``metadata``; lists come as ``operations``). The
shapes below match a real exchange quoted in a public repository (a PENDING → RUNNING →
SUCCEEDED batch of three inline requests).

- ``POST /v1beta/models/{model}:batchGenerateContent`` ``{"batch": {"displayName", "inputConfig":
  {"requests": {"requests": [{"request": GenerateContentRequest, "metadata": {"key": …}}]}}}}``
  (snake_case keys accepted too, as the REST front end accepts them) → an Operation
  ``{"name": "batches/{id}", "metadata": {"@type": …GenerateContentBatch, "state", "batchStats", …}}``.
- ``GET /v1beta/batches/{id}``: the Operation; once done, ``"done": true`` and, when SUCCEEDED,
  ``metadata.output`` and ``response`` both carry ``{"inlinedResponses": {"inlinedResponses":
  [{"response"|"error", "metadata"}]}}`` in request order.
- ``POST /v1beta/batches/{id}:cancel`` → ``{}``; the Operation then ends CANCELLED with
  ``error.code`` 1, answered requests keeping their responses.
- ``GET /v1beta/batches`` (``pageSize``, ``pageToken``) → ``{"operations": [...], "nextPageToken"}``.

``batchStats`` counts are int64 strings and, as proto3 JSON does, zero counts are left out.
"""

from __future__ import annotations

from typing import Any

from workers.simulator.batches import TERMINAL, Batch, Call, Entry, Item, plan, rfc3339
from workers.simulator.formats import BadSimRequest

TYPE_PREFIX = "type.googleapis.com/google.ai.generativelanguage.v1main."
STATES = {
    "validating": "BATCH_STATE_PENDING",
    "in_progress": "BATCH_STATE_RUNNING",
    "finalizing": "BATCH_STATE_RUNNING",
    "cancelling": "BATCH_STATE_RUNNING",  # BatchState has no "cancelling"
    "completed": "BATCH_STATE_SUCCEEDED",
    "failed": "BATCH_STATE_FAILED",
    "cancelled": "BATCH_STATE_CANCELLED",
    "expired": "BATCH_STATE_EXPIRED",
}
#: google.rpc.Code of an InlinedResponse's error Status, by the HTTP error's status name.
RPC_CODES = {
    "CANCELLED": 1,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
}
CANCELLED_STATUS = {"code": 1, "message": "The batch was cancelled before this request ran."}
MAX_PAGE = 100


def _field(obj: dict[str, Any], camel: str, snake: str) -> Any:
    return obj.get(camel, obj.get(snake))


def create_batch(call: Call) -> None:
    model = call.params["model"]
    body = call.json_body()
    batch_spec = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(batch_spec, dict):
        call.send_error(400, "bad_request", "Invalid JSON payload: 'batch' is required.")
        return
    if call.provider.model_limits and model not in call.provider.model_limits:
        call.send_error(404, "model_not_found", f"models/{model} is not found for API version v1beta.")
        return
    input_config = _field(batch_spec, "inputConfig", "input_config") or {}
    if _field(input_config, "fileName", "file_name"):
        call.send_error(
            400, "bad_request", "The simulator takes inline requests only (inputConfig.requests)."
        )
        return
    inlined = (input_config.get("requests") or {}).get("requests")
    if not isinstance(inlined, list) or not inlined:
        call.send_error(400, "bad_request", "batch.inputConfig.requests.requests must be a non-empty list.")
        return
    entries = []
    path = f"/v1beta/models/{model}:generateContent"
    for index, inline in enumerate(inlined):
        request = inline.get("request") if isinstance(inline, dict) else None
        metadata = inline.get("metadata") if isinstance(inline, dict) else None
        try:
            req = call.fmt.parse(path, call.handler.headers, request, call.query)
            entries.append(Entry(str(index), req, metadata))
        except BadSimRequest as exc:
            entries.append(Entry(str(index), None, metadata, rejected=(400, "bad_request", str(exc))))
    batch = plan(call.book, call.provider, entries, batch_id=_batch_id(call), owner=call.owner, now=call.now)
    batch.extra.update(model=model, display_name=_field(batch_spec, "displayName", "display_name"))
    refused_model = call.book.admit(batch, call.provider.batch.queue_tokens, call.now)
    if refused_model is not None:
        call.count("batch_refused")
        call.send_error(
            429,
            "rate_limit",
            f"Resource has been exhausted: the batch would pass the {call.provider.batch.queue_tokens:,} "
            f"enqueued-token limit of {refused_model}.",
        )
        return
    call.count("batches_created")
    call.count("batch_requests", len(batch.items))
    call.send(200, operation(batch, call.now))


def _batch_id(call: Call) -> str:
    """40 lowercase letters and digits, like the real ids."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    with call.book.lock:
        return "".join(call.book.random.choice(alphabet) for _ in range(40))


def get_batch(call: Call) -> None:
    batch = _find(call)
    if batch is not None:
        call.send(200, operation(batch, call.now))


def cancel_batch(call: Call) -> None:
    batch = _find(call)
    if batch is not None:
        call.book.cancel(batch, call.now)
        call.send(200, {})


def list_batches(call: Call) -> None:
    batches = call.book.newest_first(call.provider.name)
    try:
        size = min(MAX_PAGE, max(1, int(call.query.get("pageSize", "10"))))
        start = int(call.query.get("pageToken") or 0)
    except ValueError:
        call.send_error(400, "bad_request", "pageSize and pageToken must be integers.")
        return
    out: dict[str, Any] = {"operations": [operation(b, call.now) for b in batches[start : start + size]]}
    if start + size < len(batches):
        out["nextPageToken"] = str(start + size)
    call.send(200, out)


def _find(call: Call) -> Batch | None:
    batch = call.book.batch(call.provider.name, call.params["id"])
    if batch is None:
        call.send_error(404, "model_not_found", "Requested entity was not found.")
    return batch


def operation(batch: Batch, now: float) -> dict[str, Any]:
    phase = batch.phase(now)
    name = f"batches/{batch.id}"
    metadata: dict[str, Any] = {
        "@type": TYPE_PREFIX + "GenerateContentBatch",
        "model": f"models/{batch.extra['model']}",
    }
    if batch.extra.get("display_name"):
        metadata["displayName"] = batch.extra["display_name"]
    output = _output(batch, now) if phase in ("completed", "cancelled") else None
    if output is not None:
        metadata["output"] = output
    moments = [batch.created_at, batch.started_at, batch.cancel_at or 0.0, batch.ended_at()]
    metadata["createTime"] = rfc3339(batch.created_at)
    metadata["updateTime"] = rfc3339(max(m for m in moments if m <= now))
    if phase in TERMINAL:
        metadata["endTime"] = rfc3339(batch.ended_at())
    metadata["batchStats"] = _stats(batch, now)
    metadata["state"] = STATES[phase]
    metadata["name"] = name
    op: dict[str, Any] = {"name": name, "metadata": metadata}
    if phase in TERMINAL:
        op["done"] = True
    if phase == "completed":
        op["response"] = {"@type": TYPE_PREFIX + "GenerateContentBatchOutput", **(output or {})}
    elif phase == "cancelled":
        op["error"] = {"code": 1, "message": "The batch was cancelled."}
    return op


def _stats(batch: Batch, now: float) -> dict[str, str]:
    counts = batch.counts(now)
    stats = {
        "requestCount": len(batch.items),
        "successfulRequestCount": counts["succeeded"],
        "failedRequestCount": counts["errored"],
        "pendingRequestCount": counts["processing"],
    }
    return {name: str(value) for name, value in stats.items() if value}


def _output(batch: Batch, now: float) -> dict[str, Any]:
    responses = [_inlined_response(batch, item, now) for item in batch.items]  # request order, as documented
    return {"inlinedResponses": {"inlinedResponses": responses}}


def _inlined_response(batch: Batch, item: Item, now: float) -> dict[str, Any]:
    outcome = batch.outcome(item, now)
    out: dict[str, Any] = {}
    if outcome == "succeeded":
        out["response"] = item.body
    elif outcome == "errored":
        error = item.body.get("error", {})
        out["error"] = {
            "code": RPC_CODES.get(error.get("status", ""), 2),
            "message": error.get("message", ""),
        }
    else:
        out["error"] = dict(CANCELLED_STATUS)
    if item.metadata is not None:
        out["metadata"] = item.metadata
    return out
