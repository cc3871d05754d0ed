"""The batch engine behind the simulator's three batch APIs (``batch_openai``,
``batch_anthropic``, ``batch_gemini``; ``batch_routes`` sends calls to them).

A batch is planned in full when it is created: every request is answered then, exactly as
the synchronous endpoint would answer it (same parser, same reply, same token counts), and
given the moment it counts as done. Nothing runs in the background afterwards: a batch's
state is worked out from the clock whenever it is read, so a thousand idle batches cost
nothing and a test only has to wait out the turnaround.

Batch requests never touch the synchronous per-minute quota (the providers give batches
their own capacity); the only batch limit is the optional per-model queue of enqueued
input tokens (``batch = { queue_tokens = ... }``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from workers.simulator.formats import FORMATS, SimFormat, SimRequest, reply
from workers.simulator.settings import SimProvider

if TYPE_CHECKING:
    from workers.simulator.server import Handler, Simulation

#: Shares of the turnaround: OpenAI "validating" / Gemini "pending" before any work starts,
#: OpenAI "finalizing" after the last answer, and how long a cancel takes to settle.
VALIDATING_SHARE = 0.1
FINALIZING_SHARE = 0.1
CANCEL_SHARE = 0.1
DAY_S = 86_400.0  # OpenAI's completion window and Anthropic's expires_at: 24 h after creation

#: Phases every format maps onto its own statuses.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
SERVER_ERROR = (500, "server", "The server had an error while processing your request.")


@dataclass
class Entry:
    """One request of a batch as the client sent it, read by a format module."""

    custom_id: str
    request: SimRequest | None  # None when `rejected`
    metadata: Any = None  # Gemini's per-request metadata, echoed in its response
    rejected: tuple[int, str, str] | None = None  # (status, kind, message) the sync call would get


@dataclass
class Item:
    """One planned answer."""

    custom_id: str
    metadata: Any
    model: str
    succeeded: bool
    status: int  # the HTTP status the synchronous endpoint would have answered
    body: dict[str, Any]  # and its body: the format's success or error body
    input_tokens: int
    output_tokens: int
    done_at: float  # when it counts as answered; math.inf: never (its batch expires first)


@dataclass
class Batch:
    id: str
    provider: str
    owner: str  # the quota owner: the key, or "org" where the provider's quota is shared
    items: list[Item]
    created_at: float
    started_at: float
    finalizing_at: float
    ends_at: float
    expires: bool
    result_order: list[int]  # results files are not in request order: clients match on ids
    refusal: list[dict[str, Any]] | None = None  # OpenAI: why the batch fails validation
    cancel_at: float | None = None
    cancel_done_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the format's own fields

    def phase(self, now: float) -> str:
        """validating | in_progress | finalizing | completed | failed | expired | cancelling | cancelled"""
        if self.refusal is not None:
            return "validating" if now < self.started_at else "failed"
        if self.cancel_done_at is not None:
            return "cancelling" if now < self.cancel_done_at else "cancelled"
        if now < self.started_at:
            return "validating"
        if self.expires:
            return "in_progress" if now < self.ends_at else "expired"
        if now < self.finalizing_at:
            return "in_progress"
        return "finalizing" if now < self.ends_at else "completed"

    def ended_at(self) -> float:
        """When the batch reaches (or reached) its terminal phase."""
        if self.refusal is not None:
            return self.started_at
        return self.cancel_done_at if self.cancel_done_at is not None else self.ends_at

    def outcome(self, item: Item, now: float) -> str:
        """processing | succeeded | errored | canceled | expired"""
        cutoff = self.cancel_at if self.cancel_at is not None else math.inf
        if item.done_at <= min(now, cutoff):
            return "succeeded" if item.succeeded else "errored"
        phase = self.phase(now)
        if phase == "cancelled":
            return "canceled"
        if phase == "expired":
            return "expired"
        return "processing"

    def counts(self, now: float) -> Counter[str]:
        return Counter(self.outcome(item, now) for item in self.items)

    def in_result_order(self) -> list[Item]:
        return [self.items[i] for i in self.result_order]

    def usage(self, now: float) -> tuple[int, int]:
        """(input, output) tokens of the requests answered so far."""
        done = [i for i in self.items if self.outcome(i, now) == "succeeded"]
        return sum(i.input_tokens for i in done), sum(i.output_tokens for i in done)


@dataclass
class StoredFile:
    """An OpenAI file: an uploaded input, or a batch's output or error file (built on read)."""

    id: str
    provider: str
    filename: str
    purpose: str
    created_at: float
    content: bytes | None = None  # None: built from the batch's results when read
    batch_id: str | None = None
    part: str = ""  # of a batch's results: "output" or "error"


