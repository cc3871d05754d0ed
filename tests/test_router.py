"""The router's pure parts, without Redis or a store: `next_hop` (where a job that cannot run
here goes) in every branch, and `expected_wait` over typed limiter snapshots."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from workers.config import Candidate
from workers.errors import (
    AuthError,
    BadRequest,
    Overloaded,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    ServerError,
)
from workers.keys import ApiKey
from workers.limiter import AccountState, BucketSpec, BucketState, Costs, Scope, Snapshot, Wait
from workers.router import (
    AfterError,
    Fail,
    JobFacts,
    Move,
    NoRoom,
    Park,
    choose,
    expected_wait,
    next_hop,
)
from workers.strategies import Option

A, B, C = Candidate("a", "am"), Candidate("b", "bm"), Candidate("c", "cm")
NOW_S = 1_700_000_000.0
FACTS = JobFacts(strategy="ordered", hop=0, max_hops=8, max_countdown_s=30.0, deadline_s=None)


def opt(candidate: Candidate, seconds: float, why: str = "") -> Option:
    return Option(candidate, Wait(seconds, why))


def never(candidate: Candidate, why: str) -> Option:
    return Option(candidate, Wait.never(why))


def unread_clock() -> float:
    raise AssertionError("the clock is read only to park")


def decide(options, reason, *, here=A, clock=unread_clock, turns=None, **facts):
    return next_hop(
        here,
        options,
        replace(FACTS, **facts),
        reason,
        clock=clock,
        turns=itertools.count() if turns is None else turns,
    )


# -- after no room here --------------------------------------------------------------------------


def test_no_room_goes_to_another_candidate_with_room_now() -> None:
    hop = decide([opt(B, 0.0), opt(C, 0.01)], NoRoom(Wait(5.0, "rpm")))
    assert hop == Move(B, 0.0, 1, rerouted="no room: rpm")


def test_no_room_lets_the_strategy_pick_among_the_roomy_ones() -> None:
    options = [opt(B, 0.0), opt(C, 0.0)]
    turns = iter([1])  # round_robin's turn, drawn once
    assert decide(options, NoRoom(Wait(5.0, "rpm")), strategy="round_robin", turns=turns).target == C
    assert decide([opt(B, 9.0), opt(C, 0.0)], NoRoom(Wait(5.0, "rpm")), strategy="fastest").target == C


def test_a_turn_is_drawn_only_when_the_strategy_picks() -> None:
    turns = itertools.count()
    decide([opt(B, 3.0)], NoRoom(Wait(5.0, "rpm")), turns=turns)
    assert next(turns) == 0


def test_no_room_for_a_candidate_not_usable_here_still_moves() -> None:
    hop = decide([opt(B, 0.0)], NoRoom(Wait.never("a is not usable here")))
    assert hop == Move(B, 0.0, 1, rerouted="no room: a is not usable here")


def test_no_room_never_picks_its_own_candidate_as_another() -> None:
    hop = decide([opt(A, 0.0), opt(B, 12.0, "tpm busy")], NoRoom(Wait(8.0, "rpm")))
    assert hop == Move(A, 8.0, 0)  # the limiter's answer stands for a, not the estimate


def test_no_room_anywhere_soon_counts_down_here() -> None:
    assert decide([opt(B, 20.0, "rpm busy")], NoRoom(Wait(8.0, "rpm"))) == Move(A, 8.0, 0)


def test_no_room_anywhere_soon_counts_down_where_it_is_soonest() -> None:
    hop = decide([opt(B, 20.0), opt(C, 10.0, "tpm busy")], NoRoom(Wait(25.0, "rpm")))
    assert hop == Move(C, 10.0, 1)


def test_equal_waits_keep_the_job_here() -> None:
    assert decide([opt(B, 10.0)], NoRoom(Wait(10.0, "rpm"))) == Move(A, 10.0, 0)


def test_a_wait_longer_than_a_countdown_parks_the_job() -> None:
    reason = NoRoom(Wait(3600.0, "rpd"))
    assert decide([never(B, "no usable key")], reason, clock=lambda: NOW_S) == Park(A, NOW_S + 3600, 0)
    hop = decide([opt(B, 1800.0, "rpd busy")], reason, clock=lambda: NOW_S)
    assert hop == Park(B, NOW_S + 1800, 1)


def test_the_countdown_limit_is_inclusive() -> None:
    assert decide([], NoRoom(Wait(30.0, "rpm")), max_countdown_s=30.0) == Move(A, 30.0, 0)


def test_a_deadline_before_the_parking_ends_fails_the_job() -> None:
    reason = NoRoom(Wait(3600.0, "rpd"))
    hop = decide([], reason, clock=lambda: NOW_S, deadline_s=NOW_S + 60)
    assert hop == Fail("its deadline passes before any quota is back (rpd)", "deadline")
    assert decide([], reason, clock=lambda: NOW_S, deadline_s=NOW_S + 3600) == Park(A, NOW_S + 3600, 0)


def test_a_deadline_does_not_stop_a_countdown() -> None:
    assert decide([], NoRoom(Wait(20.0, "rpm")), deadline_s=NOW_S - 1) == Move(A, 20.0, 0)


def test_no_room_and_never_anywhere_fails_with_every_reason() -> None:
    options = [never(B, "every key is disabled"), never(C, "one job needs 600 of tpm; the limit is lower")]
    hop = decide(options, NoRoom(Wait.never("key disabled: rejected (HTTP 401)")))
    assert hop == Fail(
        "no provider can take this job: a:am: key disabled: rejected (HTTP 401); "
        "b:bm: every key is disabled; c:cm: one job needs 600 of tpm; the limit is lower",
        "no_route",
    )


def test_no_room_with_no_other_candidate_readable_decides_on_its_own_wait() -> None:
    assert decide([], NoRoom(Wait(4.0, "concurrency"))) == Move(A, 4.0, 0)
    assert decide([], NoRoom(Wait.never("no usable key"))) == Fail(
        "no provider can take this job: a:am: no usable key", "no_route"
    )


# -- after a provider error ----------------------------------------------------------------------


def err(kind: type, **kw):
    return kind("boom", "a", kw.pop("status", 500), **kw)


def test_after_an_error_another_candidate_with_room_wins() -> None:
    hop = decide([opt(A, 0.0), opt(B, 0.0)], AfterError(err(ServerError)))
    assert hop == Move(B, 0.0, 1)  # a has room too, but it just failed


def test_after_an_error_the_strategy_picks_among_the_others() -> None:
    options = [opt(A, 0.0), opt(B, 0.0), opt(C, 0.0)]
    hop = decide(options, AfterError(err(ServerError)), strategy="round_robin", turns=iter([1]))
    assert hop == Move(C, 0.0, 1)


def test_after_a_server_error_it_backs_off_here() -> None:
    options = [opt(A, 0.0), opt(B, 40.0)]
    assert decide(options, AfterError(err(ServerError)), hop=0) == Move(A, 1.0, 1)
    assert decide(options, AfterError(err(ProviderTimeout)), hop=3) == Move(A, 8.0, 1)
    assert decide(options, AfterError(err(ServerError)), hop=6) == Move(A, 30.0, 1)  # capped


def test_after_overloaded_it_backs_off_half_as_long() -> None:
    options = [opt(A, 0.0)]
    assert decide(options, AfterError(err(Overloaded, status=529)), hop=0) == Move(A, 0.5, 1)
    assert decide(options, AfterError(err(Overloaded, status=529)), hop=3) == Move(A, 4.0, 1)
    assert decide(options, AfterError(err(Overloaded, status=529)), hop=7, max_hops=20) == Move(A, 30.0, 1)


def test_after_a_429_there_is_no_backoff_only_the_block() -> None:
    limited = AfterError(err(RateLimited, status=429, retry_at_s=NOW_S + 12))
    assert decide([opt(A, 12.0, "blocked: 429"), opt(B, 20.0)], limited, hop=3) == Move(A, 12.0, 1)
    assert decide([opt(A, 0.0)], limited, hop=3) == Move(A, 0.0, 1)


def test_after_an_error_a_longer_wait_than_the_backoff_wins() -> None:
    hop = decide([never(A, "every key is disabled"), opt(B, 5.0)], AfterError(err(ServerError)))
    assert hop == Move(B, 5.0, 1)


def test_after_an_error_the_soonest_usable_candidate_is_taken() -> None:
    hop = decide([opt(A, 25.0), opt(B, 12.0), opt(C, 12.0)], AfterError(err(ServerError)), hop=1)
    assert hop == Move(B, 12.0, 1)  # ties go to the earlier candidate


def test_after_an_error_a_long_wait_parks_the_job() -> None:
    options = [opt(A, 3600.0, "rpd busy"), never(B, "no usable key")]
    hop = decide(options, AfterError(err(ServerError)), clock=lambda: NOW_S)
    assert hop == Park(A, NOW_S + 3600, 1)
    # As it always was, only a move for lack of room checks the deadline before parking.
    hop = decide(options, AfterError(err(ServerError)), clock=lambda: NOW_S, deadline_s=NOW_S + 60)
    assert hop == Park(A, NOW_S + 3600, 1)


def test_after_an_error_with_nothing_usable_the_job_fails() -> None:
    options = [never(A, "every key is disabled"), never(B, "no usable key")]
    exc = err(ServerError)
    assert decide(options, AfterError(exc)) == Fail(f"no provider left to try after: {exc}", "server_error")
    assert decide([], AfterError(exc)) == Fail(f"no provider left to try after: {exc}", "server_error")


def test_a_final_error_fails_the_job_wherever_the_others_stand() -> None:
    exc = err(BadRequest, status=400)
    assert decide([opt(B, 0.0)], AfterError(exc)) == Fail("a HTTP 400: boom", "bad_request")


@pytest.mark.parametrize("kind", [QuotaExhausted, AuthError])
def test_a_blocked_account_or_rejected_key_moves_on_without_backoff(kind: type) -> None:
    exc = err(kind, status=401)
    assert decide([opt(A, 0.0), opt(B, 0.0)], AfterError(exc)) == Move(B, 0.0, 1)
    assert decide([never(A, "every key is disabled"), opt(B, 3.0)], AfterError(exc), hop=4) == Move(B, 3.0, 1)


def test_the_last_hop_fails_the_job() -> None:
    exc = err(ServerError)
    hop = decide([opt(B, 0.0)], AfterError(exc), hop=3, max_hops=4)
    assert hop == Fail(f"gave up after 4 attempts; last: {exc}", "server_error")
    assert decide([opt(B, 0.0)], AfterError(exc), hop=2, max_hops=4) == Move(B, 0.0, 1)


def test_an_error_that_ends_the_job_says_so_before_anything_is_read() -> None:
    assert AfterError(err(BadRequest, status=400)).ends_the_job(0, 8) == Fail(
        "a HTTP 400: boom", "bad_request"
    )
    assert AfterError(err(ServerError)).ends_the_job(7, 8) is not None
    assert AfterError(err(ServerError)).ends_the_job(6, 8) is None
    assert AfterError(err(AuthError, status=401)).ends_the_job(0, 8) is None


def test_choose_prefers_a_provider_with_room() -> None:
    options = [opt(A, 0.0), opt(B, 0.0)]
    assert choose(options, "ordered", 0, preferred="b").candidate == B
    assert choose([opt(A, 0.0), opt(B, 3.0)], "ordered", 0, preferred="b").candidate == A


# -- expected_wait on typed snapshots ------------------------------------------------------------

NOW_MS = 1_700_000_000_000
RESET_MS = NOW_MS + 5 * 3_600_000
RPM = BucketSpec.configured(Scope.ACCOUNT, "rpm", 60)
TPM = BucketSpec.configured(Scope.ACCOUNT, "tpm", 1000)
MODEL_RPM = BucketSpec.configured(Scope.MODEL, "rpm", 10)
RPD = BucketSpec.configured(Scope.ACCOUNT, "rpd", 100)
JOB = Costs.estimate(50, 50)  # 1 request, 100 tokens


def account(key_id: str = "k0", specs=(RPM,), avail=None, **state) -> AccountState:
    avail = avail or [s.capacity for s in specs]
    fields = {
        "disabled": None,
        "blocked_until_ms": 0,
        "blocked_why": "",
        "open_until_ms": 0,
        "probe_until_ms": 0,
        "fails": 0,
        "in_flight": 0,
    }
    fields.update(state)
    buckets = tuple(BucketState(s, a, s.capacity) for s, a in zip(specs, avail, strict=True))
    return AccountState(key_id=key_id, account=key_id, buckets=buckets, **fields)


def snap(*accounts: AccountState, specs=(RPM,), pending=None) -> Snapshot:
    keys = tuple(ApiKey("a", a.key_id, a.account, "A_KEY") for a in accounts)
    return Snapshot(A, keys, tuple(specs), NOW_MS, RESET_MS, pending or {}, accounts)


def test_room_now() -> None:
    option = expected_wait(snap(account(avail=[10])), JOB, 1.0)
    # 9 requests left after this one, at one a second: 9 s of refill in hand
    assert option == Option(A, Wait(0.0, ""), slack_s=9.0) and option.has_room


def test_slack_is_the_tightest_per_minute_bucket_after_queued_work() -> None:
    tpm = BucketSpec.configured(Scope.ACCOUNT, "tpm", 6000)  # 100 tokens a second
    both = snap(account(specs=(RPM, tpm), avail=[10, 500]), specs=(RPM, tpm), pending={"am|requests": 2.0})
    # requests: 10 - 2 queued - 1 = 7 s; tokens: (500 - 100) / 100 = 4 s
    assert expected_wait(both, JOB, 1.0).slack_s == pytest.approx(4.0)
    # a daily window does not refill as it goes: it leaves no slack of its own
    daily = snap(account(specs=(RPD,), avail=[50]), specs=(RPD,))
    assert expected_wait(daily, JOB, 1.0).slack_s == 0.0
    # no room, no slack
    assert expected_wait(snap(account(avail=[0.5])), JOB, 1.0).slack_s == 0.0


def test_a_rolling_bucket_waits_for_its_refill() -> None:
    option = expected_wait(snap(account(avail=[0.5])), JOB, 1.0)
    assert option.wait == Wait(0.5, "rpm busy")  # half a request at one a second


def test_queued_work_counts_before_the_job() -> None:
    pending = {"am|requests": 2.0, "other|requests": 3.0}
    # the account's buckets see every model's queue: 5 queued + 1 job - 1 free = 5 s
    account_wide = snap(account(avail=[1.0]), pending=pending)
    assert expected_wait(account_wide, JOB, 1.0).wait.seconds == pytest.approx(5.0)
    # a model's bucket only its own model's: 2 queued + 1 - 1 = 2 requests at 10 a minute
    model = snap(account(specs=(MODEL_RPM,), avail=[1.0]), specs=(MODEL_RPM,), pending=pending)
    assert expected_wait(model, JOB, 1.0).wait.seconds == pytest.approx(12.0)
    # and the caller's own placements so far count as queued
    placed = expected_wait(snap(account(avail=[1.0])), JOB, 1.0, extra=Costs(1))
    assert placed.wait.seconds == pytest.approx(1.0)


def test_a_tier_share_leaves_the_rest_alone() -> None:
    option = expected_wait(snap(account(avail=[20.0])), JOB, 0.7)  # 18 of 60 kept back
    assert option.has_room
    assert expected_wait(snap(account(avail=[18.5])), JOB, 0.7).wait.seconds == pytest.approx(0.5)


def test_a_daily_window_waits_for_the_reset() -> None:
    option = expected_wait(snap(account(specs=(RPD,), avail=[0.0]), specs=(RPD,)), JOB, 1.0)
    assert option.wait == Wait((RESET_MS - NOW_MS) / 1000, "rpd busy")


def test_the_worst_bucket_decides() -> None:
    state = account(specs=(RPM, TPM), avail=[0.0, 0.0])
    option = expected_wait(snap(state, specs=(RPM, TPM)), JOB, 1.0)
    # 100 tokens at 1000 a minute; rpm needs only 1 s. The reason names the first busy bucket.
    assert option.wait == Wait(6.0, "rpm busy")


def test_a_blocked_account_adds_its_block_and_says_why() -> None:
    blocked = account(avail=[0.0], blocked_until_ms=NOW_MS + 5000, blocked_why="429 (per-minute quota)")
    assert expected_wait(snap(blocked), JOB, 1.0).wait == Wait(6.0, "429 (per-minute quota)")


def test_an_open_circuit_waits_for_its_cooldown() -> None:
    opened = account(open_until_ms=NOW_MS + 30_000, fails=5)
    assert expected_wait(snap(opened), JOB, 1.0).wait == Wait(30.0, "circuit open")
    probing = account(open_until_ms=NOW_MS - 1, fails=5)  # half-open: usable
    assert expected_wait(snap(probing), JOB, 1.0).has_room


def test_a_stale_block_is_no_block() -> None:
    old = account(blocked_until_ms=NOW_MS - 1, blocked_why="429 (per-minute quota)")
    assert expected_wait(snap(old), JOB, 1.0).wait == Wait(0.0, "")


def test_capacity_adds_up_over_the_accounts_usable_now() -> None:
    one, two = account("k0", avail=[0.5]), account("k1", avail=[0.0])
    assert expected_wait(snap(one, two), JOB, 1.0).wait.seconds == pytest.approx(0.25)  # 120 a minute
    blocked = replace(two, blocked_until_ms=NOW_MS + 60_000, blocked_why="x")
    assert expected_wait(snap(one, blocked), JOB, 1.0).wait.seconds == pytest.approx(0.5)


def test_never_when_every_key_is_disabled_or_there_is_none() -> None:
    assert expected_wait(snap(account(disabled="rejected (HTTP 401)")), JOB, 1.0).wait == Wait.never(
        "every key is disabled"
    )
    assert expected_wait(snap(), JOB, 1.0).wait == Wait.never("no usable key")


def test_never_when_one_job_is_bigger_than_the_limit() -> None:
    option = expected_wait(snap(account(specs=(TPM,)), specs=(TPM,)), Costs.estimate(600, 600), 1.0)
    assert option.wait == Wait.never("one job needs 1200 of tpm; the limit is lower")
    assert option.wait.is_never and not option.has_room


def test_a_snapshot_is_parsed_once_from_inspect_json() -> None:
    raw = json.dumps(
        {
            "now": NOW_MS,
            "next_reset": RESET_MS,
            "pending": {},  # cjson writes an empty list or map as {}
            "accounts": [
                {
                    "disabled": "",
                    "blocked_until": NOW_MS + 2000,
                    "blocked_why": "429 (per-minute quota)",
                    "open_until": 0,
                    "probe_until": 0,
                    "fails": 2,
                    "in_flight": 1,
                    "buckets": [
                        {"field": "rpm", "scope": 1, "kind": 0, "avail": 0, "cap": 60, "period": 60000},
                        {"field": "rpm", "scope": 2, "kind": 0, "avail": 3, "cap": 8, "period": 60000},
                    ],
                }
            ],
        }
    )
    key = ApiKey("a", "k0-abc", "k0-abc", "A_KEY", "secret")
    parsed = Snapshot.parse(A, [key], (RPM, MODEL_RPM), raw)
    [state] = parsed.accounts
    assert state.key_id == "k0-abc" and state.disabled is None and state.fails == 2 and state.in_flight == 1
    assert state.blocked_until_ms == NOW_MS + 2000 and state.usable_from_ms(NOW_MS) == NOW_MS + 2000
    assert [(b.scope, b.field, b.avail, b.cap) for b in state.buckets] == [
        (Scope.ACCOUNT, "rpm", 0.0, 60.0),
        (Scope.MODEL, "rpm", 3.0, 8.0),  # a limit learned from the provider: 8, not 10
    ]
    assert expected_wait(parsed, JOB, 1.0).wait == Wait(3.0, "429 (per-minute quota)")
    empty = Snapshot.parse(
        A, [], (RPM,), json.dumps({"now": 1, "next_reset": 2, "pending": {}, "accounts": {}})
    )
    assert empty.accounts == () and expected_wait(empty, JOB, 1.0).wait.is_never
