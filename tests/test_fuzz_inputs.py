"""Bad input, fuzzed: through the Python API, the CLI, the batch reader and the config. Each
gets a clear error naming what was wrong (a SpillwayError, never another exception), nothing
is half-enqueued, and no traceback reaches the user.

Every input is counted as observed (`tests.faultkit.Tally`): a bad input is one the surface
refused, or one this file knows is wrong; it counts as "rejected cleanly" only when the
refusal seen was clean (the right error type or exit code, a message naming the field,
nothing stored). Each fuzz test runs all its examples, then fails listing every input that
was not handled cleanly; the fault table shows the two counts side by side."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from producer.batchfile import MAX_CUSTOM_ID, OPENAI_URL, BadLine, BatchItem, check_item
from producer.cli import main
from producer.client import default_client
from producer.jobs import MAX_DEADLINE_S, MAX_IDEMPOTENCY_KEY, MAX_NAME_CHARS, MAX_TOKENS
from tests.conftest import CONFIGS
from tests.faultkit import Tally, size
from workers.config import Settings, settings_from_data
from workers.errors import ConfigError, InputError
from workers.messages import MAX_PROMPT_CHARS
from workers.runtime import Runtime
from workers.store import Batch, Job

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
#: What the outside fault harness sent: past a column's length, NUL (PostgreSQL text cannot
#: hold it), lone surrogates, numbers past any sane bound, a bool for a number, a list for a name.
harness_values = st.sampled_from(
    ["k" * 257, "t" * 65, "a\x00b", "\ud800", 10**30, 1e300, 1e50, math.nan, math.inf, True, []]
)
nested = st.recursive(
    st.integers(),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=2)
    ),
    max_leaves=20,
)

#: What an error may name to say which field was wrong, per surface.
API_FIELDS = (
    "prompt",
    "messages",
    "task",
    "tier",
    "system",
    "max_tokens",
    "temperature",
    "stop",
    "json_mode",
    "preferred_provider",
    "idempotency_key",
    "callback_url",
    "deadline_s",
)
CLI_FIELDS = ("--task", "--tier", "--prompt", "--max-tokens", "task", "tier", "prompt", "max_tokens")
BATCH_FIELDS = (*API_FIELDS, "custom_id", "method", "url", "body", "unknown field", "JSON object")


def rt() -> Runtime:
    """The runtime of the client the tests use (the quiet stack's, inside `applied()`)."""
    return default_client().runtime


def stored_rows() -> int:
    """Jobs and batches in the store: what a refused input must not add to."""
    with rt().store.session(write=False) as s:
        return s.scalar(select(func.count()).select_from(Job)) + s.scalar(
            select(func.count()).select_from(Batch)
        )


def names_a_field(message: str, fields: Iterable[str]) -> bool:
    return any(f in message for f in fields)


def usable_text(value: object) -> bool:
    """A prompt any surface must take: a non-blank string of valid UTF-8, not too long."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROMPT_CHARS:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def route_bad_because(config: Settings, task: object, tier: object) -> str | None:
    """Why a task/tier pair certainly has no route, or None."""
    if not isinstance(task, str) or not isinstance(tier, str):
        return "task and tier must be strings"
    if tier not in config.tiers:
        return f"there is no tier {tier!r}"
    routes = config.routes.get(task) or config.routes.get("*")
    if routes is None:
        return f"there is no route for task {task!r}"
    if tier not in routes:
        return f"the route of {task!r} has no {tier!r} chain"
    return None


def not_positive_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < 1


def not_storable(value: object, max_chars: int) -> bool:
    """Not a non-blank string every store backend keeps as given (length, NUL, UTF-8)."""
    return not usable_text(value) or len(value) > max_chars or "\x00" in value


# -- the Python API ---------------------------------------------------------------------------


def api_bad_because(config: Settings, fields: Mapping[str, Any]) -> str | None:
    """Why a submit() call is certainly wrong (a partial oracle: None is "maybe fine")."""
    route = route_bad_because(config, fields.get("task"), fields.get("tier"))
    if route:
        return route
    if not_storable(fields["task"], MAX_NAME_CHARS):
        return f"the task name is longer than its column ({MAX_NAME_CHARS})"
    messages, prompt = fields.get("messages"), fields.get("prompt")
    if messages is None and not usable_text(prompt):
        return "prompt is not a usable string"
    if messages is not None and not (isinstance(messages, list) and messages):
        return "messages is not a non-empty list"
    if fields.get("max_tokens") is not None and not_positive_int(fields["max_tokens"]):
        return "max_tokens is not a positive integer"
    if fields.get("max_tokens") is not None and fields["max_tokens"] > MAX_TOKENS:
        return f"max_tokens is more than {MAX_TOKENS:,}"
    t = fields.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 2):
        return "temperature is not a number within 0..2"
    if "json_mode" in fields and not isinstance(fields["json_mode"], bool):
        return "json_mode is not a boolean"
    url = fields.get("callback_url")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        return "callback_url is not an http(s) URL"
    key = fields.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and key.strip()):
        return "idempotency_key is not a non-empty string"
    if key is not None and not_storable(key, MAX_IDEMPOTENCY_KEY):
        return "idempotency_key is too long, holds NUL or is not valid UTF-8"
    if isinstance(url, str) and "\x00" in url:
        return "callback_url holds NUL"
    deadline = fields.get("deadline_s")
    if deadline is not None and (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not (math.isfinite(deadline) and 0 < deadline <= MAX_DEADLINE_S)
    ):
        return "deadline_s is not a number of seconds within (0, one year]"
    preferred = fields.get("preferred_provider")
    if preferred is not None and not isinstance(preferred, str):
        return "preferred_provider is not a string"
    return None


def api_outcome(error: BaseException | None, stored: int, job_known: bool) -> tuple[bool, list[str]]:
    """(refused, problems) of one submit(): `error` it raised, jobs `stored` by it, and whether
    the store knows the job id it returned."""
    if error is None:
        problems = (
            []
            if job_known and stored <= 1
            else [f"the store has {stored} new job(s), job known: {job_known}"]
        )
        return False, problems
    problems = []
    if not isinstance(error, InputError):
        problems.append(f"raised {type(error).__name__}, not an InputError")
    message = str(error)
    if "Traceback" in message:
        problems.append("a traceback in the message")
    elif not names_a_field(message, API_FIELDS):
        problems.append(f"the message names no field: {message[:200]!r}")
    if stored:
        problems.append(f"{stored} job(s) stored anyway")
    return True, problems


def observe_api(tally: Tally, fields: dict[str, Any], claim_bad: str | None = None) -> bool:
    """Submit through the Python API and count what happened in `tally`. `claim_bad` overrides
    the oracle (the self-check's way to call a good input bad)."""
    from producer import submit

    store = rt().store
    kwargs = dict(fields)
    prompt = kwargs.pop("prompt", None)
    before = sum(store.count_by_status().values())
    error: Exception | None = None
    job_known = False
    try:
        handle = submit(prompt, **kwargs)
    except Exception as exc:  # whatever it is: classified below, never lost
        error = exc
    else:
        job_known = store.job(handle.id) is not None
    stored = sum(store.count_by_status().values()) - before
    refused, problems = api_outcome(error, stored, job_known)
    bad_because = claim_bad or api_bad_because(rt().settings, fields)
    return tally.record(fields, rejected=refused, problems=problems, bad_because=bad_because)


@pytest.fixture(scope="module")
def quiet_stack(redis_server, tmp_path_factory):
    """The e2e config with no worker: valid jobs just wait in their queues."""
    import redis

    from producer.ops.stack import LocalStack

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
        st.one_of(junk, harness_values),
        max_size=2,
    ),
)
def fuzz_python_api(tally, prompt, task, tier, max_tokens, temperature, messages, extra) -> None:
    fields = {
        "prompt": None if messages is not None else prompt,
        "messages": messages,
        "task": task,
        "tier": tier,
        "max_tokens": max_tokens,
        "temperature": temperature,
        **extra,
    }
    observe_api(tally, fields)


