"""The SQL store (SQLAlchemy 2.0): jobs, attempts and batches."""

from workers.store.models import FAILED, FINAL, OPEN, PARKED, QUEUED, RUNNING, SUCCEEDED, Attempt, Batch, Job
from workers.store.store import AttemptRecord, Claim, Store, aware, utcnow

__all__ = [
    "FAILED",
    "FINAL",
    "OPEN",
    "PARKED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "Attempt",
    "AttemptRecord",
    "Batch",
    "Claim",
    "Job",
    "Store",
    "aware",
    "utcnow",
]
