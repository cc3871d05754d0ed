"""`/v1/files`: batch inputs checked whole on upload, and a batch's output and error files."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

from tornado.httputil import HTTPFile, parse_body_arguments
from tornado.web import stream_request_body

from producer.batch import openai_record
from producer.batchfile import MAX_CUSTOM_ID, OPENAI_URL, is_openai_line
from producer.ops.openai.errors import ApiError, not_found
from producer.ops.openai.handler import ApiHandler
from workers.runtime import Runtime
from workers.store import FAILED, SUCCEEDED, ApiBatch, ApiFile, aware

log = logging.getLogger("spillway.openai")

MAX_FILE_BYTES = 100 * 1024 * 1024
MAX_FILE_LINES = 50_000  # OpenAI's most requests in one batch


# -- files ---------------------------------------------------------------------------------------


def check_upload(content: bytes) -> tuple[int, list[str]]:
    """(lines, problems) of a batch input: each line an OpenAI Batch API request with a unique
    custom_id, POST to /v1/chat/completions and a JSON object body; nothing about models (a
    line's model is checked when the batch is made, and reported in its error file)."""
    problems, seen, count = [], {}, 0
    for number, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        count += 1
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            problems.append(f"line {number}: not valid JSON")
            continue
        if not isinstance(value, dict) or not is_openai_line(value):
            problems.append(f"line {number}: expected a request object with custom_id, method, url and body")
            continue
        custom_id = value.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            problems.append(
                f"line {number}: custom_id: expected a non-empty string of at most {MAX_CUSTOM_ID} characters"
            )
        elif custom_id in seen:
            problems.append(
                f"line {number}: duplicate custom_id {custom_id!r} (first on line {seen[custom_id]})"
            )
        else:
            seen[custom_id] = number
        if value.get("method") != "POST":
            problems.append(f"line {number}: method: expected POST")
        if value.get("url") != OPENAI_URL:
            problems.append(f"line {number}: url: expected {OPENAI_URL}")
        if not isinstance(value.get("body"), dict):
            problems.append(f"line {number}: body: expected a JSON object")
    if count > MAX_FILE_LINES:
        problems.insert(0, f"{count} requests: a batch holds at most {MAX_FILE_LINES:,}")
    if not count:
        problems.append("the file has no requests")
    return count, problems


def file_object(row: ApiFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(aware(row.created_at).timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


@stream_request_body
class Files(ApiHandler):
    """Uploads are streamed in, so one over the limit gets a 413 that says so."""

    def prepare(self) -> None:
        super().prepare()
        self.chunks: list[bytes] = []
        self.received = 0
        if self.request.method == "POST":
            self.request.connection.set_max_body_size(MAX_FILE_BYTES + 1024 * 1024)  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received <= MAX_FILE_BYTES + 1024 * 1024:
            self.chunks.append(chunk)

    async def post(self) -> None:
        if self.received > MAX_FILE_BYTES + 1024 * 1024:
            raise ApiError(
                413,
                f"the file is larger than {MAX_FILE_BYTES // 1024 // 1024} MiB",
                param="file",
                code="file_too_large",
            )
        args: dict[str, list[bytes]] = {}
        files: dict[str, list[HTTPFile]] = {}
        parse_body_arguments(self.request.headers.get("Content-Type", ""), b"".join(self.chunks), args, files)
        self.chunks = []
        purpose = b"".join(args.get("purpose", [])).decode("utf-8", "replace")
        if purpose != "batch":
            raise ApiError(
                400, f"purpose: Spillway takes purpose 'batch' only, got {purpose!r}", param="purpose"
            )
        if "file" not in files:
            raise ApiError(400, "file: a multipart field named 'file' is required", param="file")
        upload = files["file"][0]
        if len(upload.body) > MAX_FILE_BYTES:
            raise ApiError(
                413,
                f"the file is larger than {MAX_FILE_BYTES // 1024 // 1024} MiB",
                param="file",
                code="file_too_large",
            )
        lines, problems = check_upload(upload.body)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ApiError(400, "; ".join(problems[:5]) + more, param="file", code="invalid_file")
        row = await self.blocking(
            self.rt.store.add_file,
            id=f"file-{uuid.uuid4().hex[:24]}",
            owner=self.tenant.name,
            purpose=purpose,
            filename=(upload.filename or "batch.jsonl")[:256],
            bytes=len(upload.body),
            lines=lines,
            content=upload.body,
        )
        self.reply(file_object(row))

    async def get(self) -> None:
        rows = await self.blocking(self.rt.store.files, self.tenant.name, limit=10_000)
        self.reply({"object": "list", "data": [file_object(row) for row in rows], "has_more": False})


class File(ApiHandler):
    async def get(self, file_id: str, content: str | None) -> None:
        derived = await self.blocking(derived_file, self.rt, self.tenant.name, file_id)
        if derived is not None:
            api, which = derived
            if content:
                self.set_header("Content-Type", "application/jsonl")
                for chunk in _chunks(result_lines(self.rt, api, which)):
                    self.write(chunk)
                    await self.flush()
                self.finish()
                return
            size = sum(len(c) for c in await self.blocking(lambda: list(result_lines(self.rt, api, which))))
            self.reply(
                {
                    "id": file_id,
                    "object": "file",
                    "bytes": size,
                    "created_at": int(aware(api.created_at).timestamp()),
                    "filename": f"{api.id}_{which}.jsonl",
                    "purpose": "batch_output",
                    "status": "processed",
                    "status_details": None,
                    "expires_at": None,
                }
            )
            return
        row = await self.blocking(self.rt.store.file, self.tenant.name, file_id)
        if row is None:
            raise not_found("File", file_id)
        if content:
            self.set_header("Content-Type", "application/jsonl")
            self.finish(row.content)
        else:
            self.reply(file_object(row))

    async def delete(self, file_id: str, content: str | None) -> None:
        if content or not await self.blocking(self.rt.store.delete_file, self.tenant.name, file_id):
            raise not_found("File", file_id)
        self.reply({"id": file_id, "object": "file", "deleted": True})


def derived_file(rt: Runtime, owner: str, file_id: str) -> tuple[ApiBatch, str] | None:
    """An output or error file: ``file-output-<batch>`` or ``file-errors-<batch>``."""
    match = re.fullmatch(r"file-(output|errors)-([0-9a-f]{24})", file_id)
    if match is None:
        return None
    api = rt.store.api_batch(owner, f"batch_{match[2]}")
    return None if api is None or api.batch_id is None else (api, match[1])


def result_lines(rt: Runtime, api: ApiBatch, which: str) -> Iterator[bytes]:
    """The batch's output (succeeded) or error (failed, cancelled) lines, in input order."""
    after = -1
    while True:
        page = rt.store.batch_jobs(api.batch_id, after_seq=after, limit=1000)
        if not page:
            return
        for job in page:
            if (job.status == SUCCEEDED) == (which == "output") and job.status in (SUCCEEDED, FAILED):
                yield (json.dumps(openai_record(job), ensure_ascii=False) + "\n").encode()
        after = page[-1].seq


def _chunks(lines: Iterator[bytes], size: int = 256 * 1024) -> Iterator[bytes]:
    buffer: list[bytes] = []
    held = 0
    for line in lines:
        buffer.append(line)
        held += len(line)
        if held >= size:
            yield b"".join(buffer)
            buffer, held = [], 0
    if buffer:
        yield b"".join(buffer)
