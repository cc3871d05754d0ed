"""The router: which provider:model a job goes to, now — and where it goes next.

It takes the route's chain for a task type and tier, drops candidates without a usable
key, asks the limiter how long each remaining one would make the job wait — its free
budget minus the work already queued for it, over its refill rate — and lets the route's
strategy choose. Placement counts the job as queued for the chosen provider, so the next
placement sees it: a large batch spreads over providers in proportion to their capacity.

`next_hop` decides, without Redis or the store, where a job that cannot run here goes:
another candidate with room, a countdown, a parking spot until a quota is back, or nowhere.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from workers import constants
from workers.config import Candidate, Chain, Settings
from workers.errors import (
    AuthError,
    FinalError,
    NoRouteError,
    Overloaded,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    RetryableError,
)
from workers.keys import KeyRing
from workers.limiter import Costs, Kind, Limiter, Scope, Snapshot, Wait
from workers.strategies import STRATEGIES, Option


@dataclass(frozen=True)
class Placement:
    candidate: Candidate
    wait: Wait
    options: tuple[Option, ...]


def expected_wait(snap: Snapshot, costs: Costs, share: float, extra: Costs | None = None) -> Option:
    """How long until this candidate could start one more job, counting the work queued for it.

    Capacity is summed over the accounts usable now (not disabled, blocked or cooling down);
    if none is, the wait starts when the first one comes back.
    """
    now = snap.now_ms
    unit_cost = costs.as_dict()
    accounts = [a for a in snap.accounts if not a.disabled]
    if not accounts:
        return Option(
            snap.candidate, Wait.never("every key is disabled" if snap.accounts else "no usable key")
        )
    back_at = [a.usable_from_ms(now) for a in accounts]
    ready = [a for a, t in zip(accounts, back_at, strict=True) if t <= now]
    base_ms, why = 0.0, ""
    if not ready:
        base_ms = min(back_at) - now
        why = accounts[back_at.index(min(back_at))].blocked_why or "circuit open"
        ready = accounts
    pending = _pending_by_scope(snap, extra)
    # input counted as the accounts have learned to (a tokenizer unlike the 4-chars estimate)
    ratio = max(a.input_ratio for a in ready)
    unit_cost = {
        **unit_cost,
        "input": costs.input * ratio,
        "tokens": costs.tokens + costs.input * (ratio - 1),
    }
    worst_ms, slack_ms = 0.0, math.inf
    for j, spec in enumerate(snap.buckets):
        states = [a.buckets[j] for a in ready]
        cost = unit_cost[spec.unit]
        if cost > max(s.cap for s in states) * share:
            return Option(
                snap.candidate, Wait.never(f"one job needs {cost:g} of {spec.field}; the limit is lower")
            )
        free = sum(s.avail - (1 - share) * s.cap for s in states)
        need = pending[spec.scope].get(spec.unit, 0.0) + cost - free
        # A rolling bucket refills at cap/period; a daily window cannot take it before the reset.
        if spec.kind == Kind.ROLLING:
            wait_ms = need * spec.period_ms / sum(s.cap for s in states)  # < 0: refill in hand
            slack_ms = min(slack_ms, -wait_ms)
        else:
            wait_ms = snap.next_reset_ms - now
        if need > 0 and wait_ms > worst_ms:
            worst_ms, why = wait_ms, why or f"{spec.field} busy"
    # Room left, in seconds of refill: a bucket that stays full wastes what it refills.
    slack_s = slack_ms / 1000 if base_ms == worst_ms == 0 and math.isfinite(slack_ms) else 0.0
    return Option(snap.candidate, Wait((base_ms + worst_ms) / 1000, why), slack_s)


def _pending_by_scope(snap: Snapshot, extra: Costs | None) -> dict[Scope, dict[str, float]]:
    """Queued work per unit: a model's buckets see its own queue, the account's every model's."""
    model: dict[str, float] = {}
    account: dict[str, float] = {}
    for name, amount in snap.pending.items():
        queued_for, _, unit = name.rpartition("|")
        account[unit] = account.get(unit, 0.0) + amount
        if queued_for == snap.candidate.model:
            model[unit] = model.get(unit, 0.0) + amount
    for unit, amount in extra.as_dict().items() if extra else ():
        account[unit] = account.get(unit, 0.0) + amount
        model[unit] = model.get(unit, 0.0) + amount
    return {Scope.ACCOUNT: account, Scope.MODEL: model}


