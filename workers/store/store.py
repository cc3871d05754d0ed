"""The store: the source of truth for every job, attempt, token and dollar.

SQLite by default, PostgreSQL by URL. Every write that a redelivered task could repeat is
conditional: a job is claimed by one worker at a time (a lease), a result is written once
(only while the job is open), and an attempt is keyed by (job id, attempt number).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, case, create_engine, delete, event, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from workers import constants
from workers.errors import ServiceUnavailable
from workers.store.models import (
    FAILED,
    FINAL,
    OPEN,
    PARKED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Attempt,
    Base,
    Batch,
    Job,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; everything stored is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


@dataclass(frozen=True)
class AttemptRecord:
    provider: str
    model: str
    outcome: str
    started_at: datetime
    task_type: str = ""
    tier: str = ""
    key_id: str | None = None
    called: bool = True
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float | None = None
    moved_to: str | None = None


@dataclass(frozen=True)
class Claim:
    """What `Store.claim` found: ``run`` (yours now), ``final``, ``busy`` (another worker has
    it), ``poison`` (failed just now: its workers kept dying) or ``missing``."""

    state: str
    job: Job | None = None
    busy_for_s: float = 0.0


JOBS, ATTEMPTS = Job.__table__, Attempt.__table__
#: What `Store.finish` writes; a column not given is cleared to its default here.
RESULT_COLUMNS = (
    "status",
    "provider",
    "model",
    "key_id",
    "text",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "error",
    "error_kind",
    "cached",
)
RESULT_DEFAULTS = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "cached": False}
ATTEMPT_COLUMNS = tuple(c.name for c in ATTEMPTS.columns if c.name != "id")

# The hot path's statements, built once (Core, bound parameters): a worker runs them per job.
_CLAIM = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("b_id"),
        JOBS.c.status.in_((QUEUED, PARKED))
        | (
            (JOBS.c.status == RUNNING)
            & (JOBS.c.lease_until.is_(None) | (JOBS.c.lease_until < bindparam("b_now")))
        ),
    )
    .values(
        crashes=JOBS.c.crashes + case((JOBS.c.status == RUNNING, 1), else_=0),
        status=RUNNING,
        runs=JOBS.c.runs + 1,
        lease_until=bindparam("b_lease"),
        started_at=func.coalesce(JOBS.c.started_at, bindparam("b_now")),
        updated_at=bindparam("b_now"),
    )
)
_FINISH = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"), JOBS.c.status.in_(OPEN))
    .values(
        {
            **{c: bindparam(f"b_{c}") for c in RESULT_COLUMNS},
            "calls": JOBS.c.calls + bindparam("b_calls"),
            "updated_at": bindparam("b_now"),
            "finished_at": bindparam("b_now"),
            "lease_until": None,
        }
    )
)
_REQUEUE = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"), JOBS.c.status == RUNNING)
    .values(
        status=bindparam("b_status"),
        provider=bindparam("b_provider"),
        model=bindparam("b_model"),
        queue=bindparam("b_queue"),
        hops=JOBS.c.hops + bindparam("b_hops"),
        calls=JOBS.c.calls + bindparam("b_calls"),
        lease_until=None,
        updated_at=bindparam("b_now"),
        published_at=bindparam("b_now"),
    )
)


def _attempt_params(job_id: str, number: int, attempt: AttemptRecord, now: datetime) -> dict[str, Any]:
    values = {"job_id": job_id, "number": number, "finished_at": now, **attempt.__dict__}
    return {f"b_{c}": values[c] for c in ATTEMPT_COLUMNS}


class Store:
    def __init__(self, url: str | None = None, *, schema: str | None = None) -> None:
        self.url = url or os.environ.get("SPILLWAY_DATABASE_URL") or constants.DEFAULT_DATABASE_URL
        schema = schema or os.environ.get("SPILLWAY_DATABASE_SCHEMA") or None
        self.engine = _engine(self.url, schema)
        # SQLite has one writer at a time and its busy handler backs off in coarse sleeps (up to
        # 100 ms): under many threads, queueing on a lock here is an order of magnitude faster.
        self._write_lock = threading.Lock() if self.url.startswith("sqlite") else contextlib.nullcontext()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        self._insert_attempt = (
            insert(ATTEMPTS)
            .values({c: bindparam(f"b_{c}") for c in ATTEMPT_COLUMNS})
            .on_conflict_do_nothing(index_elements=["job_id", "number"])
        )
        try:
            if schema:
                with self.engine.begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise ServiceUnavailable(
                f"the store at {_safe_url(self.url)} is unreachable: {exc.orig}"
            ) from exc

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        if not write:
            with self._sessions.begin() as session:
                yield session
            return
        with self._write_lock, self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs -------------------------------------------------------------------------------

    def add_jobs(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert new jobs (status queued) in one transaction."""
        now = utcnow()
        groups: dict[frozenset[str], list[dict[str, Any]]] = {}
        for row in rows:  # one executemany per shape of row (bad batch lines carry other columns)
            full = {"status": QUEUED, "created_at": now, "updated_at": now, **row}
            groups.setdefault(frozenset(full), []).append(full)
        with self.session() as s:
            for group in groups.values():
                s.execute(JOBS.insert(), group)

    def job(self, job_id: str) -> Job | None:
        with self.session(write=False) as s:
            return s.get(Job, job_id)

    def jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        with self.session(write=False) as s:
            found = s.scalars(select(Job).where(Job.id.in_(list(job_ids))))
            return {j.id: j for j in found}

    def by_idempotency_key(self, key: str) -> Job | None:
        with self.session(write=False) as s:
            return s.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def delete_jobs(self, job_ids: Sequence[str]) -> None:
        with self.session() as s:
            s.execute(delete(Job).where(Job.id.in_(list(job_ids))))

    def claim(self, job_id: str, *, lease_s: float, max_crashes: int) -> Claim:
        """Take the job for one run. A job whose lease ran out was held by a worker that died.

        One conditional UPDATE decides, so two deliveries of one job never both run it.
        """
        now = utcnow()
        params = {"b_id": job_id, "b_now": now, "b_lease": now + timedelta(seconds=lease_s)}
        with self.session() as s:
            taken = s.connection().execute(_CLAIM, params).rowcount
            job = s.get(Job, job_id, populate_existing=True)
            if job is None:
                return Claim("missing")
            if not taken:
                if job.status in FINAL:
                    return Claim("final", job)
                lease = aware(job.lease_until) or now
                return Claim("busy", job, max(0.0, (lease - now).total_seconds()))
            if job.crashes >= max_crashes:
                job.status, job.error_kind, job.finished_at = FAILED, "poison", now
                job.error = (
                    f"the worker running this job died {job.crashes} times; "
                    "it is failed so it cannot take more workers down"
                )
                job.lease_until = None
                return Claim("poison", job)
            return Claim("run", job)

    def finish(self, job_id: str, run: int, attempt: AttemptRecord | None, **result: Any) -> bool:
        """Record the last attempt and the job's final state, once. False: it was final already.

        `result` names columns of `RESULT_COLUMNS`; the others are cleared."""
        unknown = set(result) - set(RESULT_COLUMNS)
        if unknown:
            raise TypeError(f"finish() got columns it does not write: {sorted(unknown)}")
        now = utcnow()
        params = {f"b_{c}": result.get(c, RESULT_DEFAULTS.get(c)) for c in RESULT_COLUMNS}
        params.update(b_id=job_id, b_now=now, b_calls=int(attempt is not None and attempt.called))
        with self.session() as s:
            conn = s.connection()
            if attempt is not None:
                conn.execute(self._insert_attempt, _attempt_params(job_id, run, attempt, now))
            return conn.execute(_FINISH, params).rowcount == 1

    def requeue(
        self,
        job_id: str,
        run: int,
        attempt: AttemptRecord | None,
        *,
        provider: str,
        model: str,
        parked: bool = False,
        hop: bool = True,
    ) -> bool:
        """Put a running job back in line (for another provider, or later); record the attempt."""
        now = utcnow()
        params = {
            "b_id": job_id,
            "b_now": now,
            "b_status": PARKED if parked else QUEUED,
            "b_provider": provider,
            "b_model": model,
            "b_queue": constants.queue_name(provider),
            "b_hops": int(hop),
            "b_calls": int(attempt is not None and attempt.called),
        }
        with self.session() as s:
            conn = s.connection()
            if attempt is not None:
                conn.execute(self._insert_attempt, _attempt_params(job_id, run, attempt, now))
            return conn.execute(_REQUEUE, params).rowcount == 1

    def attempts(self, job_id: str) -> list[Attempt]:
        with self.session(write=False) as s:
            return list(s.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))

    def open_jobs(self, *, idle_for_s: float, batch_id: str | None = None, limit: int = 10_000) -> list[Job]:
        """Queued, running or parked jobs nothing has touched for `idle_for_s` (the reconciler's)."""
        before = utcnow() - timedelta(seconds=idle_for_s)
        query = select(Job).where(Job.status.in_(OPEN), Job.updated_at < before)
        if batch_id is not None:
            query = query.where(Job.batch_id == batch_id)
        with self.session(write=False) as s:
            return list(s.scalars(query.limit(limit)))

    def count_by_status(self, batch_id: str | None = None) -> dict[str, int]:
        with self.session(write=False) as s:
            query = select(Job.status, func.count()).group_by(Job.status)
            if batch_id is not None:
                query = query.where(Job.batch_id == batch_id)
            return dict(s.execute(query).all())

    # -- batches ----------------------------------------------------------------------------

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


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split(":", 1)[0] + "://…"


def _engine(url: str, schema: str | None) -> Engine:
    # A worker runs up to a few hundred threads: never make them queue for a connection.
    options: dict[str, Any] = {"pool_size": 32, "max_overflow": 256}
    if schema:
        options["execution_options"] = {"schema_translate_map": {None: schema}}
    if url.startswith("sqlite"):
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, **options)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **options)  # a restarted server is noticed
