"""Bad input, fuzzed: through the Python API, the CLI, the batch reader and the config. Each
gets a clear error naming what was wrong (a SpillwayError, never another exception), nothing
is half-enqueued, and no traceback reaches the user."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.batchfile import BadLine, BatchItem, check_item
from producer.cli import main
from tests.conftest import CONFIGS
from tests.faultkit import LEDGER, Row, size
from workers.config import settings_from_data
from workers.errors import ConfigError, SpillwayError
from workers.messages import MAX_PROMPT_CHARS

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EXAMPLES = size(60, 600)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
weird_text = st.one_of(
    st.just(""),
    st.just("   \n\t"),
    st.just("\ud800 lone surrogate"),
    st.just("x" * (MAX_PROMPT_CHARS + 1)),
    st.text(max_size=200),
    st.just("nested " + "[" * 2000),
)
nested = st.recursive(
    st.integers(),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=2)
    ),
    max_leaves=20,
)


class Tally:
    def __init__(self, scenario: str) -> None:
        self.row = LEDGER.add(Row(scenario))

    def tried(self, rejected: bool) -> None:
        self.row.bad_inputs += int(rejected)
        self.row.rejected_cleanly += int(rejected)
        self.row.submitted += int(not rejected)


@pytest.fixture(scope="module")
def quiet_stack(redis_server, tmp_path_factory):
    """The e2e config with no worker: valid jobs just wait in their queues."""
    import redis

    from producer.stack import LocalStack

    redis.Redis.from_url(redis_server.url(3)).flushdb()
    stack = LocalStack(
        CONFIGS / "e2e.toml",
        redis_url=redis_server.url(3),
        workdir=str(tmp_path_factory.mktemp("fuzz")),
        extra_env={"SPILLWAY_CALLBACK_SECRET": "whsec-fuzz"},
    )
    stack.start(simulator=False)
    with stack.applied():
        yield stack
    stack.close()


@pytest.fixture(scope="module")
def api_tally() -> Tally:
    return Tally("bad input: Python API (hypothesis)")


@FUZZ
@given(
    prompt=st.one_of(junk, weird_text),
    task=st.one_of(junk, st.sampled_from(["chat", "gemini", "poetry"])),
    tier=st.one_of(junk, st.sampled_from(["free", "pro", "gold"])),
    max_tokens=st.one_of(st.none(), junk),
    temperature=st.one_of(st.none(), junk),
    messages=st.one_of(st.none(), nested, junk),
    extra=st.dictionaries(
        st.sampled_from(
            [
                "stop",
                "json_mode",
                "preferred_provider",
                "idempotency_key",
                "callback_url",
                "deadline_s",
                "system",
            ]
        ),
        junk,
        max_size=2,
    ),
)
def test_python_api(
    quiet_stack, api_tally, prompt, task, tier, max_tokens, temperature, messages, extra
) -> None:
    from producer import submit
    from workers.runtime import runtime

    store = runtime().store
    before = sum(store.count_by_status().values())
    if messages is not None:
        prompt = None
    try:
        handle = submit(
            prompt,
            messages=messages,
            task=task,
            tier=tier,
            max_tokens=max_tokens,
            temperature=temperature,
            **extra,
        )
    except SpillwayError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        assert sum(store.count_by_status().values()) == before  # nothing half-stored
        api_tally.tried(rejected=True)
        return
    assert store.job(handle.id) is not None
    api_tally.tried(rejected=False)


@pytest.fixture(scope="module")
def cli_tally() -> Tally:
    return Tally("bad input: the CLI (hypothesis)")


@FUZZ
@given(
    task=st.text(max_size=12),
    tier=st.text(max_size=12),
    prompt=weird_text,
    max_tokens=st.one_of(st.just(None), st.text(max_size=6), st.integers(-5, 10**7).map(str)),
)
def test_cli(quiet_stack, cli_tally, task, tier, prompt, max_tokens) -> None:
    args = ["submit", "--task", task, "--tier", tier, "--prompt", prompt]
    if max_tokens is not None:
        args += ["--max-tokens", max_tokens]
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in output
    if result.exit_code != 0:
        assert result.exit_code in (1, 2) and ("error" in output.lower() or "usage" in output.lower())
    cli_tally.tried(rejected=result.exit_code != 0)


@pytest.fixture(scope="module")
def batch_tally() -> Tally:
    return Tally("bad input: batch lines (hypothesis)")


@FUZZ
@given(
    value=st.one_of(
        junk,
        nested,
        st.fixed_dictionaries({"custom_id": junk, "prompt": st.one_of(junk, weird_text)}),
        st.fixed_dictionaries(
            {
                "custom_id": st.text(min_size=1, max_size=5),
                "method": junk,
                "url": junk,
                "body": st.one_of(junk, nested),
            }
        ),
    )
)
def test_batch_lines(quiet_stack, batch_tally, value) -> None:
    from workers.runtime import runtime

    item = check_item(runtime(), 7, value, "chat", "free")
    assert isinstance(item, BatchItem | BadLine)
    if isinstance(item, BadLine):
        assert str(item).startswith("line 7: ") and item.error
    batch_tally.tried(rejected=isinstance(item, BadLine))


def test_batch_file_with_raw_garbage(quiet_stack, tmp_path) -> None:
    from producer import batch as batch_module
    from producer.batch import BatchInputError

    lines = [
        b"\xff\xfe\x00",
        b"{" * 10000,
        b"null",
        b'{"custom_id": "a", "prompt": "ok"}',
        b'{"custom_id": "a", "prompt": "dup"}',
        json.dumps({"custom_id": "b", "prompt": "x" * 10}).encode(),
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(BatchInputError) as info:
        batch_module.submit_file(tmp_path / "in.jsonl", task="chat", tier="free")
    assert [b.line for b in info.value.bad] == [1, 2, 3, 5]
    LEDGER.add(Row("bad input: raw batch file", bad_inputs=4, rejected_cleanly=len(info.value.bad)))


BASE_CONFIG = tomllib.loads((Path(__file__).parent.parent / "spillway.toml").read_text())


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


PATHS = list(_paths(BASE_CONFIG))


@pytest.fixture(scope="module")
def config_tally() -> Tally:
    return Tally("bad input: config files (hypothesis)")


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(PATHS), st.one_of(junk, st.just("__delete__"), st.just("__add__"))),
        min_size=1,
        max_size=4,
    )
)
def test_config_with_every_kind_of_mistake(config_tally, edits) -> None:
    data = copy.deepcopy(BASE_CONFIG)
    for path, value in edits:
        parent = data
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if value == "__delete__":
            parent.pop(path[-1], None)
        elif value == "__add__":
            parent["surprise_key"] = 1
        else:
            parent[path[-1]] = value
    try:
        settings_from_data(data, "spillway.toml")
    except ConfigError as exc:
        assert str(exc).startswith("spillway.toml: ")
        config_tally.tried(rejected=True)
        return
    config_tally.tried(rejected=False)


@FUZZ
@given(text=st.text(max_size=300))
def test_config_text_that_is_not_toml(text) -> None:
    from workers.config import parse_settings

    try:
        parse_settings(text, "x.toml")
    except ConfigError as exc:
        assert str(exc).startswith("x.toml: ")
