"""Shared by the fault tests: the ledger they report to (printed as one table at the end of
the run), an audit of the store after a run, and small helpers. Every loop here is bounded
in count and time; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from workers.store import FINAL, IN_DOUBT, SUCCEEDED, Attempt, Job, Store

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
    provider_calls: int | None = None  # calls the simulator received (an outside count) ...
    ledger_calls: int | None = None  # ... and the calls on the store's ledger of attempts,
    in_doubt: int = 0  # ... of which this many were in flight in a run that died: maybe never sent


@dataclass
class Ledger:
    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


LEDGER = Ledger()


def _show(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


@dataclass
class Tally:
    """Bad inputs fed to one surface, counted as observed. An input is a bad input when the
    surface refused it or the test knows it is wrong; it counts as rejected cleanly only when
    the refusal observed was clean (no `problems`). Valid inputs taken count as submitted.
    `check()` fails listing every input that was not handled cleanly."""

    row: Row
    failures: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, scenario: str, ledger: Ledger | None = LEDGER) -> Tally:
        """A tally reported in `ledger`'s table (None: reported nowhere, for self-checks)."""
        row = Row(scenario)
        if ledger is not None:
            ledger.add(row)
        return cls(row)

    def record(
        self,
        given: object,
        *,
        rejected: bool,
        problems: list[str] | tuple[str, ...] = (),
        bad_because: str | None = None,
    ) -> bool:
        """Count one input: whether the surface refused it, what was wrong with the way it
        refused or took it (`problems`), and why the test knows it is bad, if it does (an
        input it knows is bad and that was taken is a bad input not rejected). True when the
        input was handled cleanly."""
        if not rejected and bad_because is None:
            self.row.submitted += 1
            if problems:
                self.failures.append(f"{_show(given)}: taken, but {'; '.join(problems)}")
            return not problems
        self.row.bad_inputs += 1
        if rejected and not problems:
            self.row.rejected_cleanly += 1
            return True
        why = list(problems) if rejected else [f"taken although {bad_because}", *problems]
        self.failures.append(f"{_show(given)}: {'; '.join(why)}")
        return False

    def summary(self) -> str:
        r = self.row
        return (
            f"{r.scenario}: tried={r.bad_inputs} rejected_cleanly={r.rejected_cleanly} accepted={r.submitted}"
        )

    def check(self, limit: int = 25) -> None:
        if not self.failures:
            return
        lines = [f"{self.summary()}; {len(self.failures)} input(s) not handled cleanly:"]
        lines += [f"  - {f}" for f in self.failures[:limit]]
        if len(self.failures) > limit:
            lines.append(f"  … and {len(self.failures) - limit} more")
        raise AssertionError("\n".join(lines))


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
    """Poll `condition` until it holds (True) or `timeout_s` has passed (False, after one last
    look). Bounded in time and in count: at most timeout_s / every_s + 1 looks."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / every_s) + 1):
        if time.monotonic() >= deadline:
            break
        if condition():
            return True
        time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))  # the poll interval
    return condition()


def wait_for(
    condition: Callable[[], object],
    timeout_s: float,
    what: str,
    every_s: float = 0.2,
    retry_on: tuple[type[BaseException], ...] = (),
) -> None:
    """Wait until `condition` holds, or fail saying `what` did not happen within `timeout_s`.
    Exceptions of the `retry_on` types count as "not yet" (a service still coming back)."""
    last: list[BaseException] = []

    def check() -> bool:
        try:
            return bool(condition())
        except retry_on as exc:
            last[:] = [exc]
            return False

    started = time.monotonic()
    if not wait_until(check, timeout_s, every_s):
        why = f" (last: {type(last[0]).__name__}: {last[0]})" if last else ""
        raise AssertionError(
            f"waited {time.monotonic() - started:.1f}s (limit {timeout_s:g}s) for {what}; it did not happen{why}"
        )


def all_final(store: Store, job_ids: list[str]) -> Callable[[], bool]:
    def check() -> bool:
        with store.session(write=False) as s:
            open_jobs = s.scalar(select(func.count()).where(Job.id.in_(job_ids), Job.status.not_in(FINAL)))
        return open_jobs == 0

    return check


def ledger_calls(store: Store, job_ids: list[str]) -> tuple[int, int]:
    """Attempts that made (or may have made) a provider call, and how many of those are in doubt."""
    with store.session(write=False) as s:
        calls, in_doubt = s.execute(
            select(func.count(), func.count().filter(Attempt.outcome == IN_DOUBT)).where(
                Attempt.job_id.in_(job_ids), Attempt.called.is_(True)
            )
        ).one()
    return calls, in_doubt


def provider_calls(stats: dict[str, dict[str, int]]) -> int:
    """Every request the simulator received, over every provider."""
    return sum(counter.get("requests", 0) for counter in stats.values())
