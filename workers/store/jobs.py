"""The job hot path: store jobs, claim one for a run, write its result once, put it back in line.

Every write that a redelivered task could repeat is conditional: a job is claimed by one worker
at a time (a lease), a result is written once (only while the job is open), and an attempt is
keyed by (job id, attempt number). The statements a worker runs per job are built once.
"""

from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    Update,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from workers import constants
from workers.errors import SpillwayError
from workers.store.engine import Database, aware, utcnow
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
    Attempt,
    Job,
)

#: Why a call is on the ledger in doubt.
DIED_IN_CALL = "its worker died during the call: charged at the estimate"


class DuplicateJob(SpillwayError):
    """`Store.add_jobs` broke a unique key: that idempotency key (or id, or batch custom_id) is taken."""


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
    provider_batch_id: str | None = None
    saved_usd: float = 0.0


@dataclass(frozen=True)
class Claim:
    """What `Store.claim` found: ``run`` (yours now), ``final``, ``busy`` (another worker has
    it), ``batched`` (a provider batch has it), ``poison`` (failed just now: its workers kept
    dying) or ``missing``."""

    state: str
    job: Job | None = None
    busy_for_s: float = 0.0


@dataclass(frozen=True)
class FirstRun:
    """A job stored already claimed for its first run by the process that stores it
    (`add_jobs(running=)`): its lease."""

    lease_s: float


JOBS, ATTEMPTS = Job.__table__, Attempt.__table__
#: A job as stored, read like `claim`'s row (every column, by name).
_JobRow = namedtuple("_JobRow", [c.name for c in JOBS.columns])  # type: ignore[misc]
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
#: A new job's row as `_INSERT_JOB` takes it: every column, at its default unless given. (The
#: driver fills no defaults: a column's must be a constant.)
_JOB_DEFAULTS: dict[str, Any] = {c.name: None if c.default is None else c.default.arg for c in JOBS.columns}
if any(c.default is not None and not c.default.is_scalar for c in JOBS.columns):
    raise TypeError("a job column's default is not a constant: add_jobs cannot fill it")
#: Every column bound, so one statement (compiled once) inserts any row.
_INSERT_JOB = JOBS.insert().values({c.name: bindparam(f"j_{c.name}") for c in JOBS.columns})


def _status_in(*statuses: str) -> ColumnElement[bool]:
    """The job's status is one of these constants, written into the SQL: a bound IN list is
    expanded again on every execution (a tenth of a hot-path statement's CPU)."""
    return JOBS.c.status.in_([literal_column(f"'{status}'") for status in statuses])


# The hot path's statements, built once (Core, bound parameters): a worker runs them per job.
_CLAIM = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("b_id"),
        _status_in(QUEUED, PARKED)
        | (_status_in(RUNNING) & (JOBS.c.lease_until.is_(None) | (JOBS.c.lease_until < bindparam("b_now")))),
    )
    .values(
        crashes=JOBS.c.crashes + case((_status_in(RUNNING), 1), else_=0),
        status=literal_column(f"'{RUNNING}'"),
        runs=JOBS.c.runs + 1,
        lease_until=bindparam("b_lease"),
        started_at=func.coalesce(JOBS.c.started_at, bindparam("b_now")),
        updated_at=bindparam("b_now"),
    )
    .returning(*JOBS.c)
)
#: A job's first run (queued or parked, never run): no crash to count, no call in doubt.
_CLAIM_FIRST = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"), _status_in(QUEUED, PARKED), JOBS.c.runs == 0)
    .values(
        status=literal_column(f"'{RUNNING}'"),
        runs=1,
        lease_until=bindparam("b_lease"),
        started_at=func.coalesce(JOBS.c.started_at, bindparam("b_now")),
        updated_at=bindparam("b_now"),
    )
    .returning(*JOBS.c)
)
_FINISH = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"), _status_in(*OPEN))
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
    .where(JOBS.c.id == bindparam("b_id"), _status_in(RUNNING))
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