class BatchBook:
    """Every batch and file of one simulator run; `/_sim/reset` starts a new book."""

    def __init__(self, seed: int | None, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.random = random.Random(seed)  # its own stream: batches leave the fault draws alone
        self.lock = threading.Lock()
        self.batches: dict[str, Batch] = {}
        self.files: dict[str, StoredFile] = {}

    def draw(self) -> float:
        with self.lock:
            return self.random.random()

    def batch(self, provider: str, batch_id: str) -> Batch | None:
        with self.lock:
            found = self.batches.get(batch_id)
        return found if found is not None and found.provider == provider else None

    def newest_first(self, provider: str) -> list[Batch]:
        with self.lock:
            mine = [b for b in self.batches.values() if b.provider == provider]
        return sorted(mine, key=lambda b: b.created_at, reverse=True)

    def add_file(self, stored: StoredFile) -> None:
        with self.lock:
            self.files[stored.id] = stored

    def file(self, provider: str, file_id: str) -> StoredFile | None:
        with self.lock:
            found = self.files.get(file_id)
        return found if found is not None and found.provider == provider else None

    def admit(self, batch: Batch, limit: int | None, now: float) -> str | None:
        """Queue the batch unless a model's enqueued input tokens would pass `limit`; the
        refused model's name comes back. Check and add under one lock: two creates at once
        cannot both squeeze under the limit."""
        wanted: Counter[str] = Counter()
        for item in batch.items:
            wanted[item.model] += item.input_tokens
        with self.lock:
            if limit is not None:
                queued: Counter[str] = Counter()
                for other in self.batches.values():
                    if (other.provider, other.owner) == (batch.provider, batch.owner) and (
                        other.phase(now) not in TERMINAL
                    ):
                        for item in other.items:
                            queued[item.model] += item.input_tokens
                for model, tokens in wanted.items():
                    if queued[model] + tokens > limit:
                        return model
            self.batches[batch.id] = batch
            return None

    def add_refused(self, batch: Batch) -> None:
        with self.lock:
            self.batches[batch.id] = batch

    def cancel(self, batch: Batch, now: float) -> None:
        """Requests not answered by now will be cancelled; answered ones keep their results.
        A batch that has already ended, or is already cancelling, stays as it is."""
        with self.lock:
            if batch.cancel_at is not None or batch.phase(now) in TERMINAL:
                return
            turnaround = batch.ends_at - batch.created_at
            batch.cancel_at = now
            batch.cancel_done_at = now + CANCEL_SHARE * turnaround


# -- planning ---------------------------------------------------------------------------------


def plan(
    book: BatchBook, provider: SimProvider, entries: list[Entry], *, batch_id: str, owner: str, now: float
) -> Batch:
    """Answer every request now and spread the answers over the configured turnaround."""
    behaviour = provider.batch
    turnaround = behaviour.turnaround_s
    started = now + VALIDATING_SHARE * turnaround
    finalizing = now + (1 - FINALIZING_SHARE) * turnaround
    expires = behaviour.expire_rate > 0 and book.draw() < behaviour.expire_rate
    # An expiring batch gets through the first half of its requests and no further.
    answered = len(entries) // 2 if expires else len(entries)
    items = []
    for index, entry in enumerate(entries):
        done_at = (
            started + (finalizing - started) * (index + 1) / len(entries) if index < answered else math.inf
        )
        items.append(_answer(book, provider, entry, done_at))
    order = list(range(len(items)))
    with book.lock:
        book.random.shuffle(order)
    return Batch(
        batch_id, provider.name, owner, items, now, started, finalizing, now + turnaround, expires, order
    )


def _answer(book: BatchBook, provider: SimProvider, entry: Entry, done_at: float) -> Item:
    fmt = FORMATS[provider.api]

    def failed(status: int, kind: str, message: str, model: str = "", tokens: int = 0) -> Item:
        body = fmt.error(status, kind, message)
        return Item(entry.custom_id, entry.metadata, model, False, status, body, tokens, 0, done_at)

    if entry.request is None:
        return failed(*(entry.rejected or (400, "bad_request", "invalid request")))
    req = replace(entry.request, tokenizer=provider.tokenizer)
    if req.model and provider.model_limits and req.model not in provider.model_limits:
        return failed(404, "model_not_found", f"The model `{req.model}` does not exist", req.model)
    if provider.batch.error_rate > 0 and book.draw() < provider.batch.error_rate:
        return failed(*SERVER_ERROR, model=req.model, tokens=req.input_tokens)
    text, out_tokens, cut = reply(req, provider.name)
    body = fmt.success(req, text, cut, out_tokens)
    return Item(
        entry.custom_id, entry.metadata, req.model, True, 200, body, req.input_tokens, out_tokens, done_at
    )


# -- one call ---------------------------------------------------------------------------------


@dataclass
class Call:
    """One batch API call as a format module sees it: who, what, and how to answer."""

    handler: Handler
    sim: Simulation
    provider: SimProvider
    key: str | None
    params: dict[str, str]  # the path's named parts (ids, model)
    query: dict[str, str]
    body: bytes
    now: float

    @property
    def fmt(self) -> SimFormat:
        return FORMATS[self.provider.api]

    @property
    def book(self) -> BatchBook:
        return self.sim.batch_book

    @property
    def owner(self) -> str:
        return "org" if self.provider.shared_quota else (self.key or "anonymous")

    def json_body(self) -> Any:
        """The body as JSON; None when it is missing or not JSON (callers answer 400)."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    def base_url(self) -> str:
        """This simulator as the client reached it, for absolute URLs (Anthropic's results_url)."""
        host = self.handler.headers.get("host")
        return f"http://{host}" if host else self.handler.server.url

    def count(self, what: str, amount: int = 1) -> None:
        with self.sim.lock:
            self.sim.stats[self.provider.name][what] += amount

    def send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def send_error(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.send(status, self.fmt.error(status, kind, message), headers)

    def send_bytes(
        self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        h = self.handler
        h.send_response(status)
        h.send_header("content-type", content_type)
        h.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)


# -- small shared helpers ---------------------------------------------------------------------


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def stable_id(prefix: str, *parts: str, length: int = 32) -> str:
    """The same id on every read of the same result (a results file is read more than once)."""
    return prefix + hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def rfc3339(moment_s: float) -> str:
    """``2025-12-10T18:27:01.407650Z``: Anthropic's and Gemini's timestamps."""
    return datetime.fromtimestamp(moment_s, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)
