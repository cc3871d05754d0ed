"""The SQL store (SQLAlchemy 2.0): jobs, attempts and batches."""

from workers.store.engine import aware, utcnow
from workers.store.jobs import AttemptRecord, Claim, DuplicateJob, FirstRun, as_finished
from workers.store.models import (
    BATCHED,
    FAILED,
    FINAL,
    IN_DOUBT,
    OPEN,
    PARKED,
    QUEUED,
    RUNNING,
    STARTED,
    SUCCEEDED,
    ApiBatch,
    ApiFile,
    Attempt,
    Batch,
    Job,
    ProviderBatch,
)
from workers.store.store import Store

__all__ = [
    "BATCHED",
    "FAILED",
    "FINAL",
    "IN_DOUBT",
    "OPEN",
    "PARKED",
    "QUEUED",
    "RUNNING",
    "STARTED",
    "SUCCEEDED",
    "ApiBatch",
    "ApiFile",
    "Attempt",
    "AttemptRecord",
    "Batch",
    "Claim",
    "DuplicateJob",
    "FirstRun",
    "Job",
    "ProviderBatch",
    "Store",
    "as_finished",
    "aware",
    "utcnow",
]