def choose(options: Sequence[Option], strategy: str, turn: int, preferred: str | None = None) -> Option:
    """The option the strategy picks (a `preferred` provider with room first)."""
    if preferred:
        mine = [o for o in options if o.candidate.provider == preferred]
        if mine and mine[0].has_room:
            return mine[0]
    return STRATEGIES[strategy](options, turn)


# -- where a job goes next ----------------------------------------------------------------------


@dataclass(frozen=True)
class NoRoom:
    """Why the job is moving: its candidate has no room soon. `wait` is the limiter's answer
    (or `Wait.never` when the candidate is not usable in this process)."""

    wait: Wait


@dataclass(frozen=True)
class AfterError:
    """Why the job is moving: the provider call failed with `error`."""

    error: ProviderError

    def ends_the_job(self, hop: int, max_hops: int) -> Fail | None:
        """A final error (other than a billing block or a rejected key: another account or
        provider may do) or the last hop ends the job wherever the others stand."""
        exc = self.error
        if isinstance(exc, FinalError) and not isinstance(exc, QuotaExhausted | AuthError):
            return Fail(str(exc), exc.kind)
        if hop + 1 >= max_hops:
            return Fail(f"gave up after {hop + 1} attempts; last: {exc}", exc.kind)
        return None

    def backoff_s(self, hop: int) -> float:
        """How long a retryable error (not a 429: its block already says when) waits at least."""
        exc = self.error
        if not isinstance(exc, RetryableError) or isinstance(exc, RateLimited):
            return 0.0
        return min(0.5 * 2**hop, 30.0) if isinstance(exc, Overloaded) else min(2**hop, 30.0)


Reason = NoRoom | AfterError


@dataclass(frozen=True)
class JobFacts:
    """What the decision needs to know about the job and the settings."""

    strategy: str  # the route's strategy, among candidates with room
    hop: int  # hops so far
    max_hops: int
    max_countdown_s: float  # longer waits park the job
    deadline_s: float | None = None  # epoch seconds


@dataclass(frozen=True)
class Move:
    """Publish the job to `target` after `countdown_s`. `rerouted`: record a "rerouted" attempt
    (no call made) with this as its error."""

    target: Candidate
    countdown_s: float
    hop_increment: int
    rerouted: str | None = None


@dataclass(frozen=True)
class Park:
    """Keep the job in Redis until `until_s` (epoch seconds), then publish it to `target`."""

    target: Candidate
    until_s: float
    hop_increment: int


@dataclass(frozen=True)
class Fail:
    """Nowhere to go: the job fails with `reason` and `kind`."""

    reason: str
    kind: str


Hop = Move | Park | Fail


def next_hop(
    here: Candidate,
    options: Sequence[Option],
    job: JobFacts,
    reason: Reason,
    *,
    clock: Callable[[], float],
    turns: Iterator[int],
) -> Hop:
    """Where a job that cannot run on `here` now goes. Pure: no Redis, no store.

    `options`: the route's usable candidates with their expected waits (after `NoRoom`, `here`
    may be left out: the limiter's answer stands for it). `clock()`, epoch seconds, is read only
    to park; a turn is drawn from `turns` only when the strategy picks among candidates with room.

    After no room here: another candidate with room now (the strategy picks; a "rerouted"
    attempt is recorded); else the soonest of here and the others — a countdown, or parking
    unless the deadline passes first; if none will ever do, the job fails ("no_route").

    After an error: a final error or the last hop fails the job; else another candidate with
    room now; else the soonest usable candidate (here included), waiting at least the error's
    backoff (Overloaded ``min(0.5 * 2**hop, 30)``, other retryable errors but 429
    ``min(2**hop, 30)``) — a countdown, or parking; if none is usable, the job fails.
    """
    if isinstance(reason, NoRoom):
        return _after_no_room(here, options, job, reason.wait, clock, turns)
    return _after_error(here, options, job, reason, clock, turns)


