"""The simulator: per-key limits, each family's 429, faults, and its control endpoints —
checked through Spillway's own adapters over real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import CONFIGS
from workers.config import Limits, Settings, parse_settings
from workers.errors import (
    AuthError,
    Overloaded,
    ProviderConnectionError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    ServerError,
)
from workers.messages import build_request
from workers.providers.transport import complete
from workers.simulator import SimServer, sim_settings, start_in_thread

BASE = (CONFIGS / "e2e.toml").read_text()
SIM_EXTRA = """
[simulator.providers.openai]
limits = { rpm = 120, concurrency = 2 }
[simulator.providers.groq]
limits = { rpm = 120 }
reject_keys = ["bad-*"]
hang_s = 1.5
[simulator.providers.anthropic]
limits = { rpm = 120 }
[simulator.providers.gemini]
limits = { rpm = 120 }
"""
REQUEST = build_request("hello simulator", max_tokens=8)
CLIENT = httpx.Client()  # one for the module: making a client costs ~50 ms (TLS context)


@pytest.fixture
def sim() -> Iterator[tuple[SimServer, Settings]]:
    server = start_in_thread(sim_settings(parse_settings(BASE + SIM_EXTRA, "sim.toml"), port=0))
    settings = parse_settings(BASE + SIM_EXTRA, "sim.toml", simulator_url=server.url)
    yield server, settings
    server.shutdown()
    server.server_close()


def call(settings: Settings, provider: str, key: str = "sk-1", request=REQUEST, timeout: float | None = None):
    config = settings.providers[provider]
    if timeout is not None:
        from dataclasses import replace

        config = replace(config, timeout_s=timeout)
    return complete(CLIENT, config, next(iter(config.models)), request, key)


@pytest.mark.parametrize("provider", ["openai", "groq", "anthropic", "gemini"])
def test_429_gives_the_right_usable_again_time(sim, provider: str) -> None:
    """Burst until 429; the stated time is at most a second late, and the key works then."""
    _, settings = sim
    key = f"sk-burst-{provider}"
    with pytest.raises(RateLimited) as info:
        for _ in range(200):
            call(settings, provider, key, build_request("burst", max_tokens=1))
    wait = info.value.retry_at_s - time.time()
    assert 0 < wait <= 1.0 + 0.1  # rpm 120: one request back within 0.5 s, rounded up to whole seconds
    time.sleep(max(0.0, wait))
    assert call(settings, provider, key).output_tokens > 0


def test_limits_are_per_key(sim) -> None:
    server, settings = sim
    server.sim.settings.providers["groq"].limits = Limits(rpd=3)
    server.sim.reset()
    for _ in range(3):
        call(settings, "groq", "sk-a")
    with pytest.raises(RateLimited) as info:
        call(settings, "groq", "sk-a")
    assert info.value.per_day  # Groq's requests header is the daily one: remaining 0
    assert call(settings, "groq", "sk-b").output_tokens > 0  # another key, another account


def test_concurrency_limit(sim) -> None:
    server, settings = sim
    server.sim.settings.providers["openai"].latency = type(server.sim.settings.providers["openai"].latency)(
        300, 301
    )
    errors: list[Exception] = []

    def one() -> None:
        try:
            call(settings, "openai", "sk-conc")
        except RateLimited as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1
    assert server.sim.snapshot()["openai"]["peak_in_flight"] == 2


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("error_500", ServerError),
        ("error_503", Overloaded),
        ("overloaded", Overloaded),
        ("malformed", ServerError),
        ("reset", ProviderConnectionError),
        ("insufficient_quota", QuotaExhausted),
        ("rate_limit", RateLimited),
        ("timeout", ProviderTimeout),
    ],
)
def test_faults(sim, fault: str, error: type) -> None:
    server, settings = sim
    httpx.post(
        f"{server.url}/_sim/faults", json={"provider": "groq", "faults": {fault: 1.0}}
    ).raise_for_status()
    with pytest.raises(error):
        call(settings, "groq", timeout=0.5)
    assert server.sim.snapshot()["groq"][f"fault_{fault}"] == 1


def test_anthropic_overload_is_529(sim) -> None:
    server, settings = sim
    server.sim.settings.providers["anthropic"].faults = {"overloaded": 1.0}
    with pytest.raises(Overloaded) as info:
        call(settings, "anthropic")
    assert info.value.status == 529


def test_rejected_and_missing_keys(sim) -> None:
    _, settings = sim
    with pytest.raises(AuthError):
        call(settings, "groq", "bad-key-1")
    with pytest.raises(AuthError):
        call(settings, "gemini", "")


def test_deterministic_answers_with_consistent_token_counts(sim) -> None:
    _, settings = sim
    first, again = call(settings, "anthropic"), call(settings, "anthropic")
    assert first.text == again.text and first.output_tokens == len(first.text.split())
    assert first.input_tokens == REQUEST.estimated_input_tokens()
    short = call(settings, "anthropic", request=build_request("hello simulator", max_tokens=2))
    assert short.output_tokens == 2 and short.finish_reason == "length"


def test_stats_reset_and_bad_control_requests(sim) -> None:
    server, settings = sim
    call(settings, "gemini")
    assert httpx.get(f"{server.url}/_sim/stats").json()["gemini"]["ok"] == 1
    httpx.post(f"{server.url}/_sim/reset").raise_for_status()
    assert httpx.get(f"{server.url}/_sim/stats").json()["gemini"].get("ok", 0) == 0
    bad = httpx.post(f"{server.url}/_sim/faults", json={"provider": "groq", "faults": {"fire": 1}})
    assert bad.status_code == 400
    garbage = httpx.post(f"{server.url}/openai/v1/chat/completions", content=b"{nope")
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "invalid_request_error"


def test_a_provider_can_count_tokens_like_a_real_tokenizer() -> None:
    from workers.messages import estimate_tokens
    from workers.simulator.formats import count_tokens

    chinese, english = ("请用一句话解释令牌桶算法。" * 8,), ("Explain token buckets in one line. " * 3,)
    assert count_tokens(chinese, "estimate") == estimate_tokens(chinese)  # Spillway's own count
    assert count_tokens(chinese, "cjk") == pytest.approx(5 * estimate_tokens(chinese), rel=0.05)
    assert count_tokens(english, "cjk") == estimate_tokens(english)  # Latin text: four chars a token
