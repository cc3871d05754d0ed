"""Config validation: a bad config names the file, the key path and what was expected."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from workers.config import load_settings, parse_settings
from workers.errors import ConfigError, InputError
from workers.keys import KeyRing, find_keys

BASE = """
[providers.groq]
api = "openai"
base_url = "https://api.groq.com/openai/v1"
key_env = "GROQ_API_KEY"
limits = { rpm = 30, tpm = 6000 }
[providers.groq.models."llama-3.3-70b-versatile"]
input_per_mtok = 0.59
[routes.code]
free = ["groq:llama-3.3-70b-versatile"]
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "spillway.toml")
    return str(info.value)


def test_valid_config_loads_typed_objects() -> None:
    s = parse_settings(BASE, "spillway.toml")
    groq = s.providers["groq"]
    assert groq.limits.rpm == 30 and groq.limits.tpm == 6000 and groq.limits.rpd is None
    assert groq.signals == "openai" and groq.queue == "llm.groq"
    assert s.chain("code", "free").candidates[0].model == "llama-3.3-70b-versatile"
    assert set(s.tiers) == {"free", "pro", "admin"}  # defaults when [tiers] is absent


def test_wrong_type_names_file_key_path_and_value() -> None:
    bad = BASE.replace("rpm = 30", 'rpm = "fast"')
    assert error_of(bad) == (
        'spillway.toml: providers.groq.limits.rpm: expected a positive integer, got "fast"'
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("rpm = 30", "rpm = 0"), "providers.groq.limits.rpm: expected a positive integer, got 0"),
        (("rpm = 30", "rpx = 30"), "providers.groq.limits.rpx: unknown key"),
        (
            ('api = "openai"', 'api = "soap"'),
            'providers.groq.api: unknown wire format (known: anthropic, gemini, openai), got "soap"',
        ),
        (
            ('key_env = "GROQ_API_KEY"', 'key_env = "GROQ_API_KEY"\ncolour = "red"'),
            "providers.groq.colour: unknown key",
        ),
        (
            ('base_url = "https://api.groq.com/openai/v1"', 'base_url = "ftp://x"'),
            'providers.groq.base_url: expected an http:// or https:// URL, got "ftp://x"',
        ),
        (
            ('free = ["groq:llama-3.3-70b-versatile"]', 'free = ["grok:llama-3.3-70b-versatile"]'),
            'routes.code.free: unknown provider "grok" (known: groq)',
        ),
        (
            ('free = ["groq:llama-3.3-70b-versatile"]', 'free = ["groq:llama-4"]'),
            'routes.code.free: unknown model "llama-4" of provider groq',
        ),
        (
            ('free = ["groq:llama-3.3-70b-versatile"]', 'free = ["groq"]'),
            'routes.code.free: expected "provider:model" entries, got "groq"',
        ),
        (
            ('free = ["groq:llama-3.3-70b-versatile"]', 'vip = ["groq:llama-3.3-70b-versatile"]'),
            'routes.code.vip: unknown tier "vip" (known: free, pro, admin)',
        ),
        (
            ("[routes.code]", '[routes.code]\nstrategy = "random"'),
            'routes.code.strategy: unknown strategy (known: ordered, round_robin, fastest), got "random"',
        ),
        (
            ("input_per_mtok = 0.59", "input_per_mtok = -1"),
            'providers.groq.models."llama-3.3-70b-versatile".input_per_mtok: expected a number >= 0, got -1',
        ),
        (
            ('key_env = "GROQ_API_KEY"', 'key_env = "GROQ_API_KEY"\ndaily_reset = "midnight"'),
            'providers.groq.daily_reset: expected "HH:MM <time zone>"',
        ),
        (
            ('key_env = "GROQ_API_KEY"', 'key_env = "GROQ_API_KEY"\nsignals = "smoke"'),
            "providers.groq.signals: unknown rate-limit header style",
        ),
    ],
)
def test_every_mistake_is_named(change: tuple[str, str], expected: str) -> None:
    message = error_of(BASE.replace(*change))
    assert message.startswith("spillway.toml: ")
    assert expected in message


