"""A batch's end: the chord callback records its summary in the store, exactly once."""

from __future__ import annotations

import logging
from typing import Any

from workers.store import Store

log = logging.getLogger("spillway.batches")


def finish_chunk(store: Store, batch_id: str, chunk: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One chord of the batch is done. When no job of the batch is open any more, the batch
    summary (counts, tokens, cost, wall time) is written — once, whichever callback gets there."""
    store.count_batch_callback(batch_id)
    summary = store.complete_batch(batch_id)
    failed = sum(1 for r in results if isinstance(r, dict) and r.get("status") != "succeeded")
    if summary is not None:
        log.info("batch %s finished: %s", batch_id, {k: v for k, v in summary.items() if k != "providers"})
    return {"batch_id": batch_id, "chunk": chunk, "jobs": len(results), "failed": failed}
