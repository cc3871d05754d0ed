"""The providers' batch APIs (half price, answers within 24 h), one adapter per wire format:
``openai`` (OpenAI Batch: JSONL file upload + /batches, also Groq and other compatibles),
``anthropic`` (Message Batches), ``gemini`` (batchGenerateContent, inline requests).

    adapter = batch_adapter(provider)                # by ProviderConfig.api; InputError if none
    for chunk in adapter.split(items, provider, model):
        batch_id = adapter.submit(client, provider, key, model, chunk, metadata={...})
    adapter.state(client, provider, key, batch_id)   # -> BatchState(ended, status, done, total,
                                                     #                failed_whole)
    adapter.results(client, provider, key, batch_id, chunk)  # once ended -> [ItemResult]
    adapter.cancel(client, provider, key, batch_id)

`BatchItem(custom_id, request)`: the custom_id is Spillway's job id; results are matched on it,
never on order. `results` takes the chunk as submitted (same order) and answers one
`ItemResult` per item, in that order: "succeeded" with text, finish reason and tokens parsed by
the synchronous adapter; "failed" with `error` classified like a synchronous call's
(`BadRequest` final, `ServerError`/`Overloaded`/`ProviderTimeout` retryable, `RateLimited` with
its retry time); "expired" or "cancelled" for requests the batch never ran (resubmit them).
A result body of the wrong shape fails that item with a retryable `ServerError`. Calling
`results` before the batch ended raises `BatchNotEnded`.

Each item's body, headers and auth come from the synchronous adapter of the same format.
Failures of the batch endpoints themselves (401, 429, 5xx, timeouts, connection errors) raise
the `ProviderError`s `transport.complete` raises. `submit` raises InputError, before any call,
for an empty chunk, repeated custom_ids or a chunk over `max_requests` / `max_bytes`.

Whole-batch refusals: Anthropic and Gemini refuse at create time (429 `RateLimited` when the
batch queue is full); OpenAI accepts the create and the batch then ends "failed" with
`failed_whole` saying why (e.g. ``token_limit_exceeded``), its items failed with
`RateLimited` (queue full: later) or `BadRequest`.
"""

from workers.providers.batch import anthropic, gemini, openai  # noqa: F401  (they register)
from workers.providers.batch.base import (
    BATCH_ADAPTERS,
    OUTCOMES,
    BatchAdapter,
    BatchItem,
    BatchNotEnded,
    BatchState,
    ItemResult,
    batch_adapter,
)

__all__ = [
    "BATCH_ADAPTERS",
    "OUTCOMES",
    "BatchAdapter",
    "BatchItem",
    "BatchNotEnded",
    "BatchState",
    "ItemResult",
    "batch_adapter",
]
