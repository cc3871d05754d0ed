"""Anthropic's Message Batches API: ``POST /v1/messages/batches`` ``{"requests": [{custom_id,
params}]}``, ``GET /v1/messages/batches[/{id}]``, ``POST .../{id}/cancel``, ``GET .../{id}/results``.

Shapes follow shared/provider-protocols.md section 6 and the anthropic SDK's ``MessageBatch``
types: ``request_counts`` other than ``processing`` stay zero until the whole batch has ended;
``params`` are checked when a request is processed, so a bad one ends ``errored`` instead of
failing the create; result lines are not in request order.
"""

from __future__ import annotations

import re
from typing import Any

from workers.simulator.batches import DAY_S, TERMINAL, Batch, Call, Entry, jsonl, new_id, plan, rfc3339
from workers.simulator.formats import BadSimRequest

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_LIST = 1000
STATUS = {"cancelling": "canceling", **{phase: "ended" for phase in TERMINAL}}
COUNTED = ("succeeded", "errored", "canceled", "expired")


def create_batch(call: Call) -> None:
    body = call.json_body()
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        call.send_error(400, "bad_request", "requests: Field required (a non-empty list)")
        return
    entries, seen = [], set()
    for index, request in enumerate(requests):
        custom_id = request.get("custom_id") if isinstance(request, dict) else None
        params = request.get("params") if isinstance(request, dict) else None
        if (
            not isinstance(custom_id, str)
            or not CUSTOM_ID.fullmatch(custom_id)
            or not isinstance(params, dict)
        ):
            call.send_error(
                400, "bad_request", f"requests.{index}: needs a custom_id ([a-zA-Z0-9_-]{{1,64}}) and params"
            )
            return
        if custom_id in seen:
            call.send_error(
                400, "bad_request", f"requests.{index}.custom_id: duplicate custom_id {custom_id!r}"
            )
            return
        seen.add(custom_id)
        try:
            entries.append(Entry(custom_id, call.fmt.parse("/v1/messages", call.handler.headers, params, {})))
        except BadSimRequest as exc:
            entries.append(Entry(custom_id, None, rejected=(400, "bad_request", str(exc))))
    batch = plan(
        call.book, call.provider, entries, batch_id=new_id("msgbatch_"), owner=call.owner, now=call.now
    )
    refused_model = call.book.admit(batch, call.provider.batch.queue_tokens, call.now)
    if refused_model is not None:
        call.count("batch_refused")
        call.send_error(
            429,
            "rate_limit",
            f"This request would exceed your organization's batch queue limit of "
            f"{call.provider.batch.queue_tokens:,} enqueued tokens for {refused_model}.",
        )
        return
    call.count("batches_created")
    call.count("batch_requests", len(batch.items))
    call.send(200, batch_object(batch, call, call.now))


def get_batch(call: Call) -> None:
    batch = _find(call)
    if batch is not None:
        call.send(200, batch_object(batch, call, call.now))


def cancel_batch(call: Call) -> None:
    batch = _find(call)
    if batch is not None:
        call.book.cancel(batch, call.now)
        call.send(200, batch_object(batch, call, call.now))


def results(call: Call) -> None:
    batch = _find(call)
    if batch is None:
        return
    if batch.phase(call.now) not in TERMINAL:
        call.send_error(404, "model_not_found", f"Message Batch {batch.id} has not ended; no results yet.")
        return
    call.send_bytes(
        200, jsonl([_result_line(batch, i, call.now) for i in range(len(batch.items))]), "application/binary"
    )


def list_batches(call: Call) -> None:
    batches = call.book.newest_first(call.provider.name)
    ids = [b.id for b in batches]
    after, before = call.query.get("after_id"), call.query.get("before_id")
    if after:
        batches = batches[ids.index(after) + 1 :] if after in ids else []
    elif before:
        batches = batches[: ids.index(before)] if before in ids else []
    try:
        limit = min(MAX_LIST, max(1, int(call.query.get("limit", "20"))))
    except ValueError:
        call.send_error(400, "bad_request", "limit: must be an integer")
        return
    # Paging backwards takes the page just before the cursor.
    page = batches[-limit:] if before and not after else batches[:limit]
    data = [batch_object(b, call, call.now) for b in page]
    call.send(
        200,
        {
            "data": data,
            "has_more": len(batches) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        },
    )


def _find(call: Call) -> Batch | None:
    batch = call.book.batch(call.provider.name, call.params["id"])
    if batch is None:
        call.send_error(404, "model_not_found", f"No Message Batch with id {call.params['id']!r}.")
    return batch


def batch_object(batch: Batch, call: Call, now: float) -> dict[str, Any]:
    phase = batch.phase(now)
    ended = phase in TERMINAL
    counts = batch.counts(now) if ended else {}
    request_counts = {name: counts.get(name, 0) for name in COUNTED}
    request_counts["processing"] = 0 if ended else len(batch.items)
    base = call.base_url() + "/" + call.provider.name
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": STATUS.get(phase, "in_progress"),
        "request_counts": request_counts,
        "ended_at": rfc3339(batch.ended_at()) if ended else None,
        "created_at": rfc3339(batch.created_at),
        "expires_at": rfc3339(batch.created_at + DAY_S),
        "archived_at": None,
        "cancel_initiated_at": rfc3339(batch.cancel_at) if batch.cancel_at is not None else None,
        "results_url": f"{base}/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def _result_line(batch: Batch, index: int, now: float) -> dict[str, Any]:
    item = batch.items[batch.result_order[index]]
    outcome = batch.outcome(item, now)
    result: dict[str, Any] = {"type": outcome}
    if outcome == "succeeded":
        result["message"] = item.body
    elif outcome == "errored":
        result["error"] = item.body  # the full error envelope: {"type":"error","error":{…},"request_id":…}
    return {"custom_id": item.custom_id, "result": result}
