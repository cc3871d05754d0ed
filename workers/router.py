"""The router: which provider:model a job goes to, now.

It takes the route's chain for a task type and tier, drops candidates without a usable
key, asks the limiter how long each remaining one would make the job wait — its free
budget minus the work already queued for it, over its refill rate — and lets the route's
strategy choose. Placement counts the job as queued for the chosen provider, so the next
placement sees it: a large batch spreads over providers in proportion to their capacity.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from workers.config import Candidate, Chain, Settings
from workers.errors import NoRouteError
from workers.keys import KeyRing
from workers.limiter import Costs, Limiter, Snapshot
from workers.limiter.limiter import NEVER_S
from workers.strategies import STRATEGIES, Option


@dataclass(frozen=True)
class Placement:
    candidate: Candidate
    wait_s: float
    options: tuple[Option, ...]


def expected_wait(snap: Snapshot, costs: Costs, share: float, extra: Costs | None = None) -> Option:
    """How long until this candidate could start one more job, counting the work queued for it.

    Capacity is summed over the accounts usable now (not disabled, blocked or cooling down);
    if none is, the wait starts when the first one comes back.
    """
    now = snap.now_ms
    unit_cost = costs.as_dict()
    accounts = [a for a in snap.accounts if not a.get("disabled")]
    if not accounts:
        why = "every key is disabled" if snap.accounts else "no usable key"
        return Option(snap.candidate, math.inf, why)
    back_at = [
        max(now, a["blocked_until"], a["open_until"] if a["open_until"] > now else 0) for a in accounts
    ]
    ready = [a for a, t in zip(accounts, back_at, strict=True) if t <= now]
    base_ms, why = 0.0, ""
    if not ready:
        base_ms = min(back_at) - now
        first = accounts[back_at.index(min(back_at))]
        why = first["blocked_why"] or "circuit open"
        ready = accounts
    pending = _pending_by_scope(snap, extra)
    worst_ms = 0.0
    for j, spec in enumerate(snap.buckets):
        scope, field, kind, _, period, unit = spec
        states = [a["buckets"][j] for a in ready]
        cost = unit_cost[unit]
        if cost > max(s["cap"] for s in states) * share:
            return Option(snap.candidate, math.inf, f"one job needs {cost:g} of {field}; the limit is lower")
        free = sum(s["avail"] - (1 - share) * s["cap"] for s in states)
        need = pending[scope].get(unit, 0.0) + cost - free
        if need <= 0:
            continue
        # A rolling bucket refills at cap/period; a daily window cannot take it before the reset.
        wait_ms = need * period / sum(s["cap"] for s in states) if kind == 0 else snap.next_reset_ms - now
        if wait_ms > worst_ms:
            worst_ms, why = wait_ms, why or f"{field} busy"
    return Option(snap.candidate, (base_ms + worst_ms) / 1000, why)


def _pending_by_scope(snap: Snapshot, extra: Costs | None) -> dict[int, dict[str, float]]:
    """Queued work per unit: scope 2 counts this model's queue, scope 1 every model's."""
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
    return {1: account, 2: model}


class Router:
    def __init__(self, settings: Settings, keyring: KeyRing, limiter: Limiter) -> None:
        self.settings = settings
        self.keyring = keyring
        self.limiter = limiter
        self._turn = itertools.count()

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
        if preferred:
            mine = [o for o in options if o.candidate.provider == preferred]
            if mine and mine[0].has_room:
                return mine[0]
        return STRATEGIES[strategy](options, next(self._turn))

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
        options = self.options(candidates, costs, share)
        choice = self.choose(options, chain.strategy, preferred)
        if choice.wait_s >= NEVER_S:
            detail = "; ".join(f"{o.candidate}: {o.why}" for o in options)
            raise NoRouteError(
                f"no provider can ever take this job: {detail}", {str(o.candidate): o.why for o in options}
            )
        if count:
            self.limiter.add_pending({choice.candidate: costs})
        return Placement(choice.candidate, choice.wait_s, tuple(options))

    def place_many(
        self, task: str, tier: str, costs: Sequence[Costs], *, preferred: str | None = None
    ) -> list[Candidate]:
        """Place a chunk of jobs with one read of the limiter: each placement sees the last."""
        chain = self.settings.chain(task, tier)
        candidates = self.candidates(task, tier)
        share = self.settings.tiers[tier].budget_share
        snapshots = self.limiter.snapshots(candidates)
        queued: dict[Candidate, Costs] = {}
        placed = []
        for cost in costs:
            options = [expected_wait(snapshots[c], cost, share, queued.get(c)) for c in candidates]
            chosen = self.choose(options, chain.strategy, preferred).candidate
            queued[chosen] = queued.get(chosen, Costs(0, 0, 0, 0)) + cost
            placed.append(chosen)
        self.limiter.add_pending(queued)
        return placed