def test_unknown_top_level_table_and_bad_toml() -> None:
    assert "spillway.toml: colours: unknown key" in error_of(BASE + "\n[colours]\nred = 1\n")
    assert "spillway.toml: not valid TOML" in error_of("[providers\n")
    assert "providers: is required" in error_of('[routes.x]\nfree = ["a:b"]\n')


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.toml: config file not found"):
        load_settings(tmp_path / "nowhere.toml")


def test_unknown_task_type_and_tier_are_input_errors() -> None:
    s = parse_settings(BASE, "spillway.toml")
    with pytest.raises(InputError, match="unknown task type 'poetry'"):
        s.chain("poetry", "free")
    with pytest.raises(InputError, match="unknown tier 'vip'"):
        s.chain("code", "vip")
    with pytest.raises(InputError, match="route 'code' has no chain for tier 'pro'"):
        s.chain("code", "pro")


def test_star_route_serves_unknown_task_types() -> None:
    s = parse_settings(BASE + '[routes."*"]\nfree = ["groq:llama-3.3-70b-versatile"]\n', "x.toml")
    assert s.chain("poetry", "free").candidates[0].provider == "groq"


def test_keys_are_found_with_numbered_suffixes() -> None:
    s = parse_settings(BASE, "spillway.toml")
    env = {
        "GROQ_API_KEY": "gsk_first0000",
        "GROQ_API_KEY_2": "gsk_third0000",
        "GROQ_API_KEY_1": "gsk_second000",
        "GROQ_API_KEYX": "gsk_not_a_key",
        "GROQ_API_KEY_3": "  ",
    }
    keys = find_keys(s.providers["groq"], env)
    assert [k.env_name for k in keys] == ["GROQ_API_KEY", "GROQ_API_KEY_1", "GROQ_API_KEY_2"]
    assert len({k.key_id for k in keys}) == 3
    assert all(k.secret not in k.key_id for k in keys)
    assert [k.account for k in keys] == [k.key_id for k in keys]  # each key its own account


def test_shared_quota_maps_all_keys_to_one_account() -> None:
    s = parse_settings(
        BASE.replace('key_env = "GROQ_API_KEY"', 'key_env = "GROQ_API_KEY"\nshared_quota = true'), "x"
    )
    keys = find_keys(s.providers["groq"], {"GROQ_API_KEY": "a", "GROQ_API_KEY_1": "b"})
    assert {k.account for k in keys} == {"shared"}


def test_provider_without_key_is_skipped_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    s = parse_settings(BASE, "spillway.toml")
    with caplog.at_level(logging.INFO, logger="spillway.keys"):
        ring = KeyRing(s, {})
    assert not ring.usable("groq")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["provider groq skipped: no key in $GROQ_API_KEY (nor $GROQ_API_KEY_1, _2, …)"]


def test_example_config_is_valid_and_covers_the_providers() -> None:
    s = load_settings(Path(__file__).parent.parent / "spillway.toml")
    assert {
        "openai",
        "anthropic",
        "gemini",
        "groq",
        "mistral",
        "openrouter",
        "together",
        "xai",
        "deepseek",
        "ollama",
    } <= set(s.providers)
    for task in ("code", "reasoning", "analysis", "chat"):
        for tier in ("free", "pro", "admin"):
            assert s.chain(task, tier).candidates
    assert s.providers["ollama"].key_env is None
    assert s.providers["groq"].signals == "groq"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("anchor", "key"),
    [
        ('key_env = "GROQ_API_KEY"', "providers.groq.timeout_s"),
        ("input_per_mtok = 0.59", 'providers.groq.models."llama-3.3-70b-versatile".output_per_mtok'),
    ],
)
def test_a_float_that_is_not_a_number_is_refused(anchor: str, key: str, value: str) -> None:
    name = key.rsplit(".", 1)[1]
    message = error_of(BASE.replace(anchor, f"{anchor}\n{name} = {value}"))
    shown = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[value]
    assert f"{key}: expected a number" in message and message.endswith(f"got {shown}")
