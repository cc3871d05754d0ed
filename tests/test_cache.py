"""The response cache: keys per request, route and tier, and answers kept in Redis with a TTL."""

from __future__ import annotations

import pytest

from workers.cache import CachedAnswer, cache_key, lookup, lookup_many, store
from workers.config import parse_settings
from workers.keyspace import Keyspace
from workers.messages import build_request

CONFIG = """
[providers.a]
api = "openai"
base_url = "https://a.example/v1"
[providers.a.models.am]
input_per_mtok = 1.0
output_per_mtok = 2.0

[routes.chat]
cache_ttl_s = 60
free = ["a:am"]
pro = ["a:am"]

[routes.shared]
cache_ttl_s = 60
cache_across_tiers = true
free = ["a:am"]
pro = ["a:am"]
"""
KEYS = Keyspace("p")
ANSWER = CachedAnswer("a", "am", "hello — there", "stop")


@pytest.fixture(scope="module")
def settings():
    return parse_settings(CONFIG, "x.toml")


def key(settings, task: str, tier: str, prompt: str = "hi") -> str:
    return cache_key(KEYS, settings.chain(task, tier), task, tier, build_request(prompt, max_tokens=16))


def test_config_declares_the_cache(settings) -> None:
    assert settings.chain("chat", "free").cache_ttl_s == 60
    assert not settings.chain("chat", "free").cache_across_tiers
    assert settings.chain("shared", "pro").cache_across_tiers


def test_key_is_stable_and_prefixed(settings) -> None:
    first = key(settings, "chat", "free")
    assert first == key(settings, "chat", "free")
    assert first.startswith("p:cache:") and len(first) > len("p:cache:")


def test_key_depends_on_request_task_and_tier(settings) -> None:
    base = key(settings, "chat", "free")
    assert key(settings, "chat", "free", "hello") != base
    assert key(settings, "chat", "pro") != base
    assert key(settings, "shared", "free") != base
    other = cache_key(
        KEYS, settings.chain("chat", "free"), "chat", "free", build_request("hi", max_tokens=17)
    )
    assert other != base


def test_cache_across_tiers_shares_the_key(settings) -> None:
    assert key(settings, "shared", "free") == key(settings, "shared", "pro")
    assert key(settings, "shared", "free", "hello") != key(settings, "shared", "pro")


def test_store_and_lookup_round_trip_with_ttl(settings, redis_client) -> None:
    hit, miss = key(settings, "chat", "free"), key(settings, "chat", "pro")
    assert lookup(redis_client, hit) is None
    store(redis_client, hit, ANSWER, 60)
    assert lookup(redis_client, hit) == ANSWER
    assert lookup(redis_client, miss) is None
    assert lookup_many(redis_client, [miss, hit, miss]) == [None, ANSWER, None]
    assert lookup_many(redis_client, []) == []
    assert 0 < redis_client.pttl(hit) <= 60_000
    assert redis_client.pttl(miss) == -2


def test_fractional_ttl_is_kept_in_ms(redis_client) -> None:
    store(redis_client, "p:cache:short", ANSWER, 0.05)
    assert 0 < redis_client.pttl("p:cache:short") <= 50


def test_cached_answer_spends_nothing() -> None:
    assert ANSWER.result_columns() == {
        "provider": "a",
        "model": "am",
        "text": "hello — there",
        "finish_reason": "stop",
        "cached": True,
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": 0.0,
    }