def test_python_api(quiet_stack) -> None:
    tally = Tally.on("bad input: Python API (hypothesis)")
    fuzz_python_api(tally)
    tally.check()


GOOD_JOB = {"prompt": "a good prompt", "task": "chat", "tier": "free"}
#: What the outside fault harness found taken, refused only by PostgreSQL, or raising another
#: exception (tests/test_bad_inputs.py runs them on both backends).
HARNESS_API_INPUTS = [
    {"idempotency_key": "k" * (MAX_IDEMPOTENCY_KEY + 1)},
    {"idempotency_key": "a\x00b"},
    {"idempotency_key": "a\ud800"},
    {"max_tokens": 10**30},
    {"max_tokens": MAX_TOKENS + 1},
    {"deadline_s": True},
    {"deadline_s": 1e50},
    {"deadline_s": 1e300},
    {"deadline_s": math.nan},
    {"deadline_s": math.inf},
    {"preferred_provider": []},
    {"preferred_provider": {"groq": 1}},
    {"callback_url": "https://example.com/\x00"},
    {"stop": ["\ud800"]},
    {"task": "t" * (MAX_NAME_CHARS + 1)},
]


def test_python_api_inputs_the_fault_harness_found(quiet_stack) -> None:
    tally = Tally.on("bad input: Python API (fault harness)")
    for fields in HARNESS_API_INPUTS:
        observe_api(tally, {**GOOD_JOB, **fields}, claim_bad="the fault harness found it")
    tally.check()
    assert tally.row.rejected_cleanly == len(HARNESS_API_INPUTS)


