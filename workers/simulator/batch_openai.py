"""OpenAI's Batch API, for every provider on the OpenAI wire format (under its own prefix:
``/openai/v1/batches``, ``/groq/openai/v1/batches``).

Files: ``POST /files`` (multipart, purpose=batch), ``GET /files/{id}``, ``GET /files/{id}/content``.
Batches: ``POST /batches``, ``GET /batches/{id}``, ``POST /batches/{id}/cancel``,
``GET /batches`` (``after``, ``limit``; newest first, ``has_more``).

Shapes follow shared/provider-protocols.md section 6 and the openai SDK's ``Batch``,
``FileObject`` and ``BatchError`` types. Output and error file lines:
``{"id":"batch_req_…","custom_id":…,"response":{"status_code":200,"request_id":…,"body":{…}},"error":null}``;
requests the batch never ran have ``"response":null`` and an ``error`` of ``batch_expired`` or
``batch_cancelled`` (the codes of the API's BatchRequestOutput error).
"""

from __future__ import annotations

import email.policy
import json
from email.parser import BytesParser
from typing import Any

from workers.simulator.batches import (
    DAY_S,
    TERMINAL,
    Batch,
    Call,
    Entry,
    Item,
    StoredFile,
    jsonl,
    new_id,
    plan,
    stable_id,
)
from workers.simulator.formats import BadSimRequest

ENDPOINT = "/v1/chat/completions"
MAX_LIST = 100
#: Simulator phase -> the Batch object's timestamp field that marks it.
PHASE_STAMPS = {
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
    "completed": "completed_at",
}
UNANSWERED = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "canceled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
}


# -- files ------------------------------------------------------------------------------------


def upload_file(call: Call) -> None:
    fields = _multipart(call.handler.headers.get("content-type") or "", call.body)
    if fields is None or "file" not in fields:
        call.send_error(400, "bad_request", "Expected a multipart/form-data body with a 'file' field.")
        return
    purpose = fields.get("purpose", (None, b""))[1].decode(errors="replace")
    if purpose != "batch":
        call.send_error(400, "bad_request", f"The simulator only takes purpose 'batch', got {purpose!r}.")
        return
    filename, content = fields["file"]
    stored = StoredFile(
        new_id("file-", 22), call.provider.name, filename or "upload.jsonl", "batch", call.now, content
    )
    call.book.add_file(stored)
    call.send(200, _file_object(stored, len(content)))


def get_file(call: Call) -> None:
    found = _readable_file(call)
    if found is not None:
        call.send(200, _file_object(found[0], len(found[1])))


def file_content(call: Call) -> None:
    found = _readable_file(call)
    if found is not None:
        call.send_bytes(200, found[1], "application/octet-stream")


def _readable_file(call: Call) -> tuple[StoredFile, bytes] | None:
    """The file and its bytes; a 404 when it does not exist (yet: output files appear once
    their batch has ended)."""
    stored = call.book.file(call.provider.name, call.params["id"])
    content = None if stored is None else _content(call, stored)
    if stored is None or content is None:
        call.send_error(404, "bad_request", f"No such File object: {call.params['id']}")
        return None
    return stored, content


def _content(call: Call, stored: StoredFile) -> bytes | None:
    if stored.content is not None:
        return stored.content
    batch = call.book.batch(call.provider.name, stored.batch_id or "")
    if batch is None or batch.phase(call.now) not in TERMINAL:
        return None
    return jsonl(_result_lines(batch, call.now)[stored.part])


