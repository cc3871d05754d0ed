"""A batch's end: the chord callback records its summary in the store, exactly once."""

from __future__ import annotations

import logging
from typing import Any

from workers.store import Job, Store

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


def chord_callback(batch_id: str, chunk: int, chord_id: str) -> Any:
    """The callback of a batch chunk's chord: rebuilt the same way when a job is re-sent."""
    from workers.tasks import finish_batch

    callback = finish_batch.signature(kwargs={"batch_id": batch_id, "chunk": chunk})
    callback.freeze(f"{chord_id}-done", group_id=chord_id)
    return callback


def chord_options(job: Job) -> dict[str, Any]:
    """Options that put a re-sent batch job back into its chord (empty for a single job)."""
    if not job.chord_id or job.batch_id is None:
        return {}
    return {
        "group_id": job.chord_id,
        "group_index": job.chord_index,
        "chord": chord_callback(job.batch_id, job.chord_chunk or 0, job.chord_id),
    }