# -- the CLI ----------------------------------------------------------------------------------


def cli_bad_because(
    config: Settings, task: str, tier: str, prompt: str, max_tokens: str | None
) -> str | None:
    route = route_bad_because(config, task, tier)
    if route:
        return route
    if not usable_text(prompt):
        return "--prompt is not a usable string"
    if max_tokens is not None:
        try:
            if int(max_tokens) < 1:
                return "--max-tokens is not positive"
            if int(max_tokens) > MAX_TOKENS:
                return f"--max-tokens is more than {MAX_TOKENS:,}"
        except ValueError:
            return "--max-tokens is not an integer"
    return None


def cli_outcome(
    exit_code: int,
    exception: BaseException | None,
    output: str,
    stored: int,
    job_known: bool,
    fields: Iterable[str] = CLI_FIELDS,
) -> tuple[bool, list[str]]:
    """(refused, problems) of one `spillway submit` (or another command naming `fields`)."""
    problems = []
    if exception is not None and not isinstance(exception, SystemExit):
        problems.append(f"raised {type(exception).__name__}: {exception}")
    if "Traceback" in output:
        problems.append("a traceback in the output")
    if exit_code == 0 and exception is None:
        if not job_known or stored != 1:
            problems.append(f"the store has {stored} new job(s), job known: {job_known}")
        return False, problems
    if exit_code != 2:
        problems.append(f"exit code {exit_code}, not 2 (a usage or input error)")
    lowered = output.lower()
    if "error" not in lowered:
        problems.append(f"no error in the output: {output[:200]!r}")
    elif not names_a_field(lowered, fields):
        problems.append(f"the output names no option: {output[:200]!r}")
    if "internal error" in lowered:
        problems.append("an internal error")
    if stored:
        problems.append(f"{stored} job(s) stored anyway")
    return True, problems


def observe_cli(tally: Tally, task: str, tier: str, prompt: str, max_tokens: str | None) -> bool:
    store = rt().store
    args = ["submit", "--task", task, "--tier", tier, "--prompt", prompt]
    if max_tokens is not None:
        args += ["--max-tokens", max_tokens]
    before = sum(store.count_by_status().values())
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    stored = sum(store.count_by_status().values()) - before
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    printed = result.stdout.strip().splitlines()
    job_known = bool(printed) and store.job(printed[-1].strip()) is not None
    refused, problems = cli_outcome(result.exit_code, result.exception, output, stored, job_known)
    return tally.record(
        args[1:],
        rejected=refused,
        problems=problems,
        bad_because=cli_bad_because(rt().settings, task, tier, prompt, max_tokens),
    )


@FUZZ
@given(
    task=st.text(max_size=12),
    tier=st.text(max_size=12),
    prompt=weird_text,
    max_tokens=st.one_of(st.just(None), st.text(max_size=6), st.integers(-5, 10**7).map(str)),
)
def fuzz_cli(tally, task, tier, prompt, max_tokens) -> None:
    observe_cli(tally, task, tier, prompt, max_tokens)