#: What `as_finished` copies from the claimed job besides the result: who and what it is.
IDENTITY_COLUMNS = ("id", "task_type", "tier", "tenant", "batch_id", "custom_id", "created_at")


def as_finished(job: Any, attempt: AttemptRecord | None, **result: Any) -> Job:
    """`job` as claimed, with what `JobStore.finish(…, attempt, **result)` writes over it: the
    final job without reading it back, for an answer in this process (a detached object with
    its identity and its result; other columns are left unset, which is cheaper to build)."""
    now = utcnow()
    return Job(
        **{c: getattr(job, c) for c in IDENTITY_COLUMNS},
        **{c: result.get(c, RESULT_DEFAULTS.get(c)) for c in RESULT_COLUMNS},
        calls=(job.calls or 0) + int(attempt is not None and attempt.called),
        updated_at=now,
        finished_at=now,
    )


def _attempt_insert(dialect: Any, bind: str) -> Insert:
    """Record a run's attempt (binds `<bind><column>`), once: never over an entry the run
    has already (a run taken over as dead is on the ledger in doubt; its late outcome is not
    charged again)."""
    statement = dialect.insert(ATTEMPTS).values({c: bindparam(f"{bind}{c}") for c in ATTEMPT_COLUMNS})
    return statement.on_conflict_do_nothing(index_elements=["job_id", "number"])


@functools.cache
def _with_record(main: Update) -> Update:
    """PostgreSQL: `main` (finish, requeue) with the run's attempt (binds `a_<column>`) as a
    data-modifying WITH."""
    return main.add_cte(_attempt_insert(postgresql, "a_").cte("recorded"))


def _unpriced(job: Any) -> AttemptRecord:
    """A call of `job`'s on its provider and model, at its input estimate and max_tokens."""
    max_tokens = (job.request or {}).get("max_tokens") or 0
    return AttemptRecord(
        provider=job.provider or "",
        model=job.model or "",
        outcome=IN_DOUBT,
        started_at=utcnow(),
        task_type=job.task_type,
        tier=job.tier,
        input_tokens=job.est_input_tokens or 0,
        output_tokens=int(max_tokens),
    )


def _attempt_params(
    job_id: str, number: int, attempt: AttemptRecord, now: datetime, bind: str = "b_"
) -> dict[str, Any]:
    values = {"job_id": job_id, "number": number, "finished_at": now, **attempt.__dict__}
    return {f"{bind}{c}": values[c] for c in ATTEMPT_COLUMNS}


