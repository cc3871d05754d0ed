"""The official SDKs are the judge: they must take the simulator for the real thing —
parse its completions, raise their own rate-limit errors on its 429s, and read the same
retry time Spillway reads."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import CONFIGS
from workers.config import load_settings, parse_settings
from workers.providers.signals import read_signal
from workers.simulator import SimServer, sim_settings, start_in_thread

#: Each SDK call's limit. The simulator answers in milliseconds; the SDKs' own defaults (600 s
#: for openai and anthropic, none at all for google-genai) outlast the suite's 300 s per test,
#: so a stalled call would end as a bare pytest timeout instead of a failure naming the SDK.
SDK_TIMEOUT_S = 30.0
#: The example-config test, on a busy machine: its worker must answer a ping within this, then
#: every `spillway submit --wait` must be done within the next. Together well inside 300 s.
WORKER_START_S = 120.0
SUBMITS_S = 120.0

LOW_LIMITS = (
    (CONFIGS / "e2e.toml").read_text()
    + """
[simulator.providers.openai]
limits = { rpm = 2 }
[simulator.providers.anthropic]
limits = { rpm = 2 }
[simulator.providers.gemini]
limits = { rpm = 2 }
[simulator.providers.groq]
limits = { rpm = 2 }
"""
)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    server = start_in_thread(sim_settings(parse_settings(LOW_LIMITS, "sdk.toml"), port=0))
    yield server
    server.shutdown()
    server.server_close()


def test_openai_sdk(sim: SimServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=f"{sim.url}/openai/v1", api_key="sk-sdk-test", max_retries=0, timeout=SDK_TIMEOUT_S
    )
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=12,
    )
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}], max_tokens=5
    )
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "3"}], max_tokens=5
        )
    assert info.value.code == "rate_limit_exceeded"
    headers = info.value.response.headers
    sdk_wait = client._parse_retry_after_header(headers)
    ours = read_signal("openai", headers, info.value.body, 0.0)
    assert sdk_wait is not None and ours.retry_after_s == pytest.approx(sdk_wait)
    assert 0 < sdk_wait <= 31  # rpm 2: one request back within 30 s


def test_openai_sdk_sees_insufficient_quota(sim: SimServer) -> None:
    openai = pytest.importorskip("openai")
    sim.sim.settings.providers["groq"].faults = {"insufficient_quota": 1.0}
    try:
        client = openai.OpenAI(
            base_url=f"{sim.url}/groq/openai/v1", api_key="sk-sdk", max_retries=0, timeout=SDK_TIMEOUT_S
        )
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="llama-3.3-70b-versatile", messages=[{"role": "user", "content": "x"}], max_tokens=5
            )
        assert info.value.code == "insufficient_quota"
    finally:
        sim.sim.settings.providers["groq"].faults = {}


def test_anthropic_sdk(sim: SimServer) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(
        base_url=f"{sim.url}/anthropic", api_key="sk-ant-sdk", max_retries=0, timeout=SDK_TIMEOUT_S
    )
    reply = client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=12,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert reply.content[0].text and reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.output_tokens <= 12
    client.messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "2"}]
    )
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "3"}]
        )
    headers = info.value.response.headers
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    sdk_wait = client._parse_retry_after_header(headers)
    ours = read_signal("anthropic", headers, info.value.body, time.time())
    assert sdk_wait == pytest.approx(ours.retry_after_s) and sdk_wait >= 1


def test_anthropic_sdk_overloaded_and_spend_cap(sim: SimServer) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(
        base_url=f"{sim.url}/anthropic", api_key="sk-ant-2", max_retries=0, timeout=SDK_TIMEOUT_S
    )
    provider = sim.sim.settings.providers["anthropic"]
    try:
        provider.faults = {"overloaded": 1.0}
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            client.messages.create(
                model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert overloaded.value.status_code == 529
        assert overloaded.value.body["error"]["type"] == "overloaded_error"
        provider.faults = {"insufficient_quota": 1.0}
        with pytest.raises(anthropic.RateLimitError) as spend:
            client.messages.create(
                model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert spend.value.body["error"]["details"]["error_code"] == "enforced_spend_limit_reached"
    finally:
        provider.faults = {}


def test_google_genai_sdk(sim: SimServer) -> None:
    genai = pytest.importorskip("google.genai")
    from google.genai import errors, types

    client = genai.Client(
        api_key="AIza-sdk-test",
        http_options=types.HttpOptions(
            base_url=f"{sim.url}/gemini",
            timeout=int(SDK_TIMEOUT_S * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),  # the 429 must reach the test, not a retry
        ),
    )
    reply = client.models.generate_content(
        model="gemini-2.0-flash",
        contents="Hello",
        config=types.GenerateContentConfig(max_output_tokens=12, system_instruction="Be brief."),
    )
    assert reply.text and reply.usage_metadata.candidates_token_count <= 12
    client.models.generate_content(model="gemini-2.0-flash", contents="2")
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model="gemini-2.0-flash", contents="3")
    assert info.value.code == 429 and info.value.status == "RESOURCE_EXHAUSTED"
    details = {d["@type"].rsplit("/", 1)[1]: d for d in info.value.details["error"]["details"]}
    delay = details["google.rpc.RetryInfo"]["retryDelay"]
    ours = read_signal("gemini", {}, info.value.details, 0.0)
    assert ours.retry_after_s == float(delay.rstrip("s")) and ours.quota_ids
    assert "PerMinute" in details["google.rpc.QuotaFailure"]["violations"][0]["quotaId"]


def test_example_config_against_the_simulator_one_job_per_wire_format(redis_server, tmp_path) -> None:
    """`spillway submit` with the shipped example config pointed at the simulator."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import redis

    from producer.ops.stack import LocalStack

    example = Path(__file__).parent.parent / "spillway.toml"
    url = redis_server.url(0)  # a database no other test of the session uses
    redis.Redis.from_url(url).flushdb()
    with LocalStack(example, redis_url=url, workdir=str(tmp_path)) as stack:
        stack.start_worker(concurrency=8, loglevel="WARNING")
        # Jobs are timed from a worker that answers, not from the start of a Python process
        # that may take long to import everything on a busy machine.
        stack.wait_for_workers(timeout_s=WORKER_START_S)
        env = {**os.environ, **stack.env}
        jobs = {
            provider: subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "producer.cli",
                    "submit",
                    "--task",
                    task,
                    "--tier",
                    tier,
                    "--prompt",
                    "Say hi",
                    "--provider",
                    provider,
                    "--max-tokens",
                    "16",
                    "--wait",
                    "--json",
                    "--timeout",
                    str(int(SUBMITS_S - 20)),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for task, tier, provider in (
                ("code", "pro", "openai"),
                ("code", "admin", "anthropic"),
                ("reasoning", "free", "gemini"),
                ("code", "free", "groq"),
            )
        }  # all four at once: the slow part on a busy machine is starting Python, four times
        deadline = time.monotonic() + SUBMITS_S
        formats, outputs = {}, {}
        try:
            for provider, proc in jobs.items():
                outputs[provider] = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for proc in jobs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        for provider, proc in jobs.items():
            out, err = outputs[provider]
            assert proc.returncode == 0, f"{provider}: exit {proc.returncode}: {err}"
            result = json.loads(out)
            formats[provider] = (result["status"], result["provider"])
        settings = load_settings(example)
    assert formats == {p: ("succeeded", p) for p in jobs}
    assert {settings.providers[p].api for p in formats} == {"openai", "anthropic", "gemini"}
