"""Shared by the fault tests: the ledger they report to (printed as one table at the end of
the run), an audit of the store after a run, and small helpers. Every loop here is bounded
in count and time; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from workers.store import FINAL, SUCCEEDED, Attempt, Job, Store

FULL = os.environ.get("SPILLWAY_FAULTS", "").lower() == "full"


@dataclass
class Row:
    scenario: str
    faults: int = 0
    submitted: int = 0
    lost: int = 0
    charged_twice: int = 0
    bad_inputs: int = 0
    rejected_cleanly: int = 0


@dataclass
class Ledger:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


LEDGER = Ledger()


def size(quick: int, full: int) -> int:
    return full if FULL else quick


@dataclass(frozen=True)
class Audit:
    jobs: int
    final: int
    lost: int  # not final, or missing
    charged_twice: int  # more than one succeeded call recorded for one job
    ledger_mismatch: int  # a succeeded job whose tokens differ from its succeeded attempt's


def audit(store: Store, job_ids: list[str]) -> Audit:
    with store.session(write=False) as s:
        jobs = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(job_ids)))}
        doubles = dict(
            s.execute(
                select(Attempt.job_id, func.count())
                .where(Attempt.job_id.in_(job_ids), Attempt.outcome == SUCCEEDED)
                .group_by(Attempt.job_id)
            ).all()
        )
        succeeded_attempts = {
            a.job_id: a
            for a in s.scalars(
                select(Attempt).where(Attempt.job_id.in_(job_ids), Attempt.outcome == SUCCEEDED)
            )
        }
    final = sum(1 for j in jobs.values() if j.status in FINAL)
    mismatch = sum(
        1
        for j in jobs.values()
        if j.status == SUCCEEDED
        and not j.cached
        and (
            j.id not in succeeded_attempts
            or succeeded_attempts[j.id].output_tokens != j.output_tokens
            or abs(succeeded_attempts[j.id].cost_usd - j.cost_usd) > 1e-12
        )
    )
    return Audit(
        len(job_ids), final, len(job_ids) - final, sum(1 for n in doubles.values() if n > 1), mismatch
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


def all_final(store: Store, job_ids: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        with store.session(write=False) as s:
            open_jobs = s.scalar(select(func.count()).where(Job.id.in_(job_ids), Job.status.not_in(FINAL)))
        return open_jobs == 0

    return check