class JobStore(Database):
    """Jobs and their attempts, one at a time: what workers, the producer and the reconciler use."""

    def add_jobs(
        self, rows: Sequence[dict[str, Any]], *, running: Mapping[str, FirstRun] | None = None
    ) -> dict[str, Any]:
        """Insert new jobs (status queued) in one transaction; `DuplicateJob` if a key is taken.

        `running`: jobs (by id) the caller runs at once, stored claimed for their first run —
        status and lease as `claim` would leave them, without its round trip. Returns those
        jobs as `claim` reads them."""
        if not rows:
            return {}
        now = utcnow()
        new = {**_JOB_DEFAULTS, "status": QUEUED, "created_at": now, "updated_at": now}
        full = [{**new, **row} for row in rows]
        for number, row in enumerate(full, 1):
            if len(row) != len(_JOB_DEFAULTS):
                unknown = ", ".join(sorted(set(row) - set(_JOB_DEFAULTS)))
                raise ValueError(f"job row {number} has columns the store does not know: {unknown}")
        running = running or {}
        claimed = {}
        for row in full:
            first = running.get(row["id"])
            if first is not None:
                lease = now + timedelta(seconds=first.lease_s)
                row.update(status=RUNNING, runs=1, lease_until=lease, started_at=now)
                claimed[row["id"]] = _JobRow(**row)
        try:
            # The driver, not Core: one statement (autocommit on PostgreSQL) for the usual
            # single job, one transaction for many.
            with self.statements(together=len(full) > 1) as execute:
                execute(_INSERT_JOB, [{f"j_{k}": v for k, v in row.items()} for row in full])
        except IntegrityError as exc:
            if _is_duplicate(exc):
                raise DuplicateJob(f"a job with the same unique key exists: {exc.orig}") from exc
            raise
        return claimed

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

    def claim(
        self,
        job_id: str,
        *,
        lease_s: float,
        max_crashes: int,
        estimate: Callable[[Job], AttemptRecord] | None = None,
    ) -> Claim:
        """Take the job for one run. A job whose lease ran out was held by a worker that died.

        One conditional UPDATE decides, so two deliveries of one job never both run it. A run
        ends by writing its attempt together with the job's next state (`finish`, `requeue`),
        so a job still running is the ledger's mark of a call that may be in flight: a claim
        that takes over a run whose worker died puts that run's call on the ledger in doubt,
        charged as `estimate(job)` gives it (the call at its estimate; without one, on the
        job's provider and model at its input estimate and max_tokens, unpriced).
        """
        now = utcnow()
        params = {"b_id": job_id, "b_now": now, "b_lease": now + timedelta(seconds=lease_s)}
        # The hot path — a job's first run — is one statement whose row reads like a Job, with
        # no ORM session and nothing else to write (autocommit on PostgreSQL).
        with self.statements() as execute:
            row: Any = execute(_CLAIM_FIRST, params).fetchone()
        if row is not None:
            return Claim("run", row)
        return self._claim_again(job_id, params, max_crashes, estimate)

    def _claim_again(
        self,
        job_id: str,
        params: dict[str, Any],
        max_crashes: int,
        estimate: Callable[[Job], AttemptRecord] | None,
    ) -> Claim:
        """Every claim but a first run's — or why there is none — in one ORM transaction: a run
        after a wait or a move, one after a dead worker's (counted as a crash, its call in
        doubt), a job failed as poison, or one that is final, batched, busy or gone."""
        now = params["b_now"]
        with self.session() as s:
            conn = s.connection()
            # the run this claim may take over: still running means its worker died in it
            before = conn.execute(
                select(JOBS.c.status, JOBS.c.updated_at).where(JOBS.c.id == job_id).with_for_update()
            ).first()
            job: Any = conn.execute(_CLAIM, params).first()
            taken = job is not None
            job = s.get(Job, job_id, populate_existing=True)
            if before is None or job is None:
                return Claim("missing")
            if taken and job.runs > 1:
                dead = None
                if before.status == RUNNING:
                    dead = replace(
                        (estimate or _unpriced)(job),
                        outcome=IN_DOUBT,
                        error=DIED_IN_CALL,
                        started_at=aware(before.updated_at),
                    )
                job.calls += self._in_doubt(conn, job_id, job.runs, dead, now)
            if not taken:
                if job.status in FINAL:
                    return Claim("final", job)
                if job.status == BATCHED:
                    return Claim("batched", job)
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

    def _write(
        self,
        main: Update,
        params: dict[str, Any],
        job_id: str,
        run: int,
        attempt: AttemptRecord | None,
        now: datetime,
    ) -> int:
        """`main` on the job's row and the run's attempt (a run that made no call has none) at
        once: the rows `main` changed. On SQLite two statements in one transaction; on
        PostgreSQL one, the attempt a data-modifying WITH of the update, that commits by
        itself: one round trip where a transaction of two takes four."""
        with self.statements() as execute:
            if attempt is None:
                return execute(main, params).rowcount
            if self.single_statements:
                values = _attempt_params(job_id, run, attempt, now, "a_")
                return execute(_with_record(main), {**params, **values}).rowcount
            execute(self._insert_attempt, _attempt_params(job_id, run, attempt, now))
            return execute(main, params).rowcount

    def _in_doubt(self, conn: Any, job_id: str, run: int, dead: AttemptRecord | None, now: datetime) -> int:
        """Calls earlier runs of the job may have made and never recorded (their worker died):
        `dead`, the entry of the run `run` took over while it was running, and the STARTED
        entries that stores written before this version kept for such runs. The calls put
        on the ledger in doubt."""
        done = conn.execute(
            update(ATTEMPTS)
            .where(ATTEMPTS.c.job_id == job_id, ATTEMPTS.c.outcome == STARTED, ATTEMPTS.c.number < run)
            .values(outcome=IN_DOUBT, error=DIED_IN_CALL)
        ).rowcount
        if dead is not None:  # not over an entry that run has already (recorded, or one above)
            entry = self._insert_attempt.returning(ATTEMPTS.c.id)  # (an insert's rowcount is -1)
            done += len(conn.execute(entry, _attempt_params(job_id, run - 1, dead, now)).all())
        return done

    def finish(self, job_id: str, run: int, attempt: AttemptRecord | None, **result: Any) -> bool:
        """Record the last attempt and the job's final state, once. False: it was final already.

        `result` names columns of `RESULT_COLUMNS`; the others are cleared."""
        unknown = set(result) - set(RESULT_COLUMNS)
        if unknown:
            raise TypeError(f"finish() got columns it does not write: {sorted(unknown)}")
        now = utcnow()
        params = {f"b_{c}": result.get(c, RESULT_DEFAULTS.get(c)) for c in RESULT_COLUMNS}
        params.update(b_id=job_id, b_now=now, b_calls=int(attempt is not None and attempt.called))
        return self._write(_FINISH, params, job_id, run, attempt, now) == 1

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
        return self._write(_REQUEUE, params, job_id, run, attempt, now) == 1

    def attempts(self, job_id: str) -> list[Attempt]:
        with self.session(write=False) as s:
            return list(s.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))

    def open_jobs(self, *, idle_for_s: float, batch_id: str | None = None, limit: int = 10_000) -> list[Job]:
        """Queued, running or parked jobs nothing has touched for `idle_for_s` (the reconciler's;
        a job in a provider batch holds no broker message: its poller answers for it)."""
        before = utcnow() - timedelta(seconds=idle_for_s)
        query = select(Job).where(Job.status.in_(OPEN), Job.status != BATCHED, Job.updated_at < before)
        if batch_id is not None:
            query = query.where(Job.batch_id == batch_id)
        with self.session(write=False) as s:
            return list(s.scalars(query.limit(limit)))

    def take_for_republish(self, job: Job) -> bool:
        """Claim the republish of a lost job: only if nobody touched it since `job` was read.
        A running one stays running, its lease ended: its run's worker died, and the claim of
        the new delivery counts that (a crash, its call in doubt)."""
        now = utcnow()
        with self.session() as s:
            done = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.status.in_(OPEN), Job.updated_at == job.updated_at)
                .values(
                    status=case((Job.status == RUNNING, RUNNING), else_=QUEUED),
                    lease_until=None,
                    updated_at=now,
                    published_at=now,
                )
            )
        return done.rowcount == 1

    def end_leases(self, task_ids: Sequence[str], *, untouched_for_s: float) -> int:
        """Let go of the leases of running jobs whose worker is gone, so the next delivery
        claims them at once (counted as a crash). Only runs claimed `untouched_for_s` ago or
        earlier: a run a live worker claimed since its last beat keeps its lease."""
        before = utcnow() - timedelta(seconds=untouched_for_s)
        with self.session() as s:
            done = s.execute(
                update(Job)
                .where(
                    Job.status == RUNNING,
                    Job.updated_at < before,
                    func.coalesce(Job.task_id, Job.id).in_(list(task_ids)),
                )
                .values(lease_until=None)
                .execution_options(synchronize_session=False)
            )
        return done.rowcount

    @cached_property
    def _insert_attempt(self) -> Insert:
        """`_attempt_insert` in this store's dialect, built once."""
        return _attempt_insert(postgresql if self.engine.dialect.name == "postgresql" else sqlite, "b_")


def _is_duplicate(exc: IntegrityError) -> bool:
    """A unique (or primary) key was broken, not another constraint."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)  # PostgreSQL
    if code is not None:
        return code == "23505"
    name = getattr(exc.orig, "sqlite_errorname", "")  # SQLite
    return name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")
