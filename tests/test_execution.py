"""The job state machine (`workers.execution.run_job`) walked through every way a run ends,
as a plain function: real Redis, a real simulator over HTTP, SQLite."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from tests.conftest import A, B, add_job, snapshot
from workers.execution import Done, Requeue, run_job
from workers.limiter import Costs


def test_success_stores_result_usage_and_cost(make_rt) -> None:
    rt = make_rt(a_limits="tpm = 10000")
    job_id = add_job(rt, max_tokens=500)  # reserves 500 output tokens; the answer uses far fewer
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Done) and outcome.summary["status"] == "succeeded"
    job = rt.store.job(job_id)
    assert job.text and job.provider == "a" and job.calls == 1 and job.key_id.startswith("k0-")
    assert job.cost_usd == pytest.approx((job.input_tokens * 1.0 + job.output_tokens * 2.0) / 1e6)
    [attempt] = rt.store.attempts(job_id)
    assert attempt.outcome == "succeeded" and attempt.output_tokens == job.output_tokens
    tpm = snapshot(rt, A).buckets[0]
    assert tpm.avail == pytest.approx(10000 - job.input_tokens - job.output_tokens, abs=10)  # settled
    assert run_job(rt, job_id, A) == outcome  # a redelivery returns the same summary, no new call
    assert rt.store.job(job_id).calls == 1


def test_server_error_moves_the_job_to_the_next_candidate(make_rt) -> None:
    rt = make_rt()
    rt.sim.sim.settings.providers["a"].faults = {"error_500": 1.0}
    job_id = add_job(rt)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Requeue) and outcome.candidate == B and outcome.hop == 1
    assert outcome.countdown_s == 0
    [attempt] = rt.store.attempts(job_id)
    assert attempt.outcome == "server_error"
    assert attempt.error == "a HTTP 500: The server had an error while processing your request."
    assert isinstance(run_job(rt, job_id, B, hop=1), Done)
    job = rt.store.job(job_id)
    assert (job.status, job.provider, job.calls, job.hops) == ("succeeded", "b", 2, 1)


def test_a_429_blocks_the_account_for_everyone_and_moves_on(make_rt) -> None:
    rt = make_rt()
    rt.sim.sim.settings.providers["a"].faults = {"rate_limit": 1.0}
    outcome = run_job(rt, add_job(rt), A)
    assert isinstance(outcome, Requeue) and outcome.candidate == B
    state = snapshot(rt, A)
    assert state.blocked_until_ms > rt.limiter.now_s() * 1000
    assert state.blocked_why.startswith("429 (per-minute quota)")
    second = run_job(rt, add_job(rt), A)  # the next job never calls a: it is blocked
    assert isinstance(second, Requeue) and second.candidate == B
    assert rt.sim.sim.snapshot()["a"]["requests"] == 1


def test_a_rejected_key_is_disabled_and_the_job_moves_on(make_rt, caplog) -> None:
    rt = make_rt(a_key="bad-key-123")
    job_id = add_job(rt)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Requeue) and outcome.candidate == B
    assert snapshot(rt, A).disabled == "rejected by the provider (HTTP 401)"
    assert "bad-key-123" not in caplog.text and "key k0-" in caplog.text
    assert rt.store.attempts(job_id)[0].outcome == "auth"


def test_a_bad_request_fails_the_job_without_retry(make_rt) -> None:
    def bad(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400,
            json={
                "error": {
                    "message": "Invalid value for 'temperature'.",
                    "type": "invalid_request_error",
                    "code": None,
                }
            },
        )

    rt = make_rt(http=httpx.Client(transport=httpx.MockTransport(bad)))
    job_id = add_job(rt)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Done) and outcome.summary["status"] == "failed"
    job = rt.store.job(job_id)
    assert job.error == "a HTTP 400: Invalid value for 'temperature'." and job.error_kind == "bad_request"


def test_no_room_anywhere_soon_is_a_countdown_to_the_earliest_refill(make_rt) -> None:
    rt = make_rt(a_limits="rpm = 6", b_limits="rpm = 3")  # a: one back every 10 s, b: every 20 s
    for _ in range(6):
        rt.limiter.acquire(A, Costs(1), lease_ttl_s=1)
    for _ in range(3):
        rt.limiter.acquire(B, Costs(1), lease_ttl_s=1)
    job_id = add_job(rt)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Requeue) and outcome.candidate == A
    assert 8 < outcome.countdown_s <= 10 + rt.settings.admission_margin_s and outcome.park_until_s is None
    assert rt.store.job(job_id).status == "queued" and rt.store.attempts(job_id) == []


def test_jobs_that_must_wait_each_reserve_the_next_slot_and_wait_once(make_rt) -> None:
    rt = make_rt(a_limits="rpm = 5")  # one back every 12 s
    for _ in range(5):
        rt.limiter.acquire(A, Costs(1), lease_ttl_s=1)
    jobs = [add_job(rt, task="solo") for _ in range(3)]
    outcomes = [run_job(rt, job_id, A) for job_id in jobs]
    margin = rt.settings.admission_margin_s
    first, second, third = outcomes
    for n, outcome in enumerate((first, second)):  # each behind the one before: no slot twice
        assert isinstance(outcome, Requeue) and outcome.candidate == A and outcome.reservation
        assert outcome.countdown_s == pytest.approx(12 * (n + 1) + margin, abs=0.5)
    # 36 s away is past max_countdown_s (30 here): parked, not reserved (a countdown that long
    # would outlive a broker's patience; a parked job holds no message)
    assert isinstance(third, Requeue) and third.park_until_s is not None and third.reservation is None
    rt.limiter.clock.advance(first.countdown_s)
    done = run_job(rt, jobs[0], A, first.hop, first.reservation)
    assert isinstance(done, Done) and done.summary["status"] == "succeeded"
    early = run_job(rt, jobs[1], A, second.hop, second.reservation)  # its slot is 12 s away
    assert isinstance(early, Requeue) and early.countdown_s == pytest.approx(12, abs=0.5)
    assert early.reservation == second.reservation  # it waits for the same slot, not a new one


def test_room_elsewhere_reroutes_without_a_call(make_rt) -> None:
    rt = make_rt(a_limits="rpm = 1")
    run_job(rt, add_job(rt), A)
    job_id = add_job(rt)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Requeue) and outcome.candidate == B and outcome.countdown_s == 0
    [attempt] = rt.store.attempts(job_id)
    assert attempt.outcome == "rerouted" and not attempt.called and attempt.error == "no room: rpm"


def test_daily_quota_gone_parks_the_job_until_the_reset(make_rt) -> None:
    rt = make_rt(a_limits="rpd = 1")
    run_job(rt, add_job(rt, task="solo"), A)
    job_id = add_job(rt, task="solo")
    outcome = run_job(rt, job_id, A)
    reset = rt.settings.providers["a"].daily_reset.next_reset_s(rt.limiter.now_s())
    assert isinstance(outcome, Requeue) and outcome.park_until_s == pytest.approx(reset, abs=2)
    assert rt.store.job(job_id).status == "parked"


def test_a_deadline_before_the_reset_fails_the_job(make_rt) -> None:
    rt = make_rt(a_limits="rpd = 1")
    run_job(rt, add_job(rt, task="solo"), A)
    job_id = add_job(rt, task="solo", deadline_s=60)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Done) and outcome.summary["error_kind"] == "deadline"
    assert "deadline passes before any quota is back (rpd)" in rt.store.job(job_id).error


def test_a_job_no_provider_can_ever_take_fails(make_rt) -> None:
    rt = make_rt(a_limits="tpm = 100", b_limits="tpm = 100")
    job_id = add_job(rt, max_tokens=500)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Done) and outcome.summary["status"] == "failed"
    error = rt.store.job(job_id).error
    assert error.startswith("no provider can take this job: a:am: one job needs")
    assert "b:bm: one job needs" in error


def test_hops_are_bounded(make_rt) -> None:
    rt = make_rt()
    rt.sim.sim.settings.providers["a"].faults = {"error_500": 1.0}
    rt.sim.sim.settings.providers["b"].faults = {"error_500": 1.0}
    job_id, candidate, hop = add_job(rt), A, 0
    for _ in range(10):
        outcome = run_job(rt, job_id, candidate, hop)
        if isinstance(outcome, Done):
            break
        candidate, hop = outcome.candidate, outcome.hop
    job = rt.store.job(job_id)
    assert job.status == "failed" and job.error.startswith("gave up after 4 attempts; last:")
    assert job.calls == 4


def test_circuit_opens_and_jobs_go_to_the_other_provider(make_rt) -> None:
    rt = make_rt()
    rt.sim.sim.settings.providers["a"].faults = {"error_503": 1.0}
    for _ in range(3):
        run_job(rt, add_job(rt), A)
    assert snapshot(rt, A).open_until_ms > rt.limiter.now_s() * 1000
    outcome = run_job(rt, add_job(rt), A)
    assert isinstance(outcome, Requeue) and outcome.candidate == B
    assert rt.sim.sim.snapshot()["a"]["requests"] == 3  # the open circuit spared a a fourth call


def test_a_delivery_of_a_job_another_worker_runs_waits(make_rt) -> None:
    rt = make_rt()
    job_id = add_job(rt)
    rt.store.claim(job_id, lease_s=30, max_crashes=3)
    outcome = run_job(rt, job_id, A)
    assert isinstance(outcome, Requeue) and 25 < outcome.countdown_s <= 30


def test_an_unreachable_limiter_never_means_unlimited_calls(make_rt, tmp_path) -> None:
    rt = make_rt()
    dead = redis.Redis(port=1, socket_connect_timeout=0.2)
    rt.limiter.redis = dead
    rt.limiter._acquire = dead.register_script(rt.limiter._acquire.script)
    outcome = run_job(rt, add_job(rt), A)
    assert isinstance(outcome, Requeue) and outcome.countdown_s == 5.0
    assert rt.sim.sim.snapshot()["a"].get("requests", 0) == 0


def test_summaries_are_json_and_small(make_rt) -> None:
    rt = make_rt()
    outcome = run_job(rt, add_job(rt, prompt="x" * 5000), A)
    assert len(json.dumps(outcome.summary)) < 300 and "x" * 50 not in json.dumps(outcome.summary)