def test_cli(quiet_stack) -> None:
    tally = Tally.on("bad input: the CLI (hypothesis)")
    fuzz_cli(tally)
    tally.check()


#: (arguments, the option the error must name): each found exiting 70 (an internal error), or
#: taken, by the outside fault harness. {tmp} is a fresh folder, {good} a good input file in it.
HARNESS_CLI_INPUTS = [
    (
        ["batch", "{tmp}/missing.jsonl", "--task", "chat", "--tier", "free", "-o", "{tmp}/out.jsonl"],
        "in.jsonl",
    ),
    (["batch", "{good}", "--task", "chat", "--tier", "free", "-o", "{tmp}/no/such/out.jsonl"], "--output"),
    (["batch", "{good}", "--task", "chat", "--tier", "free", "-o", "{good}/out.jsonl"], "--output"),
    (["usage", "--since", "99999999999h"], "--since"),
    (["recover", "--idle", "nan"], "--idle"),
    (["recover", "--idle", "1e300"], "--idle"),
    (["recover", "--idle", "-5"], "--idle"),
    (["simulate", "--port", "70000"], "--port"),
    (
        ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--wait", "--timeout", "nan"],
        "--timeout",
    ),
    (["route", "--task", "chat", "--tier", "free", "--max-tokens", "-3"], "--max-tokens"),
    (
        ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--max-tokens", str(10**30)],
        "--max-tokens",
    ),
    (
        ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--idempotency-key", "k" * 257],
        "--idempotency-key",
    ),
]


def test_cli_inputs_the_fault_harness_found(quiet_stack, tmp_path) -> None:
    good = tmp_path / "in.jsonl"
    good.write_text('{"custom_id": "a", "prompt": "fine"}\n')
    tally = Tally.on("bad input: the CLI (fault harness)")
    for args, option in HARNESS_CLI_INPUTS:
        args = [a.format(tmp=tmp_path, good=good) for a in args]
        before = stored_rows()
        result = CliRunner().invoke(main, args, catch_exceptions=True)
        stored = stored_rows() - before
        output = result.output + (result.stderr if result.stderr_bytes is not None else "")
        refused, problems = cli_outcome(result.exit_code, result.exception, output, stored, False, (option,))
        tally.record(args, rejected=refused, problems=problems, bad_because="the fault harness found it")
    tally.check()
    assert tally.row.rejected_cleanly == len(HARNESS_CLI_INPUTS)


# -- batch lines ------------------------------------------------------------------------------


def batch_bad_because(value: object) -> str | None:
    if not isinstance(value, Mapping):
        return "the line is not an object"
    custom_id = value.get("custom_id")
    if not (isinstance(custom_id, str) and custom_id.strip()):
        return "custom_id is not a non-empty string"
    if not_storable(custom_id, MAX_CUSTOM_ID):
        return "custom_id is too long, holds NUL or is not valid UTF-8"
    if ("url" in value or "body" in value) and value.get("url") != OPENAI_URL:
        return f"an OpenAI line whose url is not {OPENAI_URL}"
    return None


def batch_outcome(item: object) -> tuple[bool, list[str]]:
    """(refused, problems) of checking one line numbered 7."""
    if isinstance(item, BatchItem):
        return False, []
    if not isinstance(item, BadLine):
        return True, [f"{type(item).__name__}: {item}"[:200]]
    problems = []
    if not str(item).startswith("line 7: "):
        problems.append(f"does not name its line: {str(item)[:200]!r}")
    if not names_a_field(item.error, BATCH_FIELDS):
        problems.append(f"the error names no field: {item.error[:200]!r}")
    return True, problems


def observe_batch_line(tally: Tally, value: object) -> bool:
    try:
        item: object = check_item(rt(), 7, value, "chat", "free")
    except Exception as exc:  # classified as an unclean refusal
        item = exc
    refused, problems = batch_outcome(item)
    return tally.record(value, rejected=refused, problems=problems, bad_because=batch_bad_because(value))


