"""What the OpenAI-compatible front door keeps: uploaded files and Batch API batches, each
visible only to the tenant that made it (`owner`), and the cancel of a batch's open jobs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import defer

from workers.store.engine import Database, utcnow
from workers.store.models import FAILED, FINAL, PARKED, QUEUED, ApiBatch, ApiFile, Job

CANCELLED_KIND = "cancelled"


class ApiStore(Database):
    """Files and API batches by owner; jobs a waiting HTTP request asks after."""

    def add_file(self, **values: Any) -> ApiFile:
        row = ApiFile(created_at=utcnow(), **values)
        with self.session() as s:
            s.add(row)
        return row

    def file(self, owner: str, file_id: str) -> ApiFile | None:
        with self.session(write=False) as s:
            row = s.get(ApiFile, file_id)
            return row if row is not None and row.owner == owner else None

    def files(self, owner: str, *, limit: int) -> list[ApiFile]:
        """The owner's uploads, newest first (without loading their content)."""
        with self.session(write=False) as s:
            query = (
                select(ApiFile).where(ApiFile.owner == owner).order_by(ApiFile.created_at.desc()).limit(limit)
            )
            return list(s.scalars(query.options(defer(ApiFile.content))))

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self.session() as s:
            done = s.execute(delete(ApiFile).where(ApiFile.id == file_id, ApiFile.owner == owner))
        return bool(done.rowcount)

    def add_api_batch(self, **values: Any) -> ApiBatch:
        row = ApiBatch(created_at=utcnow(), **values)
        with self.session() as s:
            s.add(row)
        return row

    def api_batch(self, owner: str, batch_id: str) -> ApiBatch | None:
        with self.session(write=False) as s:
            row = s.get(ApiBatch, batch_id)
            return row if row is not None and row.owner == owner else None

    def batch_of_api_batch(self, api_batch_id: str) -> str | None:
        """The Spillway batch under a front-door batch (`batch_…`, any tenant's: for the
        operator's command line), or None."""
        with self.session(write=False) as s:
            row = s.get(ApiBatch, api_batch_id)
            return row.batch_id if row is not None else None

    def api_batches(self, owner: str, *, after: str | None, limit: int) -> list[ApiBatch]:
        """The owner's batches, newest first, from after the one named `after` (its cursor)."""
        query = select(ApiBatch).where(ApiBatch.owner == owner)
        with self.session(write=False) as s:
            cursor = s.get(ApiBatch, after) if after else None
            if cursor is not None and cursor.owner == owner:
                query = query.where(
                    or_(
                        ApiBatch.created_at < cursor.created_at,
                        (ApiBatch.created_at == cursor.created_at) & (ApiBatch.id < cursor.id),
                    )
                )
            query = query.order_by(ApiBatch.created_at.desc(), ApiBatch.id.desc()).limit(limit)
            return list(s.scalars(query))

    def update_api_batch(self, api_id: str, **values: Any) -> None:
        with self.session() as s:
            s.execute(update(ApiBatch).where(ApiBatch.id == api_id).values(**values))

    def cancel_open_jobs(self, batch_id: str) -> list[Any]:
        """Fail the batch's jobs no worker runs now (queued or parked): their messages, when a
        worker takes them, find them final and do nothing. Running jobs finish. Returns the
        cancelled jobs' (id, tenant, created_at, est_input_tokens, request)."""
        now = utcnow()
        with self.session() as s:
            return list(
                s.execute(
                    update(Job)
                    .where(Job.batch_id == batch_id, Job.status.in_((QUEUED, PARKED)))
                    .values(
                        status=FAILED,
                        error="cancelled with its batch",
                        error_kind=CANCELLED_KIND,
                        finished_at=now,
                        updated_at=now,
                    )
                    .returning(Job.id, Job.tenant, Job.created_at, Job.est_input_tokens, Job.request)
                )
            )

    def finished_jobs(self, job_ids: list[str]) -> list[Job]:
        """Those of `job_ids` that are final (what HTTP requests waiting on them ask)."""
        with self.session(write=False) as s:
            return list(s.scalars(select(Job).where(Job.id.in_(job_ids), Job.status.in_(FINAL))))
