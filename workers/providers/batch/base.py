"""The batch interface every format implements, and what the formats share: checking and
splitting items, turning one answered body into an `ItemResult`, settling the requests a
provider left unanswered."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import httpx

from workers.errors import InputError, ProviderError, ServerError, SpillwayError
from workers.messages import ChatRequest
from workers.providers.base import ADAPTERS, Adapter
from workers.providers.signals import read_signal

if TYPE_CHECKING:
    from workers.config import ProviderConfig

OUTCOMES = ("succeeded", "failed", "expired", "cancelled")
#: What a body of the wrong shape raises inside `Adapter.parse` (as in `transport.complete`).
SHAPE_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError)
#: Bytes of a create call around its items (brackets, field names, multipart headers):
#: `split` keeps them free under `max_bytes`.
ENVELOPE_BYTES = 1024


@dataclass(frozen=True)
class BatchItem:
    custom_id: str  # Spillway's job id: results are matched on it, never on their order
    request: ChatRequest


@dataclass(frozen=True)
class BatchState:
    ended: bool  # no more results will come (completed, failed, expired, cancelled)
    status: str  # the provider's own word ("in_progress", "ended", "BATCH_STATE_RUNNING")
    done: int  # requests answered so far (ok or error) where the provider says; else 0
    total: int
    failed_whole: str | None = None  # the whole batch failed or was refused: why


@dataclass(frozen=True)
class ItemResult:
    custom_id: str
    outcome: str  # succeeded | failed | expired | cancelled
    text: str = ""
    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error: ProviderError | None = None  # "failed": classified like a synchronous call's error


#: (outcome, error) of a request an ended batch does not list.
Unanswered = tuple[str, ProviderError | None]


class BatchNotEnded(SpillwayError):
    """`results` was asked for before the batch ended: poll `state` until `ended` first."""


class BatchAdapter:
    """One provider batch API. Subclasses fill in the underscored methods and `item_line`."""

    name: ClassVar[str]  # the ProviderConfig.api it serves
    max_requests: ClassVar[int]
    max_bytes: ClassVar[int]

    @property
    def sync(self) -> Adapter:
        """The synchronous adapter of the same format: bodies, parsing, headers, errors."""
        return ADAPTERS[self.name]

    # -- the interface ------------------------------------------------------------------------

    def submit(
        self,
        client: httpx.Client,
        provider: ProviderConfig,
        api_key: str | None,
        model: str,
        items: Sequence[BatchItem],
        *,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Create the batch; the provider's batch id comes back. Raises InputError before any
        call when the items break this API's limits (`split` first)."""
        lines = [self.item_line(provider, model, item) for item in items]
        self._check(items, lines)
        return self._create(client, provider, api_key, model, items, lines, metadata or {})

    def find(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, marker: str
    ) -> str | None:
        """The id of a recent batch created with `metadata={"spillway": marker}`, if this API
        can say (one whose creator died before it stored the id); None: none, or cannot tell."""
        return None

    def state(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> BatchState:
        return self._state(self._fetch(client, provider, api_key, batch_id))

    def results(
        self,
        client: httpx.Client,
        provider: ProviderConfig,
        api_key: str | None,
        batch_id: str,
        items: Sequence[BatchItem],
    ) -> list[ItemResult]:
        """One result per submitted item, in `items` order, once the batch has ended.

        `items` is the batch as submitted (same order): each answer is parsed with its own
        request, as the synchronous call would be. A request the provider does not list takes
        the batch's end: "expired" or "cancelled", the whole-batch error, or a retryable
        ServerError when a completed batch left it out."""
        batch = self._fetch(client, provider, api_key, batch_id)
        state = self._state(batch)
        if not state.ended:
            raise BatchNotEnded(f"{provider.name} batch {batch_id} has not ended (status {state.status})")
        found: dict[str, ItemResult] = {}
        for result in self._answers(client, provider, api_key, batch, items):
            found.setdefault(result.custom_id, result)  # a repeated line does not count twice
        outcome, error = self._unanswered(batch, provider)
        return [
            found.get(item.custom_id) or ItemResult(item.custom_id, outcome, error=copy.copy(error))
            for item in items
        ]

    def cancel(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> None:
        """Ask the provider to stop; answered requests keep their results. Cancelling takes a
        while: poll `state` until it has ended."""
        raise NotImplementedError

    def split(
        self, items: Sequence[BatchItem], provider: ProviderConfig, model: str
    ) -> list[list[BatchItem]]:
        """Chunks, in order, that each fit `max_requests` and `max_bytes` (measured on the
        serialized lines). An item too big for any batch gets a chunk of its own, which the
        provider will refuse: send that one synchronously."""
        budget = self.max_bytes - ENVELOPE_BYTES
        chunks: list[list[BatchItem]] = []
        current: list[BatchItem] = []
        size = 0
        for item in items:
            length = len(self.item_line(provider, model, item)) + 1  # + separator
            if current and (len(current) >= self.max_requests or size + length > budget):
                chunks.append(current)
                current, size = [], 0
            current.append(item)
            size += length
        if current:
            chunks.append(current)
        return chunks

    # -- what each format fills in -------------------------------------------------------------

    def item_line(self, provider: ProviderConfig, model: str, item: BatchItem) -> bytes:
        """One item as it goes into the create call (without its separator)."""
        raise NotImplementedError

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
        raise NotImplementedError

    def _fetch(
        self, client: httpx.Client, provider: ProviderConfig, api_key: str | None, batch_id: str
    ) -> dict[str, Any]:
        """The provider's batch object."""
        raise NotImplementedError

    def _state(self, batch: dict[str, Any]) -> BatchState:
        raise NotImplementedError

    def _answers(
        self,
        client: httpx.Client,
        provider: ProviderConfig,
        api_key: str | None,
        batch: dict[str, Any],
        items: Sequence[BatchItem],
    ) -> Iterable[ItemResult]:
        """Every result the provider lists for one of `items`, in any order; lines for ids
        not among them (or unreadable) are skipped."""
        raise NotImplementedError

    def _unanswered(self, batch: dict[str, Any], provider: ProviderConfig) -> Unanswered:
        """(outcome, error) of a request this ended batch does not list."""
        raise NotImplementedError

    # -- shared checks -------------------------------------------------------------------------

    def _check(self, items: Sequence[BatchItem], lines: list[bytes]) -> None:
        if not items:
            raise InputError("a batch needs at least one item")
        if len(items) > self.max_requests:
            raise InputError(
                f"{len(items):,} items: a {self.name} batch takes at most {self.max_requests:,} (split first)"
            )
        size = sum(len(line) + 1 for line in lines) + ENVELOPE_BYTES
        if size > self.max_bytes:
            raise InputError(
                f"about {size:,} bytes: a {self.name} batch takes at most {self.max_bytes:,} (split first)"
            )
        seen: set[str] = set()
        for item in items:
            if item.custom_id in seen:
                raise InputError(f"custom_id {item.custom_id!r} appears twice in one batch")
            seen.add(item.custom_id)


# -- one result ---------------------------------------------------------------------------------


def answered(provider: ProviderConfig, custom_id: str, body: Any, request: ChatRequest) -> ItemResult:
    """A body the provider answered 2xx, parsed as the synchronous call parses it; a body of the
    wrong shape fails only this item, retryably."""
    try:
        text, finish, input_tokens, output_tokens = ADAPTERS[provider.api].parse(body, request)
    except SHAPE_ERRORS as exc:
        problem = f"missing {exc}" if isinstance(exc, KeyError) else type(exc).__name__
        error = ServerError(f"result does not have the {provider.api} shape ({problem})", provider.name, 200)
        return ItemResult(custom_id, "failed", error=error)
    return ItemResult(custom_id, "succeeded", text, finish, input_tokens, output_tokens)


def errored(provider: ProviderConfig, custom_id: str, status: int, body: Any) -> ItemResult:
    """A request the provider answered with an error: classified as the same status and body
    would be on the synchronous endpoint (400 final, 5xx retryable, 429 with its hints)."""
    return ItemResult(custom_id, "failed", error=classified(provider, status, body))


def classified(provider: ProviderConfig, status: int, body: Any) -> ProviderError:
    signal = read_signal(provider.signals, {}, body, time.time())
    return ADAPTERS[provider.api].classify(status, body, signal, provider)


def not_listed(provider: ProviderConfig) -> ServerError:
    return ServerError("the batch ended without a result for this request", provider.name)


def number(value: Any) -> int:
    """A count as the provider wrote it (int, or an int64 string in proto JSON); else 0."""
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def string(body: dict[str, Any], key: str, provider: ProviderConfig, what: str) -> str:
    """A field a success answer must carry; without it the answer is a retryable ServerError."""
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ServerError(f"{what} answer has no {key!r}", provider.name)
    return value


def objects(values: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a results stream; anything else is skipped (its item is settled as
    not listed, never lost silently)."""
    return (value for value in values if isinstance(value, dict))


BATCH_ADAPTERS: dict[str, BatchAdapter] = {}


def register(cls: type[BatchAdapter]) -> type[BatchAdapter]:
    BATCH_ADAPTERS[cls.name] = cls()
    return cls


def batch_adapter(provider: ProviderConfig) -> BatchAdapter:
    """The batch API of the provider's wire format."""
    adapter = BATCH_ADAPTERS.get(provider.api)
    if adapter is None:
        known = ", ".join(sorted(BATCH_ADAPTERS))
        raise InputError(
            f"provider {provider.name!r} (api {provider.api!r}) has no batch API here (batch APIs: {known})"
        )
    return adapter
