"""Placement strategies, registered by name: given each candidate's expected wait, pick one.

A candidate "has room" when the job could start there now, counting the work already
queued for it. Every strategy falls back to the shortest wait when nobody has room, so
a large batch spreads over providers in proportion to their capacity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not at run time: workers.config imports this module, workers.limiter imports config
    from workers.limiter.wait import Wait

#: A wait at or below this counts as "room now" (scheduling noise, not a real queue).
ROOM_S = 0.05


@dataclass(frozen=True)
class Option:
    """A candidate and its expected wait before it could start the job (`Wait.never`: unusable);
    the wait's reason is what `spillway route` shows."""

    candidate: Any
    wait: Wait
    #: With room: how many seconds of refill the candidate still holds after this job (its
    #: tightest per-minute bucket); 0 otherwise. Budget a full bucket refills is lost.
    slack_s: float = 0.0

    @property
    def wait_s(self) -> float:
        return self.wait.seconds

    @property
    def why(self) -> str:
        return self.wait.why

    @property
    def has_room(self) -> bool:
        return self.wait.seconds <= ROOM_S


Strategy = Callable[[Sequence[Option], int], Option]
STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str) -> Callable[[Strategy], Strategy]:
    def register(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return register


@strategy("ordered")
def ordered(options: Sequence[Option], turn: int) -> Option:
    """The first candidate with room ("free tier first"); else the one that frees up soonest."""
    for option in options:
        if option.has_room:
            return option
    return fastest(options, turn)


@strategy("round_robin")
def round_robin(options: Sequence[Option], turn: int) -> Option:
    """Take turns among the candidates with room."""
    roomy = [o for o in options if o.has_room]
    return roomy[turn % len(roomy)] if roomy else fastest(options, turn)


@strategy("fastest")
def fastest(options: Sequence[Option], turn: int) -> Option:
    """The shortest expected wait; among those with room, the one with the most left (`slack_s`),
    so jobs trickling in drain every provider's bucket in step and none stays full, wasting its
    refill; ties go to the earlier candidate."""
    return min(options, key=lambda o: o.wait.seconds - o.slack_s)
