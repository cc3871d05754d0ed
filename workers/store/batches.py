"""Batch bookkeeping: a batch's row, its jobs in input order, resumes, totals and its summary."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from workers import constants
from workers.store.engine import Database, aware, utcnow
from workers.store.models import FAILED, OPEN, QUEUED, SUCCEEDED, Batch, Job


class BatchStore(Database):
    """Batches and their jobs as a whole."""

    def add_batch(self, **values: Any) -> None:
        with self.session() as s:
            s.add(Batch(created_at=utcnow(), **values))

    def batch(self, batch_id: str) -> Batch | None:
        with self.session(write=False) as s:
            return s.get(Batch, batch_id)

    def update_batch(self, batch_id: str, **values: Any) -> None:
        with self.session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(**values))

    def batch_by_fingerprint(self, fingerprint: str) -> Batch | None:
        with self.session(write=False) as s:
            query = select(Batch).where(Batch.fingerprint == fingerprint).order_by(Batch.created_at.desc())
            return s.scalars(query).first()

    def batch_states(self, batch_id: str) -> dict[str, tuple[str, str]]:
        """custom_id -> (job id, status) of a batch's jobs; bad lines as ``#line<N>``."""
        with self.session(write=False) as s:
            rows = s.execute(
                select(Job.id, Job.custom_id, Job.status, Job.seq, Job.error_kind).where(
                    Job.batch_id == batch_id
                )
            ).all()
        states = {}
        for job_id, custom_id, status, seq, kind in rows:
            if kind == "invalid_input":
                states[f"#line{seq}"] = ("", status)
                if custom_id:
                    states[custom_id] = ("", status)
            elif custom_id:
                states[custom_id] = (job_id, status)
        return states

    def batch_jobs(self, batch_id: str, *, after_seq: int = -1, limit: int = 1000) -> list[Job]:
        """A page of the batch's jobs in input order."""
        with self.session(write=False) as s:
            query = (
                select(Job)
                .where(Job.batch_id == batch_id, Job.seq > after_seq)
                .order_by(Job.seq)
                .limit(limit)
            )
            return list(s.scalars(query))

    def retry_job(
        self, job_id: str, *, task_id: str, provider: str, model: str, chord: dict[str, Any]
    ) -> bool:
        """A failed job goes back in line (a resumed batch); its attempts stay in the ledger."""
        now = utcnow()
        with self.session() as s:
            done = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == FAILED)
                .values(
                    status=QUEUED,
                    task_id=task_id,
                    **chord,
                    provider=provider,
                    model=model,
                    queue=constants.queue_name(provider),
                    error=None,
                    error_kind=None,
                    text=None,
                    finished_at=None,
                    lease_until=None,
                    crashes=0,
                    hops=0,
                    updated_at=now,
                    published_at=now,
                )
            )
            return done.rowcount == 1

    def count_batch_callback(self, batch_id: str) -> None:
        with self.session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(callback_runs=Batch.callback_runs + 1))

    def batch_totals(self, batch_id: str) -> dict[str, Any]:
        """Counts by status, tokens, cost, wall time and the split over providers."""
        with self.session(write=False) as s:
            rows = s.execute(
                select(
                    Job.status,
                    Job.provider,
                    func.count(),
                    func.sum(Job.input_tokens),
                    func.sum(Job.output_tokens),
                    func.sum(Job.cost_usd),
                    func.min(Job.created_at),
                    func.max(Job.finished_at),
                )
                .where(Job.batch_id == batch_id)
                .group_by(Job.status, Job.provider)
            ).all()
        totals: dict[str, Any] = {
            "total": 0,
            "by_status": {},
            "providers": {},
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
        }
        first = last = None
        for status, provider, n, tin, tout, cost, created, finished in rows:
            totals["total"] += n
            totals["by_status"][status] = totals["by_status"].get(status, 0) + n
            if status == SUCCEEDED and provider:
                totals["providers"][provider] = totals["providers"].get(provider, 0) + n
            totals["input_tokens"] += tin or 0
            totals["output_tokens"] += tout or 0
            totals["cost_usd"] += cost or 0.0
            created, finished = aware(created), aware(finished)
            first = created if first is None or (created and created < first) else first
            last = finished if last is None or (finished and finished > last) else last
        totals["cost_usd"] = round(totals["cost_usd"], 8)
        totals["wall_s"] = round((last - first).total_seconds(), 3) if first and last else None
        totals["last_finished_s"] = last.timestamp() if last else None  # when its last job ended
        return totals

    def complete_batch(self, batch_id: str) -> dict[str, Any] | None:
        """Write the batch summary if every job is final and no summary exists yet; else None."""
        totals = self.batch_totals(batch_id)
        if any(totals["by_status"].get(s) for s in OPEN):
            return None
        with self.session() as s:
            done = s.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.finished_at.is_(None))
                .values(finished_at=utcnow(), summary=totals)
            )
        return totals if done.rowcount == 1 else None

    def unfinished_batch_ids(self) -> list[str]:
        """Batches with no summary yet (their jobs may all be final: the reconciler looks)."""
        with self.session(write=False) as s:
            return list(s.scalars(select(Batch.id).where(Batch.finished_at.is_(None))))
