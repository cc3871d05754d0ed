"""Provider batches in the store: jobs collected for one provider's batch API, the batch the
provider made of them (its id stored before anything is polled), and its results applied once.

States: collecting (jobs join) → submitting (one worker builds and sends it) → submitted (the
provider has it: `ref`) → applied (every job final or handed back to synchronous calls); or
refused (the provider would not take it: its jobs went back). Every step is a conditional
UPDATE, so a task delivered twice, or a poller that fetched a result file twice, acts once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, select, update

from workers.store.engine import Database, aware, utcnow
from workers.store.models import BATCHED, QUEUED, RUNNING, Attempt, Job, ProviderBatch

PB, JOBS, ATTEMPTS = ProviderBatch.__table__, Job.__table__, Attempt.__table__
IN_FLIGHT = ("collecting", "submitting", "submitted")


class ProviderBatchStore(Database):
    def hand_to_provider_batch(
        self,
        job_id: str,
        run: int,
        provider: str,
        model: str,
        *,
        max_size: int,
        input_tokens: int,
        deadline_at: datetime | None,
    ) -> tuple[str, bool] | None:
        """Move this run's job into the provider:model batch being collected (a new one when
        none has room): (its id, whether it is new). The run made no call: it leaves no attempt.
        None: the run no longer holds the job."""
        now = utcnow()
        with self.session() as s:
            conn = s.connection()
            open_one = conn.execute(
                select(PB.c.id)
                .where(
                    PB.c.provider == provider,
                    PB.c.model == model,
                    PB.c.state == "collecting",
                    PB.c.size < max_size,
                )
                .order_by(PB.c.created_at)
                .limit(1)
            ).first()
            batch_id, created = None, False
            if open_one is not None:
                values = {"size": PB.c.size + 1, "input_tokens": PB.c.input_tokens + input_tokens}
                if deadline_at is not None:
                    earlier = PB.c.deadline_at.is_(None) | (PB.c.deadline_at > deadline_at)
                    values["deadline_at"] = case((earlier, deadline_at), else_=PB.c.deadline_at)
                # still collecting once its row is ours (a submit may have taken it meanwhile)
                joined = conn.execute(
                    update(PB).where(PB.c.id == open_one.id, PB.c.state == "collecting").values(values)
                )
                batch_id = open_one.id if joined.rowcount == 1 else None
            if batch_id is None:
                batch_id, created = uuid.uuid4().hex, True
                conn.execute(
                    insert(PB).values(
                        id=batch_id,
                        provider=provider,
                        model=model,
                        state="collecting",
                        size=1,
                        input_tokens=input_tokens,
                        deadline_at=deadline_at,
                        created_at=now,
                    )
                )
            moved = conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.status == RUNNING, JOBS.c.runs == run)
                .values(
                    status=BATCHED,
                    provider_batch_id=batch_id,
                    provider=provider,
                    model=model,
                    lease_until=None,
                    updated_at=now,
                )
            )
            if moved.rowcount != 1:
                s.rollback()
                return None
        return batch_id, created

    def take_for_submit(self, batch_id: str) -> tuple[ProviderBatch, list[Job]] | None:
        """collecting → submitting, once: the batch and its jobs (None: taken already)."""
        with self.session() as s:
            taken = s.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch_id, ProviderBatch.state == "collecting")
                .values(state="submitting")
            )
            if taken.rowcount != 1:
                return None
            batch = s.get(ProviderBatch, batch_id, populate_existing=True)
            jobs = list(
                s.scalars(select(Job).where(Job.provider_batch_id == batch_id, Job.status == BATCHED))
            )
            return batch, jobs

    def provider_batch_submitted(
        self, batch_id: str, *, ref: str, key_id: str | None, expected_at: datetime, next_poll_at: datetime
    ) -> None:
        with self.session() as s:
            s.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch_id, ProviderBatch.state == "submitting")
                .values(
                    state="submitted",
                    ref=ref,
                    key_id=key_id,
                    submitted_at=utcnow(),
                    expected_at=expected_at,
                    next_poll_at=next_poll_at,
                )
            )

    def provider_batch_polled(
        self, batch_id: str, *, provider_status: str, done: int, next_poll_at: datetime | None
    ) -> None:
        with self.session() as s:
            s.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch_id, ProviderBatch.state == "submitted")
                .values(
                    provider_status=provider_status,
                    done=done,
                    polls=ProviderBatch.polls + 1,
                    next_poll_at=next_poll_at,
                )
            )

    def end_provider_batch(self, batch_id: str, *, state: str, error: str | None = None) -> bool:
        """submitting/submitted → applied | refused, once: True for the caller that ended it."""
        with self.session() as s:
            done = s.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch_id, ProviderBatch.state.in_(("submitting", "submitted")))
                .values(state=state, error=error, ended_at=utcnow(), next_poll_at=None)
            )
        return done.rowcount == 1

    def back_in_line(self, job_ids: Sequence[str], *, sync: bool = False) -> int:
        """Jobs a provider batch did not answer (expired, cancelled, refused, failed for now)
        are queued again, one hop further: their mode decides anew where they go, or `sync`."""
        if not job_ids:
            return 0
        now = utcnow()
        values: dict[str, Any] = {
            "status": QUEUED,
            "hops": Job.hops + 1,
            "updated_at": now,
            "published_at": now,
        }
        if sync:
            values["mode"] = "sync"
        with self.session() as s:
            done = s.execute(
                update(Job).where(Job.id.in_(list(job_ids)), Job.status == BATCHED).values(values)
            )
        return done.rowcount

    def split_provider_batch(self, batch_id: str, later: Sequence[str]) -> str | None:
        """Move the jobs `later` of a batch being submitted into a new batch, collecting (a
        provider's batch queue has no room for them yet). Its id, or None if none moved."""
        if not later:
            return None
        now, new_id = utcnow(), uuid.uuid4().hex
        with self.session() as s:
            old = s.get(ProviderBatch, batch_id)
            if old is None:
                return None
            moved = s.execute(
                update(Job)
                .where(Job.id.in_(list(later)), Job.provider_batch_id == batch_id, Job.status == BATCHED)
                .values(provider_batch_id=new_id, updated_at=now)
            ).rowcount
            tokens = s.scalar(
                select(func.coalesce(func.sum(Job.est_input_tokens), 0)).where(
                    Job.provider_batch_id == new_id
                )
            )
            s.add(
                ProviderBatch(
                    id=new_id,
                    provider=old.provider,
                    model=old.model,
                    state="collecting",
                    size=moved,
                    input_tokens=int(tokens or 0),
                    deadline_at=old.deadline_at,
                    created_at=now,
                )
            )
            old.size -= moved
            old.input_tokens -= int(tokens or 0)
        return new_id

    def enqueued_tokens(self, provider: str, model: str) -> int:
        """Input tokens of the provider:model batches at the provider now (its batch queue)."""
        with self.session(write=False) as s:
            total = s.scalar(
                select(func.coalesce(func.sum(ProviderBatch.input_tokens), 0)).where(
                    ProviderBatch.provider == provider,
                    ProviderBatch.model == model,
                    ProviderBatch.state == "submitted",
                )
            )
        return int(total or 0)

    def provider_batch(self, batch_id: str) -> ProviderBatch | None:
        with self.session(write=False) as s:
            return s.get(ProviderBatch, batch_id)

    def provider_batch_jobs(self, batch_id: str) -> list[Job]:
        with self.session(write=False) as s:
            return list(s.scalars(select(Job).where(Job.provider_batch_id == batch_id)))

    def provider_batches(self, states: Sequence[str] = IN_FLIGHT) -> list[ProviderBatch]:
        with self.session(write=False) as s:
            query = select(ProviderBatch).where(ProviderBatch.state.in_(list(states)))
            return list(s.scalars(query.order_by(ProviderBatch.created_at)))

    def overdue_provider_batches(
        self, *, collecting_s: float, submitting_s: float, poll_late_s: float
    ) -> list[ProviderBatch]:
        """Batches whose next step is late (its task lost with the broker, or its worker died):
        collecting for `collecting_s`, submitting for `submitting_s`, or a poll `poll_late_s` late."""
        now = utcnow()

        def older(seconds: float) -> datetime:
            return now - timedelta(seconds=seconds)

        with self.session(write=False) as s:
            query = select(ProviderBatch).where(
                ((ProviderBatch.state == "collecting") & (ProviderBatch.created_at < older(collecting_s)))
                | ((ProviderBatch.state == "submitting") & (ProviderBatch.created_at < older(submitting_s)))
                | ((ProviderBatch.state == "submitted") & (ProviderBatch.next_poll_at < older(poll_late_s)))
            )
            return list(s.scalars(query))

    def retake_for_submit(self, batch_id: str) -> bool:
        """A batch stuck in submitting (its worker died before the provider had it) is
        collected again, so the next submit task can take it."""
        with self.session() as s:
            done = s.execute(
                update(ProviderBatch)
                .where(ProviderBatch.id == batch_id, ProviderBatch.state == "submitting")
                .values(state="collecting")
            )
        return done.rowcount == 1

    def turnaround_s(self, provider: str, *, last: int = 20) -> float | None:
        """Mean time from submit to end of the provider's last `last` batches (None: none yet)."""
        with self.session(write=False) as s:
            rows = s.execute(
                select(ProviderBatch.submitted_at, ProviderBatch.ended_at)
                .where(
                    ProviderBatch.provider == provider,
                    ProviderBatch.state == "applied",
                    ProviderBatch.submitted_at.is_not(None),
                )
                .order_by(ProviderBatch.ended_at.desc())
                .limit(last)
            ).all()
        spans = [(aware(end) - aware(start)).total_seconds() for start, end in rows if start and end]
        return sum(spans) / len(spans) if spans else None

    def provider_batch_counts(self) -> dict[str, int]:
        with self.session(write=False) as s:
            rows = s.execute(select(ProviderBatch.state, func.count()).group_by(ProviderBatch.state)).all()
        return {state: n for state, n in rows}
