"""The limiter's Lua scripts against real Redis, with the clock stopped and moved instead of
waited on: time passes only when a test says so, however slowly the machine runs it."""

from __future__ import annotations

import pytest
import redis

from workers.config import Candidate, parse_settings
from workers.keys import KeyRing
from workers.keyspace import Keyspace
from workers.limiter import Clock, Costs, Denied, Lease, Limiter, Reserved, Scope
from workers.providers.signals import RateLimitSignal, Window

TEMPLATE = """
[providers.p]
api = "openai"
base_url = "http://sim/p/v1"
key_env = "P_KEY"
{extra}
limits = {{ {limits} }}
[providers.p.models.m]
{model}
[routes."*"]
free = ["p:m"]
"""
P = Candidate("p", "m")
SMALL = Costs.estimate(10, 10)  # 1 request, 20 tokens


def make(
    client: redis.Redis,
    limits: str,
    *,
    keys: int = 1,
    extra: str = "",
    model: str = "",
    stopped: bool = True,
) -> Limiter:
    """A limiter on `client`; its clock stands still at Redis's time now (`stopped`) or runs."""
    settings = parse_settings(TEMPLATE.format(limits=limits, extra=extra, model=model), "t.toml")
    env = {f"P_KEY{'_' + str(i) if i else ''}": f"secret-{i}" for i in range(keys)}
    seconds, micros = client.time()
    clock = Clock(stopped_ms=seconds * 1000 + micros // 1000) if stopped else Clock()
    return Limiter(client, settings, KeyRing(settings, env), clock=clock, keys=Keyspace("t"))


def take(limiter: Limiter, costs: Costs = SMALL, **kw) -> Lease | Denied:
    return limiter.acquire(P, costs, lease_ttl_s=kw.pop("lease_ttl_s", 60), **kw)


def buckets(limiter: Limiter, account: int = 0, scope: Scope = Scope.ACCOUNT) -> dict[str, float]:
    """What is available now, per limit, in the account's "*" (ACCOUNT) or MODEL buckets."""
    snap = limiter.snapshots([P])[P]
    return {b.field: b.avail for b in snap.accounts[account].buckets if b.scope == scope}


def test_rolling_bucket_refills_continuously(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60")
    assert all(isinstance(take(lim), Lease) for _ in range(60))
    denied = take(lim)
    # one back a second, plus the admission margin (a refill is not trusted to the millisecond)
    assert isinstance(denied, Denied) and denied.why == "rpm" and denied.wait_s == 1.05
    lim.clock.advance(0.5)
    assert isinstance(take(lim), Denied)
    lim.clock.advance(0.6)
    assert isinstance(take(lim), Lease)  # one request back after a second (60 a minute)
    lim.clock.advance(3600)
    assert buckets(lim)["rpm"] == 60  # never above the capacity


def test_debit_is_all_or_nothing(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 10, tpm = 100")
    assert isinstance(take(lim, Costs.estimate(40, 40)), Lease)  # 80 tokens
    denied = take(lim, Costs.estimate(40, 40))
    assert isinstance(denied, Denied) and denied.why == "tpm"
    state = buckets(lim)
    assert state["rpm"] == pytest.approx(9, abs=0.01)  # the refused call took no request
    assert state["tpm"] == pytest.approx(20, abs=0.5)


def test_daily_window_resets_at_midnight_utc(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpd = 2")
    assert isinstance(take(lim), Lease) and isinstance(take(lim), Lease)
    denied = take(lim)
    now_s = lim.now_s()
    midnight = (int(now_s) // 86400 + 1) * 86400
    assert isinstance(denied, Denied) and denied.why == "rpd"
    assert denied.wait_s == pytest.approx(midnight - now_s, abs=1.0)
    lim.clock.advance(midnight - now_s - 5)
    assert isinstance(take(lim), Denied)  # 5 s before midnight: still today
    lim.clock.advance(6)
    assert isinstance(take(lim), Lease) and isinstance(take(lim), Lease)


def test_daily_window_in_the_providers_time_zone(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpd = 1", extra='daily_reset = "00:00 America/Los_Angeles"')
    take(lim)
    denied = take(lim)
    reset = lim.settings.providers["p"].daily_reset.next_reset_s(lim.now_s())
    assert denied.wait_s == pytest.approx(reset - lim.now_s(), abs=1.0)
    assert round(reset) % 3600 == 0 and round(reset) % 86400 in (7 * 3600, 8 * 3600)  # PDT / PST


def test_concurrency_leases_expire_on_their_own(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "concurrency = 1")
    lease = take(lim, lease_ttl_s=2)
    assert isinstance(lease, Lease)
    denied = take(lim, lease_ttl_s=2)
    assert isinstance(denied, Denied) and denied.why == "concurrency" and denied.wait_s <= 0.25
    lim.clock.advance(2.1)  # the worker holding it crashed: its lease runs out
    assert isinstance(take(lim, lease_ttl_s=2), Lease)


def test_settle_refunds_once_and_releases_the_lease(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "tpm = 1000, concurrency = 1")
    lease = take(lim, Costs.estimate(100, 400))  # reserves 500
    assert buckets(lim)["tpm"] == pytest.approx(500, abs=1)
    lim.settle(lease, actual=Costs(1, 150, 100, 50), outcome="alive")
    assert buckets(lim)["tpm"] == pytest.approx(850, abs=1)  # 350 unused tokens came back
    lim.settle(lease, actual=Costs(1, 0, 0, 0), outcome="alive")  # a retried settle
    assert buckets(lim)["tpm"] == pytest.approx(850, abs=1)
    assert isinstance(take(lim), Lease)  # the concurrency slot was freed


def test_settle_charges_more_when_the_call_used_more(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "tpm = 1000")
    lease = take(lim, Costs.estimate(10, 10))
    lim.settle(lease, actual=Costs(1, 220, 200, 20), outcome="alive")
    assert buckets(lim)["tpm"] == pytest.approx(780, abs=1)


def test_block_extends_never_shortens(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 100")
    leases = [take(lim) for _ in range(3)]  # three calls in flight, each answered 429
    for lease, block_s, expected in zip(leases, (10, 5, 20), (10, 10, 20), strict=True):
        until = lim.settle(
            lease, actual=Costs(1), outcome="alive", block_s=block_s, block_why="429 minute"
        ).blocked_until_s
        denied = take(lim)
        assert isinstance(denied, Denied) and denied.why == "blocked: 429 minute"
        assert denied.wait_s == pytest.approx(expected, abs=0.5)
        assert until == pytest.approx(lim.now_s() + expected, abs=0.5)
    lim.clock.advance(20.1)
    assert isinstance(take(lim), Lease)


def test_block_of_an_account_blocks_every_model(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 100")
    lease = take(lim)
    lim.settle(lease, actual=Costs(0), outcome="alive", block_s=3600, block_account=True, block_why="billing")
    assert take(lim).why == "blocked: billing"


def test_circuit_opens_after_failures_then_lets_one_probe(redis_client: redis.Redis) -> None:
    lim = make(
        redis_client, "rpm = 100", extra="circuit = { failures = 3, probe_after_s = 4, cooldown_s = 10 }"
    )
    for _ in range(3):
        lim.settle(take(lim), actual=Costs(1), outcome="failed")
    denied = take(lim)
    assert denied.why == "circuit open" and denied.wait_s == pytest.approx(4, abs=0.5)
    # each failed probe keeps it open 1.5 times longer, up to the cooldown: 4, 6, 9, 10, 10 s
    for open_s in (6, 9, 10, 10):
        lim.clock.advance(take(lim).wait_s + 0.01)
        probe = take(lim)
        assert isinstance(probe, Lease)
        assert take(lim).why == "circuit half-open: probe in flight"
        settled = lim.settle(probe, actual=Costs(1), outcome="failed")  # still down: open again
        assert not settled.recovered
        denied = take(lim)
        assert denied.why == "circuit open" and denied.wait_s == pytest.approx(open_s, abs=0.05)
    lim.clock.advance(10.1)
    assert lim.settle(take(lim), actual=Costs(1), outcome="alive").recovered  # the probe worked: closed
    assert all(isinstance(take(lim), Lease) for _ in range(5))
    # a call admitted before the circuit opened and failing after it does not move its probe
    straggler = take(lim)
    for _ in range(3):
        lim.settle(take(lim), actual=Costs(1), outcome="failed")
    assert take(lim).wait_s == pytest.approx(4, abs=0.05)
    lim.clock.advance(1)
    lim.settle(straggler, actual=Costs(1), outcome="failed")
    assert take(lim).wait_s == pytest.approx(3, abs=0.05)


def test_success_resets_the_failure_count(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 100", extra="circuit = { failures = 3, cooldown_s = 30 }")
    for outcome in ("failed", "failed", "alive", "failed", "failed"):
        lim.settle(take(lim), actual=Costs(1), outcome=outcome)
    assert isinstance(take(lim), Lease)  # never three in a row


def test_observe_lowers_the_view_and_learns_a_lower_limit(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 120, tpm = 10000")
    lease = take(lim)
    signal = RateLimitSignal(
        received_at_s=0,
        windows=(
            Window("requests", "unknown", limit=60, remaining=30, reset_at_s=30),
            Window("tokens", "unknown", limit=10000, remaining=9990, reset_at_s=1),
        ),
    )
    lim.settle(lease, actual=Costs(1, 20, 10, 10), outcome="alive", signal=signal)
    snap = lim.snapshots([P])[P].accounts[0].buckets
    rpm = next(b for b in snap if b.field == "rpm")
    assert rpm.cap == 60 and rpm.avail == pytest.approx(30, abs=0.1)
    lim.clock.advance(60)
    assert buckets(lim)["rpm"] == 60  # refills to the learned limit, not the configured one
    higher = RateLimitSignal(
        received_at_s=0, windows=(Window("requests", "minute", limit=200, remaining=199),)
    )
    lim.settle(take(lim), actual=Costs(1), outcome="alive", signal=higher)
    lim.clock.advance(60)
    assert buckets(lim)["rpm"] == 120  # a higher limit drops what was learned


def test_observe_never_raises_our_view(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 100")
    for _ in range(50):
        take(lim)
    optimistic = RateLimitSignal(
        received_at_s=0, windows=(Window("requests", "minute", limit=100, remaining=99),)
    )
    lim.settle(take(lim), actual=Costs(1), outcome="alive", signal=optimistic)
    assert buckets(lim)["rpm"] == pytest.approx(49, abs=0.2)


def test_keys_rotate_by_room_and_a_disabled_key_is_skipped(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 5", keys=2)
    used = [take(lim).key.key_id for _ in range(6)]
    assert len(set(used)) == 2 and used[0] != used[1]  # the fuller account goes next
    bad = take(lim)
    assert lim.settle(bad, actual=Costs(0), outcome="alive", disable_why="rejected (HTTP 401)").newly_disabled
    assert not lim.settle(bad, actual=Costs(0), outcome="alive", disable_why="again").newly_disabled
    others = {take(lim).key.key_id for _ in range(2)}
    assert others == {k.key_id for k in lim.keyring.keys("p")} - {bad.key.key_id}
    denied = take(lim)
    assert isinstance(denied, Denied) and denied.why == "rpm"  # the good key is empty; the bad one is out


def test_shared_quota_keys_share_one_bucket(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 4", keys=3, extra="shared_quota = true")
    assert sum(isinstance(take(lim), Lease) for _ in range(10)) == 4


def test_model_limits_are_their_own_buckets(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 100", model="limits = { rpm = 2 }")
    assert [isinstance(take(lim), Lease) for _ in range(3)] == [True, True, False]
    assert buckets(lim, scope=Scope.ACCOUNT)["rpm"] == pytest.approx(98, abs=0.1)
    assert buckets(lim, scope=Scope.MODEL)["rpm"] == pytest.approx(0, abs=0.1)


def test_a_tier_share_keeps_the_rest_for_paid_work(redis_client: redis.Redis) -> None:
    # A running clock: the reserve is (1 - 0.7) * 10 = 3.0000000000000004 in floating point, so at
    # one instant the 7th take lacks 4e-16 of a request; any time passing refills that much.
    lim = make(redis_client, "rpm = 10", stopped=False)
    free = [isinstance(take(lim, share=0.7), Lease) for _ in range(10)]
    assert sum(free) == 7
    assert sum(isinstance(take(lim, share=1.0), Lease) for _ in range(10)) == 3


def test_a_job_bigger_than_the_limit_can_never_run(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "tpm = 100")
    denied = take(lim, Costs.estimate(100, 100))
    assert isinstance(denied, Denied) and denied.never and "the limit is 100" in denied.why


def test_no_key_means_never(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 1", keys=0)
    assert take(lim).never


def test_pending_work_is_counted_and_taken_off_at_acquire(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 100, tpm = 1000")
    lim.add_pending({P: Costs.estimate(10, 10)})
    lim.add_pending({P: Costs.estimate(10, 10)})
    # only the units a bucket counts (no itpm/otpm here: input and output are not kept)
    assert lim.snapshots([P])[P].pending == {"m|requests": 2, "m|tokens": 40}
    take(lim, dequeue=Costs.estimate(10, 10))
    assert lim.snapshots([P])[P].pending["m|requests"] == 1
    take(lim, dequeue=Costs.estimate(10, 10))
    take(lim, dequeue=Costs.estimate(10, 10))  # never below zero
    assert lim.snapshots([P])[P].pending == {}


def test_every_key_carries_the_provider_hash_tag(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 10, rpd = 10, concurrency = 2")
    lease = take(lim)
    lim.add_pending({P: SMALL})
    lim.settle(lease, actual=Costs(1), outcome="failed", block_s=1, block_why="x")
    keys = [k.decode() for k in redis_client.scan_iter("t:*")]  # every node of a cluster too
    assert keys and all(k.startswith("t:{p}:") for k in keys)
    assert all(redis_client.ttl(k) > 0 for k in keys)  # nothing piles up without a TTL


# -- reservations: a job that must wait is given its time once ---------------------------------


def reserve(limiter: Limiter, costs: Costs = SMALL, within_s: float = 60.0) -> Reserved | Denied:
    return limiter.reserve(P, costs, within_s=within_s, lease_ttl_s=60)


def test_reservations_queue_up_one_refill_apart(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60")
    assert all(isinstance(take(lim), Lease) for _ in range(60))
    first, second = reserve(lim), reserve(lim)
    assert isinstance(first, Reserved) and first.wait_s == pytest.approx(1.05)
    assert isinstance(second, Reserved) and second.wait_s == pytest.approx(2.05)
    assert second.ready_at_s - first.ready_at_s == pytest.approx(1.0)
    denied = take(lim)  # a job that comes later sees both reservations ahead of it
    assert isinstance(denied, Denied) and denied.wait_s == pytest.approx(3.05)


def test_a_reservation_is_redeemed_at_its_time_without_a_second_debit(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60, concurrency = 1")
    for _ in range(60):  # the minute's requests, one call at a time
        lim.settle(take(lim), actual=Costs(1), outcome="alive")
    reserved = reserve(lim)
    assert isinstance(reserved, Reserved)
    early = take(lim, reservation=reserved.reservation_id)
    assert isinstance(early, Denied) and early.why == "reserved" and early.wait_s == pytest.approx(1.05)
    lim.clock.advance(1.05)
    lease = take(lim, reservation=reserved.reservation_id)
    assert isinstance(lease, Lease)
    assert buckets(lim)["rpm"] == pytest.approx(0.05, abs=1e-6)  # taken once, at reserve time
    assert isinstance(take(lim), Denied)  # the lease holds the one concurrency slot
    lim.settle(lease, actual=Costs(1), outcome="alive")
    again = take(lim, reservation=reserved.reservation_id)  # a redelivered message
    assert isinstance(again, Denied) and again.why == "rpm"  # the reservation is spent: no free call


def test_a_stale_reservation_is_given_back_and_the_job_admitted_afresh(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60")
    assert all(isinstance(take(lim), Lease) for _ in range(60))
    reserved = reserve(lim)
    assert isinstance(reserved, Reserved)
    lim.clock.advance(10)  # the worker was busy: ten seconds late
    assert buckets(lim)["rpm"] == pytest.approx(10 - 1, abs=1e-6)
    lease = take(lim, reservation=reserved.reservation_id)
    assert isinstance(lease, Lease)
    assert buckets(lim)["rpm"] == pytest.approx(10 - 1, abs=1e-6)  # refunded, then debited now


def test_a_blocked_account_gives_its_reservation_back(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60")
    leases = [take(lim) for _ in range(60)]
    reserved = reserve(lim)
    assert isinstance(reserved, Reserved)
    lim.settle(leases[0], actual=Costs(1), outcome="alive", block_s=30, block_why="429 minute")
    lim.clock.advance(1.05)
    denied = take(lim, reservation=reserved.reservation_id)
    assert isinstance(denied, Denied) and denied.why == "blocked: 429 minute"
    assert buckets(lim)["rpm"] == pytest.approx(1.05, abs=1e-6)  # the reserved request came back


def test_a_reservation_its_job_will_not_use_is_released_and_the_next_job_takes_its_turn(
    redis_client: redis.Redis,
) -> None:
    lim = make(redis_client, "rpm = 60")
    assert all(isinstance(take(lim), Lease) for _ in range(60))
    first, second = reserve(lim), reserve(lim)
    assert isinstance(first, Reserved) and isinstance(second, Reserved)
    assert lim.release(P, first.reservation_id)  # its job was cancelled
    assert not lim.release(P, first.reservation_id)  # once
    assert redis_client.get(lim.keys.reservation("p", first.reservation_id)) is None
    third = reserve(lim)  # the budget of the first's turn is there again
    assert isinstance(third, Reserved) and third.wait_s == pytest.approx(second.wait_s)
    lease = take(lim, reservation=first.reservation_id)  # a late delivery of the cancelled job
    assert isinstance(lease, Denied)  # gets no free call


def test_nothing_is_reserved_past_the_horizon_or_a_daily_quota(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60")
    assert all(isinstance(take(lim), Lease) for _ in range(60))
    too_far = reserve(lim, within_s=0.5)
    assert isinstance(too_far, Denied) and too_far.wait_s == pytest.approx(1.05)
    assert buckets(lim)["rpm"] == pytest.approx(0.0)  # nothing was taken
    daily = make(redis_client, "rpd = 1")
    assert isinstance(daily.acquire(P, SMALL, lease_ttl_s=60), Lease)
    denied = daily.reserve(P, SMALL, within_s=60, lease_ttl_s=60)
    assert isinstance(denied, Denied) and denied.why == "rpd"  # only the reset helps: park it


def test_limiter_hashes_expire_but_never_before_what_they_hold(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 10")
    lease = take(lim)
    [bucket] = [k for k in redis_client.scan_iter("t:*") if k.endswith(b":b:*")]
    day_ms = 86_400_000
    assert 2 * day_ms <= redis_client.pttl(bucket) <= 4 * day_ms

    def expiry_commands() -> int:
        stats = redis_client.info("commandstats")
        return sum(int(stats.get(c, {}).get("calls", 0)) for c in ("cmdstat_pttl", "cmdstat_pexpire"))

    before = expiry_commands()
    lim.settle(take(lim), actual=Costs(1), outcome="alive")
    assert expiry_commands() - before <= 2  # the lease set's own; the buckets' TTL is still long
    lim.settle(lease, actual=Costs(1), outcome="alive", block_s=10 * 86400, block_why="x", block_account=True)
    assert redis_client.pttl(bucket) >= 10 * day_ms  # a long block outlives the usual TTL


def test_a_429_without_headers_halves_the_limit_which_recovers_slowly(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "rpm = 60")
    leases = [take(lim) for _ in range(3)]  # three calls in flight, all answered 429
    for lease in leases:
        lim.settle(lease, actual=Costs(1), outcome="alive", learn_lower=True)
    rpm = next(b for b in lim.snapshots([P])[P].accounts[0].buckets if b.field == "rpm")
    assert rpm.cap == 30 and rpm.avail == 0  # halved once (not per 429 of the same burst), now empty
    lim.clock.advance(150)  # a quarter of the recovery time: from 30 back up by 15
    rpm = next(b for b in lim.snapshots([P])[P].accounts[0].buckets if b.field == "rpm")
    assert rpm.cap == pytest.approx(45)
    lease = take(lim)
    lim.settle(lease, actual=Costs(1), outcome="alive", learn_lower=True)  # a second lesson
    assert next(
        b for b in lim.snapshots([P])[P].accounts[0].buckets if b.field == "rpm"
    ).cap == pytest.approx(22.5)
    lim.clock.advance(3600)
    assert buckets(lim)["rpm"] == 60  # fully recovered: the configured limit again


def test_input_counted_unlike_the_estimate_is_learned_and_reserved_for(redis_client: redis.Redis) -> None:
    lim = make(redis_client, "tpm = 100000, rpm = 1000")
    costs = Costs.estimate(100, 0)  # 100 input tokens by the 4-characters estimate
    for _ in range(8):  # the provider counted 500 for each (CJK text, a real tokenizer)
        lim.settle(take(lim, costs), actual=Costs(1, 500, 500, 0), outcome="alive", input_ratio=5.0)
    [account] = lim.snapshots([P])[P].accounts
    assert account.input_ratio == pytest.approx(5.0, rel=0.1)
    before = buckets(lim)["tpm"]
    take(lim, costs)
    assert before - buckets(lim)["tpm"] == pytest.approx(100 * account.input_ratio, rel=0.01)
    lim.settle(take(lim, costs), actual=Costs(1, 100, 100, 0), outcome="alive", input_ratio=1.0)
    assert lim.snapshots([P])[P].accounts[0].input_ratio < account.input_ratio  # it follows the text


def test_the_lease_set_outlives_its_newest_lease_with_one_expire_per_lease_time(
    redis_client: redis.Redis,
) -> None:
    lim = make(redis_client, "concurrency = 100")

    def expires() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_pexpire", {}).get("calls", 0))

    take(lim, lease_ttl_s=60)
    [leases] = [k for k in redis_client.scan_iter("t:*") if k.endswith(b":leases")]
    before = expires()
    for _ in range(20):
        take(lim, lease_ttl_s=60)
        lim.clock.advance(1)
    assert expires() == before  # no expiry pushed out per lease
    assert redis_client.pttl(leases) >= 60_000 + 20_000  # still beyond the newest lease
    lim.clock.advance(45)  # the newest lease would now outlive the set's TTL: pushed out once
    take(lim, lease_ttl_s=60)
    assert expires() == before + 1
    assert redis_client.pttl(leases) >= 60_000