@FUZZ
@given(
    value=st.one_of(
        junk,
        nested,
        st.fixed_dictionaries({"custom_id": junk, "prompt": st.one_of(junk, weird_text)}),
        st.fixed_dictionaries({"custom_id": harness_values, "prompt": st.just("x")}),
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
def fuzz_batch_lines(tally, value) -> None:
    observe_batch_line(tally, value)


def test_batch_lines(quiet_stack) -> None:
    tally = Tally.on("bad input: batch lines (hypothesis)")
    fuzz_batch_lines(tally)
    tally.check()


HARNESS_BATCH_LINES = [
    {"custom_id": "a\x00", "prompt": "x"},
    {"custom_id": "a\ud800", "prompt": "x"},
    {"custom_id": "c" * (MAX_CUSTOM_ID + 1), "prompt": "x"},
    {"custom_id": "a", "prompt": "x", "task": "t" * (MAX_NAME_CHARS + 1)},
    {"custom_id": "a", "prompt": "x", "max_tokens": 10**30},
]


def test_batch_lines_the_fault_harness_found(quiet_stack) -> None:
    tally = Tally.on("bad input: batch lines (fault harness)")
    for value in HARNESS_BATCH_LINES:
        refused, problems = batch_outcome(check_item(rt(), 7, value, "chat", "free"))
        tally.record(value, rejected=refused, problems=problems, bad_because="the fault harness found it")
    tally.check()
    assert tally.row.rejected_cleanly == len(HARNESS_BATCH_LINES)


def test_batch_file_with_raw_garbage(quiet_stack, tmp_path) -> None:
    from producer.batch import BatchInputError

    lines = [
        b"\xff\xfe\x00",
        b"{" * 10000,
        b"null",
        b'{"custom_id": "a", "prompt": "ok"}',
        b'{"custom_id": "a", "prompt": "dup"}',
        json.dumps({"custom_id": "b", "prompt": "x" * 10}).encode(),
    ]
    bad_lines = {1, 2, 3, 5}  # not UTF-8, nested too deeply, not an object, a duplicate custom_id
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))
    store = rt().store
    before = sum(store.count_by_status().values())
    with pytest.raises(BatchInputError) as info:
        default_client().submit_file(tmp_path / "in.jsonl", task="chat", tier="free")
    stored = sum(store.count_by_status().values()) - before
    reported = {b.line: b for b in info.value.bad}
    tally = Tally.on("bad input: raw batch file")
    for number in sorted(bad_lines | set(reported)):
        bad = reported.get(number)
        problems = []
        if bad is not None and not (bad.error and str(bad).startswith(f"line {number}: ")):
            problems.append(f"an unclear report: {str(bad)!r}")
        if stored:
            problems.append(f"{stored} job(s) stored anyway")
        tally.record(
            f"line {number}: {lines[number - 1][:40]!r}",
            rejected=bad is not None,
            problems=problems,
            bad_because="the test wrote it bad" if number in bad_lines else None,
        )
    tally.check()
    assert sorted(reported) == sorted(bad_lines)


# -- the config -------------------------------------------------------------------------------

BASE_CONFIG = tomllib.loads((Path(__file__).parent.parent / "spillway.toml").read_text())


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


PATHS = list(_paths(BASE_CONFIG))
CONFIG_KEYS = sorted({str(key) for path in PATHS for key in path} | {"surprise_key"})


def _has_key(data: object, name: str) -> bool:
    return isinstance(data, dict) and (name in data or any(_has_key(v, name) for v in data.values()))


def config_outcome(error: BaseException | None) -> tuple[bool, list[str]]:
    """(refused, problems) of loading one config: a ConfigError naming the file and a key."""
    if error is None:
        return False, []
    problems = []
    if not isinstance(error, ConfigError):
        problems.append(f"raised {type(error).__name__}, not a ConfigError: {str(error)[:200]}")
    message = str(error)
    if not message.startswith("spillway.toml: "):
        problems.append(f"does not name the file: {message[:200]!r}")
    elif not names_a_field(message.removeprefix("spillway.toml: "), CONFIG_KEYS):
        problems.append(f"names no key: {message[:200]!r}")
    return True, problems


def observe_config(tally: Tally, data: dict[str, Any], edits: object) -> bool:
    bad_because = "it has a key no table knows" if _has_key(data, "surprise_key") else None
    error: Exception | None = None
    try:
        settings_from_data(data, "spillway.toml")
    except Exception as exc:  # classified below
        error = exc
    refused, problems = config_outcome(error)
    return tally.record(edits, rejected=refused, problems=problems, bad_because=bad_because)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(PATHS), st.one_of(junk, st.just("__delete__"), st.just("__add__"))),
        min_size=1,
        max_size=4,
    )
)
def fuzz_config(tally, edits) -> None:
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
    observe_config(tally, data, edits)