def _file_object(stored: StoredFile, size: int) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "file",
        "bytes": size,
        "created_at": int(stored.created_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """name -> (filename, bytes) of a multipart/form-data body; None when it is not one."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return None
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


# -- batches ----------------------------------------------------------------------------------


def create_batch(call: Call) -> None:
    body = call.json_body()
    if not isinstance(body, dict):
        call.send_error(400, "bad_request", "The body must be a JSON object.")
        return
    if body.get("endpoint") != ENDPOINT:
        call.send_error(
            400, "bad_request", f"The simulator batches only {ENDPOINT}, got {body.get('endpoint')!r}."
        )
        return
    if body.get("completion_window") != "24h":
        call.send_error(400, "bad_request", "completion_window: only '24h' is supported.")
        return
    stored = call.book.file(call.provider.name, str(body.get("input_file_id", "")))
    if stored is None or stored.content is None or stored.purpose != "batch":
        call.send_error(400, "bad_request", f"No such input file: {body.get('input_file_id')!r}")
        return
    entries, problems = _read_input(call, stored.content)
    batch = plan(call.book, call.provider, entries, batch_id=new_id("batch_"), owner=call.owner, now=call.now)
    batch.extra.update(
        input_file_id=stored.id,
        metadata=body.get("metadata"),
        model=next((e.request.model for e in entries if e.request is not None), None),
    )
    if problems:
        batch.refusal = problems
        call.book.add_refused(batch)
        call.count("batch_refused")
    else:
        refused_model = call.book.admit(batch, call.provider.batch.queue_tokens, call.now)
        if refused_model is not None:
            batch.refusal = [_token_limit_error(refused_model, call.provider.batch.queue_tokens)]
            call.book.add_refused(batch)
            call.count("batch_refused")
        else:
            call.count("batches_created")
            call.count("batch_requests", len(batch.items))
            _register_result_files(call, batch)
    call.send(200, batch_object(batch, call.now))


def _read_input(call: Call, content: bytes) -> tuple[list[Entry], list[dict[str, Any]]]:
    """The input file's requests, and the problems that fail the whole batch in validation
    (a line that is not a request); a request body the chat endpoint would refuse is not a
    problem here: it is answered with that endpoint's error, in the error file."""
    entries: list[Entry] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.decode(errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            problems.append(
                _line_error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            )
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problems.append(
                _line_error("missing_required_parameter", "custom_id is required.", number, "custom_id")
            )
            continue
        if custom_id in seen:
            problems.append(
                _line_error(
                    "duplicate_custom_id",
                    "The custom_id for this request is a duplicate of another request. "
                    "The custom_id parameter must be unique for each request in a batch.",
                    number,
                    "custom_id",
                )
            )
            continue
        seen.add(custom_id)
        if line.get("method") != "POST" or line.get("url") != ENDPOINT:
            problems.append(
                _line_error(
                    "invalid_url",
                    f"Each request must be POST {ENDPOINT}, as the batch's endpoint.",
                    number,
                    "url",
                )
            )
            continue
        try:
            req = call.fmt.parse(ENDPOINT, call.handler.headers, line.get("body"), {})
            entries.append(Entry(custom_id, req))
        except BadSimRequest as exc:
            entries.append(Entry(custom_id, None, rejected=(400, "bad_request", str(exc))))
    if not entries and not problems:
        problems.append(_line_error("empty_file", "The input file has no requests.", None))
    return entries, problems


def _line_error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _token_limit_error(model: str, limit: int | None) -> dict[str, Any]:
    return _line_error(
        "token_limit_exceeded",
        f"Enqueued token limit reached for {model} in organization org-simulated. "
        f"Limit: {limit:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed.",
        None,
    )


def _register_result_files(call: Call, batch: Batch) -> None:
    """Output and error file ids are fixed now; the files appear once the batch has ended."""
    for kind in ("output", "error"):
        file_id = new_id("file-", 22)
        batch.extra[f"{kind}_file_id"] = file_id
        filename = f"batch_{batch.id}_{kind}.jsonl"
        call.book.add_file(
            StoredFile(
                file_id, call.provider.name, filename, "batch_output", call.now, batch_id=batch.id, part=kind
            )
        )


def get_batch(call: Call) -> None:
    batch = _find(call)
    if batch is not None:
        call.send(200, batch_object(batch, call.now))


def cancel_batch(call: Call) -> None:
    batch = _find(call)
    if batch is not None:
        call.book.cancel(batch, call.now)
        call.send(200, batch_object(batch, call.now))


def list_batches(call: Call) -> None:
    batches = call.book.newest_first(call.provider.name)
    after = call.query.get("after")
    if after:
        ids = [b.id for b in batches]
        batches = batches[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = min(MAX_LIST, max(1, int(call.query.get("limit", "20"))))
    except ValueError:
        call.send_error(400, "bad_request", "limit must be an integer")
        return
    page = [batch_object(b, call.now) for b in batches[:limit]]
    call.send(
        200,
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        },
    )


def _find(call: Call) -> Batch | None:
    batch = call.book.batch(call.provider.name, call.params["id"])
    if batch is None:
        call.send_error(404, "bad_request", f"No batch found with id '{call.params['id']}'.")
    return batch


# -- rendering --------------------------------------------------------------------------------


def batch_object(batch: Batch, now: float) -> dict[str, Any]:
    phase = batch.phase(now)
    counts = batch.counts(now)
    ended = phase in TERMINAL and batch.refusal is None
    has_output = ended and counts["succeeded"] > 0
    has_errors = ended and counts["succeeded"] < len(batch.items)
    stamp = int(batch.started_at)
    obj: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "model": batch.extra.get("model"),
        "errors": {"object": "list", "data": batch.refusal} if batch.refusal and phase == "failed" else None,
        "input_file_id": batch.extra["input_file_id"],
        "completion_window": "24h",
        "status": phase,
        "output_file_id": batch.extra.get("output_file_id") if has_output else None,
        "error_file_id": batch.extra.get("error_file_id") if has_errors else None,
        "created_at": int(batch.created_at),
        "in_progress_at": stamp if batch.refusal is None and now >= batch.started_at else None,
        "expires_at": int(batch.created_at + DAY_S),
        "finalizing_at": int(batch.finalizing_at) if phase in ("finalizing", "completed") else None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": int(batch.cancel_at) if batch.cancel_at is not None else None,
        "cancelled_at": None,
        "request_counts": {
            "total": len(batch.items),
            "completed": counts["succeeded"],
            "failed": counts["errored"],
        },
        "metadata": batch.extra.get("metadata"),
    }
    if phase in PHASE_STAMPS:
        obj[PHASE_STAMPS[phase]] = int(batch.ended_at())
    input_tokens, output_tokens = batch.usage(now)
    obj["usage"] = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
    return obj


def _result_lines(batch: Batch, now: float) -> dict[str, list[dict[str, Any]]]:
    """The output file's lines (answered 200) and the error file's (everything else)."""
    out: dict[str, list[dict[str, Any]]] = {"output": [], "error": []}
    for item in batch.in_result_order():
        outcome = batch.outcome(item, now)
        if outcome == "processing":
            continue
        out["output" if outcome == "succeeded" else "error"].append(_result_line(batch, item, outcome))
    return out


def _result_line(batch: Batch, item: Item, outcome: str) -> dict[str, Any]:
    line: dict[str, Any] = {
        "id": stable_id("batch_req_", batch.id, item.custom_id),
        "custom_id": item.custom_id,
    }
    if outcome in UNANSWERED:
        code, message = UNANSWERED[outcome]
        return {**line, "response": None, "error": {"code": code, "message": message}}
    request_id = stable_id("req_", batch.id, item.custom_id, "request")
    response = {"status_code": item.status, "request_id": request_id, "body": item.body}
    return {**line, "response": response, "error": None}