def _after_no_room(
    here: Candidate,
    options: Sequence[Option],
    job: JobFacts,
    denied: Wait,
    clock: Callable[[], float],
    turns: Iterator[int],
) -> Hop:
    others = [o for o in options if o.candidate != here]
    roomy = [o for o in others if o.has_room]
    if roomy:
        target = choose(roomy, job.strategy, next(turns)).candidate
        return Move(target, 0.0, 1, rerouted=f"no room: {denied.why}")
    waits = [(denied, here)] + [(o.wait, o.candidate) for o in others]
    wait, target = min(waits, key=lambda w: w[0].seconds)
    if wait.is_never:
        reasons = "; ".join(f"{c}: {w.why}" for w, c in waits)
        return Fail(f"no provider can take this job: {reasons}", "no_route")
    moved = int(target != here)
    if wait.seconds <= job.max_countdown_s:
        return Move(target, wait.seconds, moved)
    until_s = clock() + wait.seconds
    if job.deadline_s is not None and job.deadline_s < until_s:
        return Fail(f"its deadline passes before any quota is back ({wait.why})", "deadline")
    return Park(target, until_s, moved)


def _after_error(
    here: Candidate,
    options: Sequence[Option],
    job: JobFacts,
    reason: AfterError,
    clock: Callable[[], float],
    turns: Iterator[int],
) -> Hop:
    ended = reason.ends_the_job(job.hop, job.max_hops)
    if ended is not None:
        return ended
    exc = reason.error
    others = [o for o in options if o.candidate != here and o.has_room]
    if others:
        return Move(choose(others, job.strategy, next(turns)).candidate, 0.0, 1)
    usable = [o for o in options if not o.wait.is_never]
    if not usable:
        return Fail(f"no provider left to try after: {exc}", exc.kind)
    best = min(usable, key=lambda o: o.wait.seconds)
    wait_s = max(best.wait.seconds, reason.backoff_s(job.hop))
    if wait_s <= job.max_countdown_s:
        return Move(best.candidate, wait_s, 1)
    return Park(best.candidate, clock() + wait_s, 1)


@dataclass
class _View:
    """What a producer last read of some candidates, and what it placed on them since."""

    read_at: float
    snapshots: dict[Candidate, Snapshot]
    queued: dict[Candidate, Costs]