def test_config_with_every_kind_of_mistake() -> None:
    tally = Tally.on("bad input: config files (hypothesis)")
    fuzz_config(tally)
    tally.check()


@FUZZ
@given(text=st.text(max_size=300))
def test_config_text_that_is_not_toml(text) -> None:
    from workers.config import parse_settings

    try:
        parse_settings(text, "x.toml")
    except ConfigError as exc:
        assert str(exc).startswith("x.toml: ")


# -- the counting itself ------------------------------------------------------------------------


def test_an_input_taken_is_not_counted_as_rejected(quiet_stack) -> None:
    """A test that cannot fail is a defect. Through the real API: a good call the self-check
    calls bad is taken, so it is tried but not rejected cleanly, and the check fails naming
    it; a bad call is tried and rejected cleanly; a good one is only submitted."""
    tally = Tally.on("self-check", ledger=None)
    good = {"prompt": "a perfectly good prompt", "task": "chat", "tier": "free"}
    assert api_bad_because(rt().settings, good) is None
    assert not observe_api(tally, good, claim_bad="the self-check calls it bad")
    assert observe_api(tally, {**good, "max_tokens": 0})  # refused, cleanly
    assert observe_api(tally, good)  # taken: submitted, not a bad input
    row = tally.row
    assert (row.bad_inputs, row.rejected_cleanly, row.submitted) == (2, 1, 1)
    with pytest.raises(AssertionError, match="tried=2 rejected_cleanly=1 accepted=1") as info:
        tally.check()
    assert "taken although the self-check calls it bad" in str(info.value)
    assert "a perfectly good prompt" in str(info.value)


@pytest.mark.parametrize(
    "outcome",
    [
        pytest.param(lambda: api_outcome(ValueError("max_tokens: no"), 0, False), id="api-wrong-type"),
        pytest.param(lambda: api_outcome(InputError("it went wrong"), 0, False), id="api-no-field"),
        pytest.param(lambda: api_outcome(InputError("max_tokens: no"), 1, False), id="api-stored"),
        pytest.param(lambda: api_outcome(None, 0, False), id="api-taken-not-stored"),
        pytest.param(lambda: cli_outcome(70, None, "internal error: KeyError", 0, False), id="cli-exit-70"),
        pytest.param(lambda: cli_outcome(2, None, "error: it went wrong", 0, False), id="cli-no-option"),
        pytest.param(lambda: cli_outcome(2, None, "error: --task: no", 1, False), id="cli-stored"),
        pytest.param(lambda: batch_outcome(BadLine(7, None, "")), id="batch-empty-error"),
        pytest.param(lambda: batch_outcome(BadLine(8, None, "custom_id: no")), id="batch-wrong-line"),
        pytest.param(lambda: batch_outcome(RecursionError("deep")), id="batch-exception"),
        pytest.param(lambda: config_outcome(KeyError("providers")), id="config-wrong-type"),
        pytest.param(lambda: config_outcome(ConfigError("spillway.toml: no")), id="config-no-key"),
        pytest.param(lambda: config_outcome(ConfigError("providers: bad")), id="config-no-file"),
    ],
)
def test_an_unclean_refusal_is_not_counted_as_clean(outcome) -> None:
    refused, problems = outcome()
    tally = Tally.on("self-check", ledger=None)
    assert not tally.record("the input", rejected=refused, problems=problems)
    assert (tally.row.rejected_cleanly, len(tally.failures)) == (0, 1)
    with pytest.raises(AssertionError, match="rejected_cleanly=0"):
        tally.check()


def test_a_clean_refusal_is_counted() -> None:
    for refused, problems in (
        api_outcome(InputError("max_tokens: expected a positive integer, got 0"), 0, False),
        cli_outcome(2, SystemExit(2), "error: unknown tier 'gold'", 0, False),
        batch_outcome(BadLine(7, None, "missing custom_id")),
        config_outcome(ConfigError("spillway.toml: providers.openai.api: expected a string")),
    ):
        assert refused and not problems, problems
