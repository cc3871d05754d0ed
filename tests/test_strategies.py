"""Placement strategies: given each candidate's expected wait, which one a job goes to."""

from __future__ import annotations

import pytest

from workers.config import Candidate
from workers.limiter import Wait
from workers.strategies import ROOM_S, STRATEGIES, Option, fastest, ordered, round_robin

A, B, C = Candidate("a", "am"), Candidate("b", "bm"), Candidate("c", "cm")


def opt(candidate: Candidate, seconds: float, why: str = "") -> Option:
    return Option(candidate, Wait(seconds, why))


def never(candidate: Candidate, why: str = "no usable key") -> Option:
    return Option(candidate, Wait.never(why))


def test_every_strategy_is_registered_by_name() -> None:
    assert {"ordered": ordered, "round_robin": round_robin, "fastest": fastest} == STRATEGIES


def test_room_means_a_wait_within_scheduling_noise() -> None:
    assert opt(A, 0).has_room and opt(A, ROOM_S).has_room
    assert not opt(A, ROOM_S + 0.001).has_room
    assert not never(A).has_room
    assert never(A).wait.is_never and never(A).why == "no usable key"


def test_ordered_takes_the_first_candidate_with_room() -> None:
    options = [opt(A, 3.0, "rpm busy"), opt(B, 0.04), opt(C, 0.0)]
    assert ordered(options, 0) is options[1]
    assert ordered(options, 7) is options[1]  # the turn does not matter


def test_ordered_falls_back_to_the_shortest_wait() -> None:
    options = [opt(A, 9.0), never(B), opt(C, 2.5)]
    assert ordered(options, 0) is options[2]


def test_round_robin_takes_turns_among_candidates_with_room() -> None:
    options = [opt(A, 0.0), opt(B, 5.0), opt(C, 0.01)]
    picks = [round_robin(options, turn).candidate for turn in range(4)]
    assert picks == [A, C, A, C]  # b has no room: never its turn


def test_round_robin_falls_back_to_the_shortest_wait() -> None:
    options = [opt(A, 4.0), opt(B, 1.0), never(C)]
    assert {round_robin(options, turn).candidate for turn in range(3)} == {B}


def test_fastest_takes_the_shortest_wait_ties_to_the_earlier() -> None:
    assert fastest([opt(A, 0.02), opt(B, 0.0), opt(C, 0.0)], 0).candidate == B
    assert fastest([opt(A, 2.0), opt(B, 2.0)], 0).candidate == A


def test_fastest_gives_a_job_with_room_to_the_candidate_with_the_most_left() -> None:
    roomy = [Option(A, Wait(0.0), slack_s=20.0), Option(B, Wait(0.0), slack_s=45.0)]
    assert fastest(roomy, 0).candidate == B  # a fuller bucket would waste more of its refill
    assert fastest([Option(A, Wait(0.0), slack_s=0.5), opt(B, 0.01)], 0).candidate == A


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_candidate_that_can_never_take_the_job_is_picked_last(strategy: str) -> None:
    assert STRATEGIES[strategy]([never(A), opt(B, 600.0)], 0).candidate == B
    everything_never = [never(A, "every key is disabled"), never(B)]
    assert STRATEGIES[strategy](everything_never, 0).wait.is_never  # the caller says "no route"
