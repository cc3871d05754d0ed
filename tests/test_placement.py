"""Placement on a producer: one read of the limiter per route per PLACEMENT_VIEW_S, and each
placement in between sees the jobs placed before it (against real Redis)."""

from __future__ import annotations

import time

import pytest
import redis

from workers import constants
from workers.config import Candidate, parse_settings
from workers.keys import KeyRing
from workers.keyspace import Keyspace
from workers.limiter import Costs, Limiter
from workers.router import Router

CONFIG = """
[providers.big]
api = "openai"
base_url = "http://sim/big/v1"
key_env = "BIG_KEY"
limits = { rpm = 30 }
[providers.big.models.m]
[providers.small]
api = "openai"
base_url = "http://sim/small/v1"
key_env = "SMALL_KEY"
limits = { rpm = 10 }
[providers.small.models.m]
[routes."*"]
strategy = "fastest"
free = ["big:m", "small:m"]
"""
BIG, SMALL = Candidate("big", "m"), Candidate("small", "m")


@pytest.fixture
def router(redis_client: redis.Redis) -> Router:
    settings = parse_settings(CONFIG, "t.toml")
    keyring = KeyRing(settings, {"BIG_KEY": "k1", "SMALL_KEY": "k2"})
    return Router(settings, keyring, Limiter(redis_client, settings, keyring, keys=Keyspace("pl")))


def reads(client: redis.Redis) -> int:
    """Limiter scripts run (a placement read is one inspect per candidate, pipelined)."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_burst_is_placed_on_one_read_and_spread_by_capacity(
    router: Router, redis_client: redis.Redis
) -> None:
    router.limiter.snapshots([BIG, SMALL])  # the script is loaded (not through the view)
    before = reads(redis_client)
    started = time.monotonic()
    placed = [router.place("chat", "free", Costs(1)).candidate for _ in range(40)]
    if time.monotonic() - started < constants.PLACEMENT_VIEW_S:  # a slow machine may read twice
        assert reads(redis_client) - before == 2  # one inspect per candidate
    # each placement saw the ones before it: big's 30 free requests and small's 10, drawn in
    # step (3 to 1, their refill rates) so that neither bucket sits full while jobs arrive
    assert (placed.count(BIG), placed.count(SMALL)) == (30, 10)
    for n in range(4, 41, 4):
        assert placed[:n].count(SMALL) == n // 4
    queued = redis_client.hgetall(router.limiter.keys.pending("big"))
    assert float(queued[b"m|requests"]) == placed.count(BIG)  # every placement is counted in Redis


def test_an_older_view_is_read_again(router: Router, redis_client: redis.Redis) -> None:
    router.place("chat", "free", Costs(1))
    time.sleep(constants.PLACEMENT_VIEW_S * 1.5)
    before = reads(redis_client)
    router.place("chat", "free", Costs(1))
    assert reads(redis_client) - before == 2