class Router:
    def __init__(self, settings: Settings, keyring: KeyRing, limiter: Limiter) -> None:
        self.settings = settings
        self.keyring = keyring
        self.limiter = limiter
        #: round_robin's turns, one drawn each time a strategy chooses (placement and next hops)
        self.turns = itertools.count()
        self._views: dict[tuple[Candidate, ...], _View] = {}
        self._views_lock = threading.Lock()

    def usable(self, chain: Chain) -> tuple[list[Candidate], dict[str, str]]:
        """The chain's candidates with a key here, and why each other one was skipped."""
        usable, skipped = [], {}
        for candidate in chain.candidates:
            if self.keyring.usable(candidate.provider):
                usable.append(candidate)
            else:
                skipped[str(candidate)] = self.keyring.skipped.get(candidate.provider, "no key")
        return usable, skipped

    def candidates(self, task: str, tier: str) -> list[Candidate]:
        """Usable candidates for a task type and tier, or NoRouteError saying why, per candidate."""
        chain = self.settings.chain(task, tier)
        usable, skipped = self.usable(chain)
        if not usable:
            detail = "; ".join(f"{name}: {why}" for name, why in skipped.items())
            raise NoRouteError(f"no provider can take {task}/{tier} jobs: {detail}", skipped)
        return usable

    def options(
        self,
        candidates: Sequence[Candidate],
        costs: Costs,
        share: float,
        queued: dict[Candidate, Costs] | None = None,
    ) -> list[Option]:
        snapshots = self.limiter.snapshots(list(candidates))
        return [expected_wait(snapshots[c], costs, share, (queued or {}).get(c)) for c in candidates]

    def choose(self, options: Sequence[Option], strategy: str, preferred: str | None = None) -> Option:
        return choose(options, strategy, next(self.turns), preferred)

    def place(
        self,
        task: str,
        tier: str,
        costs: Costs,
        *,
        preferred: str | None = None,
        exclude: Sequence[Candidate] = (),
        count: bool = True,
    ) -> Placement:
        """Pick where one job goes; with `count`, record it as queued there."""
        chain = self.settings.chain(task, tier)
        candidates = [c for c in self.candidates(task, tier) if c not in exclude]
        if not candidates:
            raise NoRouteError(f"no other provider in the {task}/{tier} chain")
        share = self.settings.tiers[tier].budget_share
        view = self._view(tuple(candidates))
        with self._views_lock:
            options = [expected_wait(view.snapshots[c], costs, share, view.queued.get(c)) for c in candidates]
            choice = self.choose(options, chain.strategy, preferred)
            if count and not choice.wait.is_never:
                view.queued[choice.candidate] = view.queued.get(choice.candidate, Costs(0, 0, 0, 0)) + costs
        if choice.wait.is_never:
            detail = "; ".join(f"{o.candidate}: {o.why}" for o in options)
            raise NoRouteError(
                f"no provider can ever take this job: {detail}", {str(o.candidate): o.why for o in options}
            )
        if count:
            self.limiter.add_pending({choice.candidate: costs})
        return Placement(choice.candidate, choice.wait, tuple(options))

    def _view(self, candidates: tuple[Candidate, ...]) -> _View:
        """The limiter's state of these candidates as of at most PLACEMENT_VIEW_S ago (read
        again when older), with the jobs this process placed on them since."""
        now = time.monotonic()
        with self._views_lock:
            view = self._views.get(candidates)
            if view is not None and now - view.read_at < constants.PLACEMENT_VIEW_S:
                return view
        view = _View(now, self.limiter.snapshots(list(candidates)), {})
        with self._views_lock:
            self._views[candidates] = view
        return view

    def place_many(
        self,
        task: str,
        tier: str,
        costs: Sequence[Costs],
        *,
        preferred: str | None = None,
        count_queued: bool = True,
    ) -> list[Candidate]:
        """Place a chunk of jobs on the placement view (`_view`): each placement sees the last,
        and those this process made since the view was read. `count_queued=False`: the caller
        counts those it queues itself (`Limiter.add_pending`), after running some at once."""
        chain = self.settings.chain(task, tier)
        candidates = self.candidates(task, tier)
        share = self.settings.tiers[tier].budget_share
        view = self._view(tuple(candidates))
        queued: dict[Candidate, Costs] = {}
        placed = []
        with self._views_lock:
            for cost in costs:
                options = [
                    expected_wait(view.snapshots[c], cost, share, view.queued.get(c)) for c in candidates
                ]
                chosen = self.choose(options, chain.strategy, preferred).candidate
                queued[chosen] = queued.get(chosen, Costs(0, 0, 0, 0)) + cost
                view.queued[chosen] = view.queued.get(chosen, Costs(0, 0, 0, 0)) + cost
                placed.append(chosen)
        if count_queued:
            self.limiter.add_pending(queued)
        return placed
