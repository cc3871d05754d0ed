"""The store: the source of truth for every job, attempt, token and dollar.

One class put together from its parts, each a module of its own:

    engine.py   which database, its engine, pragmas and sessions (`Database`)
    jobs.py     the job hot path: store, claim, finish, requeue, republish (`JobStore`)
    batches.py  batch bookkeeping: rows, pages, resumes, totals, summaries (`BatchStore`)
    reports.py  read-only counts and the usage report (`ReportStore`)
    api.py      the OpenAI-compatible front door's files and batches (`ApiStore`)
    provider_batches.py  jobs sent through the providers' batch APIs (`ProviderBatchStore`)
"""

from __future__ import annotations

from workers.store.api import ApiStore
from workers.store.batches import BatchStore
from workers.store.jobs import JobStore
from workers.store.provider_batches import ProviderBatchStore
from workers.store.reports import ReportStore


class Store(JobStore, BatchStore, ReportStore, ApiStore, ProviderBatchStore):
    """`Store(url=None, *, schema=None)`: SQLite by default, PostgreSQL by URL (see `Database`)."""
