"""The inputs an outside fault harness found taken, or refused only by the database, or turned
into internal errors: each now gets one error naming the field or option and its limit, with
the right status or exit code, and nothing stored — on SQLite and on PostgreSQL (the `store`
fixture runs every test here on both)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import func, select

from producer.batch import BatchInputError
from producer.cli import main
from producer.client import Client, using
from producer.ops.serve import MAX_BODY_BYTES, caller_id
from tests.conftest import CONFIGS
from tests.servekit import serve_in_thread
from workers.config import parse_settings
from workers.env import Env
from workers.errors import InputError
from workers.runtime import Runtime
from workers.store import Batch, Job

DB = 7  # this file's Redis database (conftest's fixtures use 1-5)
CONFIG = """
[spillway]
default_max_tokens = 64

[providers.a]
api = "openai"
base_url = "https://a.example/v1"
key_env = "A_KEY"
limits = { rpm = 100000, tpm = 100000000 }
[providers.a.models.am]
input_per_mtok = 1.0
output_per_mtok = 2.0
max_output_tokens = 4096

[routes.chat]
free = ["a:am"]
[routes."*"]
free = ["a:am"]
"""
JOB = {"prompt": "hello", "task": "chat", "tier": "free"}


@pytest.fixture
def client(store, redis_server) -> Iterator[Client]:
    """A producer on `store` (SQLite, then PostgreSQL) and a Redis database of its own; no
    worker, so what is taken waits in its queue."""
    url, broker = redis_server.url(DB), redis_server.celery_url(DB)
    redis.Redis.from_url(url).flushdb()
    env = Env.from_environ(
        {
            "SPILLWAY_REDIS_URL": url,
            "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": broker,
            "A_KEY": "sk-a-1",
            "SPILLWAY_CALLBACK_SECRET": "whsec-bad-inputs",
        }
    )
    rt = Runtime(parse_settings(CONFIG, "bad.toml"), env=env, store=store, quiet=True)
    c = Client(env, runtime=rt)
    yield c
    if "app" in c.__dict__:
        c.app.close()
    rt.redis.close()


def rows(client: Client) -> tuple[int, int]:
    """(jobs, batches) in the store."""
    with client.runtime.store.session(write=False) as s:
        return (
            s.scalar(select(func.count()).select_from(Job)),
            s.scalar(select(func.count()).select_from(Batch)),
        )


def published_job_ids(client: Client) -> list[str]:
    """The job id of every run_job message waiting in the broker."""
    r = redis.Redis.from_url(client.env.redis_url)
    ids = []
    for key in r.scan_iter():
        if r.type(key) != b"list":
            continue
        for raw in r.lrange(key, 0, -1):
            message = json.loads(raw)
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            ids.append(kwargs["job_id"])
    r.close()
    return ids


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# -- the Python API ----------------------------------------------------------------------------

DEADLINE_LIMIT = "at most 31,536,000"


@pytest.mark.parametrize(
    ("fields", "field", "limit"),
    [
        pytest.param({"task": "t" * 65}, "task", "at most 64 characters", id="task-65"),
        pytest.param({"idempotency_key": "k" * 257}, "idempotency_key", "at most 256", id="key-257"),
        pytest.param({"idempotency_key": "a\x00b"}, "idempotency_key", "NUL", id="key-nul"),
        pytest.param({"idempotency_key": "a\ud800"}, "idempotency_key", "UTF-8", id="key-surrogate"),
        pytest.param({"max_tokens": 10**30}, "max_tokens", "at most 1,000,000", id="max-tokens-1e30"),
        pytest.param({"max_tokens": 1_000_001}, "max_tokens", "at most 1,000,000", id="max-tokens-1e6+1"),
        pytest.param({"deadline_s": True}, "deadline_s", DEADLINE_LIMIT, id="deadline-true"),
        pytest.param({"deadline_s": 1e50}, "deadline_s", DEADLINE_LIMIT, id="deadline-1e50"),
        pytest.param({"deadline_s": 1e300}, "deadline_s", DEADLINE_LIMIT, id="deadline-1e300"),
        pytest.param({"deadline_s": float("nan")}, "deadline_s", DEADLINE_LIMIT, id="deadline-nan"),
        pytest.param({"deadline_s": float("inf")}, "deadline_s", DEADLINE_LIMIT, id="deadline-inf"),
        pytest.param({"deadline_s": 0}, "deadline_s", "above 0", id="deadline-0"),
        pytest.param({"preferred_provider": []}, "preferred_provider", "string", id="preferred-list"),
        pytest.param({"callback_url": "http://x/\x00"}, "callback_url", "NUL", id="callback-nul"),
        pytest.param({"stop": ["\ud800"]}, "stop[0]", "UTF-8", id="stop-surrogate"),
    ],
)
def test_a_bad_job_is_refused_before_the_store(client, fields, field, limit) -> None:
    before = rows(client)
    job = {**JOB, **fields}
    with pytest.raises(InputError) as info:
        client.submit(job.pop("prompt"), **job)
    assert_names(str(info.value), f"{field}:", limit)
    assert rows(client) == before


def test_the_limits_themselves_are_taken(client) -> None:
    """The column lengths exactly: PostgreSQL stores them, so the checks are not too strict."""
    handle = client.submit("hello", task="t" * 64, tier="free", idempotency_key="k" * 256, deadline_s=60)
    job = client.runtime.store.job(handle.id)
    assert (len(job.task_type), len(job.idempotency_key)) == (64, 256)
    batch = client.submit_batch([{"custom_id": "c" * 512, "prompt": "x"}], task="chat", tier="free")
    assert [r["custom_id"] for r in batch.results()] == ["c" * 512]


@pytest.mark.parametrize(
    ("items", "options", "field", "limit"),
    [
        pytest.param([{"custom_id": "a\x00", "prompt": "x"}], {}, "custom_id", "NUL", id="custom-id-nul"),
        pytest.param(
            [{"custom_id": "a\ud800", "prompt": "x"}], {}, "custom_id", "UTF-8", id="custom-id-surrogate"
        ),
        pytest.param(
            [{"custom_id": "c" * 513, "prompt": "x"}], {}, "custom_id", "at most 512", id="custom-id-513"
        ),
        pytest.param(
            [{"custom_id": "a", "prompt": "x", "task": "t" * 65}], {}, "task", "at most 64", id="line-task-65"
        ),
        pytest.param(
            [{"custom_id": "a", "prompt": "x", "max_tokens": 10**30}],
            {},
            "max_tokens",
            "at most 1,000,000",
            id="line-max-tokens",
        ),
        pytest.param(
            [{"custom_id": "a", "prompt": "x"}], {"task": "t" * 65}, "task", "at most 64", id="batch-task-65"
        ),
        pytest.param(
            [{"custom_id": "a", "prompt": "x"}],
            {"batch_key": "b" * 65},
            "batch_key",
            "at most 64",
            id="batch-key-65",
        ),
    ],
)
def test_a_bad_batch_stores_nothing_not_even_its_batch(client, items, options, field, limit) -> None:
    before = rows(client)
    good = {"custom_id": "fine", "prompt": "a good line"}
    with pytest.raises(InputError) as info:
        client.submit_batch([good, *items], **{"task": "chat", "tier": "free", **options})
    assert_names(str(info.value), f"{field}:", limit)
    if isinstance(info.value, BatchInputError):
        assert str(info.value.bad[0]).startswith("line 2: ")
    assert rows(client) == before


@pytest.mark.parametrize(
    ("items", "runs", "failed"),
    [
        pytest.param(
            [
                {"custom_id": "a", "prompt": ""},  # 1: bad, with the id a good line has
                {"custom_id": "a", "prompt": "runs"},  # 2
                {"custom_id": "b", "prompt": "runs too"},  # 3
                {"custom_id": "b", "prompt": "duplicate"},  # 4: the duplicate
            ],
            {2: "a", 3: "b"},
            {1: "line 1: prompt: is empty", 4: "line 4: duplicate custom_id 'b' (first on line 3)"},
            id="bad-line-first",
        ),
        pytest.param(
            [{"custom_id": "a", "prompt": "runs"}, {"custom_id": "a", "prompt": "duplicate"}],
            {1: "a"},
            {2: "line 2: duplicate custom_id 'a' (first on line 1)"},
            id="duplicate-after",
        ),
    ],
)
def test_skip_invalid_runs_the_first_good_line_of_an_id(client, items, runs, failed) -> None:
    handle = client.submit_batch(items, task="chat", tier="free", skip_invalid=True)
    jobs = client.runtime.store.batch_jobs(handle.id)
    assert [j.seq for j in jobs] == list(range(1, len(items) + 1))  # every line has its row
    ran = {j.seq: j.custom_id for j in jobs if j.status == "queued"}
    assert ran == runs
    assert {j.seq: j.error for j in jobs if j.status == "failed"} == failed
    published = published_job_ids(client)
    assert "" not in published
    assert sorted(published) == sorted(j.id for j in jobs if j.status == "queued")


# -- spillway serve ----------------------------------------------------------------------------


@contextmanager
def serving(client: Client, token: str) -> Iterator[httpx.Client]:
    """`spillway serve`'s server, in this process, on a free port; an HTTP client with `token`."""
    with (
        serve_in_thread(client, token) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
    ):
        yield http


def body(**fields: object) -> bytes:
    return json.dumps({**JOB, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "field", "limit"),
    [
        pytest.param(
            body()[:-1] + b', "deadline_s": 1e300}', "deadline_s", DEADLINE_LIMIT, id="deadline-1e300"
        ),
        pytest.param(body()[:-1] + b', "deadline_s": NaN}', "deadline_s", DEADLINE_LIMIT, id="deadline-nan"),
        pytest.param(
            body()[:-1] + b', "deadline_s": Infinity}', "deadline_s", DEADLINE_LIMIT, id="deadline-infinity"
        ),
        pytest.param(body(deadline_s=True), "deadline_s", DEADLINE_LIMIT, id="deadline-true"),
        pytest.param(body(max_tokens=10**30), "max_tokens", "at most 1,000,000", id="max-tokens-1e30"),
        pytest.param(body(preferred_provider=[]), "preferred_provider", "string", id="preferred-list"),
        pytest.param(body(task="t" * 65), "task", "at most 64", id="task-65"),
        pytest.param(body(idempotency_key="a\x00b"), "idempotency_key", "NUL", id="key-nul"),
        pytest.param(
            body()[:-1] + b', "idempotency_key": "a\\ud800"}', "idempotency_key", "UTF-8", id="key-surrogate"
        ),
        # the stored key is the caller's id, a colon and the key: the caller has 242 characters
        pytest.param(body(idempotency_key="k" * 243), "idempotency_key", "at most 242", id="key-243"),
    ],
)
def test_a_bad_body_is_a_422_naming_the_field(client, raw, field, limit) -> None:
    before = rows(client)
    with serving(client, "token-a") as api:
        answer = api.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert_names(answer.json()["error"]["message"], f"{field}:", limit)
    assert rows(client) == before


def test_usage_since_too_far_back_is_a_422_naming_since(client) -> None:
    with serving(client, "token-a") as api:
        answer = api.get("/v1/usage", params={"since": "99999999999h"})
    assert answer.status_code == 422
    assert_names(answer.json()["error"]["message"], "since", "year 1")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_8_mib_is_a_413_naming_the_limit(client, chunked) -> None:
    payload = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'", "task": "chat", "tier": "free"}'
    before = rows(client)
    with serving(client, "token-a") as api:
        content = iter([payload]) if chunked else payload
        answer = api.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
        just_under = api.post("/v1/jobs", content=b"x" * MAX_BODY_BYTES)
    assert answer.status_code == 413
    assert answer.json()["error"] == {
        "status": 413,
        "message": f"the body is larger than 8 MiB ({MAX_BODY_BYTES:,} bytes), the limit",
    }
    assert just_under.status_code == 400  # read whole: not JSON
    assert rows(client) == before


def test_an_idempotency_key_is_the_callers_own(client) -> None:
    """Two tokens, the same key and body: two jobs; the same token again: the same job. The
    stored key carries an id derived from the token, never the token."""
    job = {**JOB, "prompt": "invoice 12", "idempotency_key": "inv-12"}
    with serving(client, "token-a") as a, serving(client, "token-b") as b:
        first = a.post("/v1/jobs", json=job).json()["job_id"]
        assert a.post("/v1/jobs", json=job).json()["job_id"] == first
        other = b.post("/v1/jobs", json=job).json()["job_id"]
        assert other != first
        assert b.post("/v1/jobs", json=job).json()["job_id"] == other
        # another body under a's key: a conflict for a, a new job for c (nothing of a's shows)
        changed = {**job, "prompt": "invoice 13"}
        assert a.post("/v1/jobs", json=changed).status_code == 409
    with serving(client, "token-c") as c:
        assert c.post("/v1/jobs", json=changed).status_code == 202
    stored = {client.runtime.store.job(i).idempotency_key for i in (first, other)}
    assert stored == {f"{caller_id('token-a')}:inv-12", f"{caller_id('token-b')}:inv-12"}
    assert not any("token" in key for key in stored)
    # the Python API's keys are not any HTTP caller's
    assert client.submit("invoice 12", task="chat", tier="free", idempotency_key="inv-12").id not in (
        first,
        other,
    )


# -- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param(
            ["batch", "{tmp}/missing.jsonl", "--task", "chat", "--tier", "free", "-o", "{tmp}/o.jsonl"],
            "IN.jsonl",
            id="batch-missing-input",
        ),
        pytest.param(
            ["batch", "{good}", "--task", "chat", "--tier", "free", "-o", "{tmp}/no/such/o.jsonl"],
            "'-o' / '--output'",
            id="batch-output-no-folder",
        ),
        pytest.param(
            ["batch", "{good}", "--task", "chat", "--tier", "free", "-o", "{good}/o.jsonl"],
            "'-o' / '--output'",
            id="batch-output-under-a-file",
        ),
        pytest.param(
            ["batch", "{good}", "--task", "chat", "--tier", "free", "-o", "{tmp}"],
            "'-o' / '--output'",
            id="batch-output-a-folder",
        ),
        pytest.param(["usage", "--since", "99999999999h"], "--since", id="since-overflow"),
        pytest.param(["recover", "--idle", "nan"], "'--idle'", id="idle-nan"),
        pytest.param(["recover", "--idle", "1e300"], "'--idle'", id="idle-1e300"),
        pytest.param(["recover", "--idle", "-5"], "'--idle'", id="idle-negative"),
        pytest.param(["recover", "--idle", "inf"], "'--idle'", id="idle-inf"),
        pytest.param(["simulate", "--port", "70000"], "'--port'", id="simulate-port"),
        pytest.param(["serve", "--port", "70000"], "'--port'", id="serve-port"),
        pytest.param(["flower", "--port", "-1"], "'--port'", id="flower-port"),
        pytest.param(
            ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--wait", "--timeout", "nan"],
            "'--timeout'",
            id="timeout-nan",
        ),
        pytest.param(
            ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--wait", "--timeout", "inf"],
            "'--timeout'",
            id="timeout-inf",
        ),
        pytest.param(["status", "--watch", "--every", "nan"], "'--every'", id="every-nan"),
        pytest.param(
            ["route", "--task", "chat", "--tier", "free", "--max-tokens", "-3"],
            "'--max-tokens'",
            id="route-max-tokens",
        ),
        pytest.param(
            ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--max-tokens", str(10**30)],
            "--max-tokens:",
            id="submit-max-tokens",
        ),
        pytest.param(
            ["submit", "--task", "t" * 65, "--tier", "free", "--prompt", "x"], "--task:", id="submit-task-65"
        ),
        pytest.param(
            ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--idempotency-key", "k" * 257],
            "--idempotency-key:",
            id="submit-key-257",
        ),
        pytest.param(
            ["submit", "--task", "chat", "--tier", "free", "--prompt", "x", "--provider", "nope"],
            "--provider: 'nope' is not in the chat/free chain",  # the flag typed, not the field
            id="submit-provider-not-in-chain",
        ),
        pytest.param(
            ["submit", "--task", "chat", "--tier", "[/]", "--prompt", "x"],
            "unknown tier '[/]'",
            id="markup-in-the-message",
        ),
    ],
)
def test_a_bad_option_exits_2_naming_it_and_sends_nothing(client, tmp_path, args, named) -> None:
    good = tmp_path / "in.jsonl"
    good.write_text('{"custom_id": "a", "prompt": "fine"}\n')
    args = [a.format(tmp=tmp_path, good=good) for a in args]
    before = rows(client)
    with using(client):
        result = CliRunner().invoke(main, args, catch_exceptions=True)
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, output
    assert named in output and "error" in output.lower(), output
    assert "internal error" not in output and "Traceback" not in output
    assert rows(client) == before
    assert published_job_ids(client) == []


def cli(client: Client, *args: str) -> tuple[int, str, str]:
    with using(client):
        result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    return result.exit_code, result.stdout, result.stderr


def test_an_unknown_task_type_is_named_with_the_route_it_takes(client) -> None:
    note = """unknown task type 'nope': it takes the "*" route (known: chat)"""
    code, out, err = cli(client, "submit", "--task", "nope", "--tier", "free", "--prompt", "x")
    assert code == 0 and note in err and out.strip() in published_job_ids(client)
    code, out, err = cli(client, "route", "--task", "nope", "--tier", "free", "--json")
    assert code == 0 and json.loads(out)["fallback"] == note
    code, out, _ = cli(client, "route", "--task", "nope", "--tier", "free")
    assert code == 0 and note in " ".join(out.split())
    code, _, err = cli(client, "submit", "--task", "chat", "--tier", "free", "--prompt", "x")
    assert code == 0 and "note" not in err  # a configured task type says nothing


def test_recover_counts_the_open_jobs_too_recent_to_check(client, monkeypatch) -> None:
    client.submit("fresh", task="chat", tier="free")  # open, queued, touched just now
    code, out, _ = cli(client, "recover", "--idle", "30", "--json")
    assert code == 0 and json.loads(out) | {"batches_completed": []} == {
        "republished": [],
        "batches_completed": [],
        "alive": 0,
        "too_recent": 1,
    }
    code, out, _ = cli(client, "recover", "--idle", "30")
    assert "1 open job(s) changed in the last 30s and were not checked" in " ".join(out.split())
    # another recovery holds the lock: said so, nothing done
    client.runtime.redis.set(client.runtime.keys.recover_lock(), "1", ex=60)
    monkeypatch.setattr("producer.cli.RECOVER_WAIT_S", 0.5)
    code, out, err = cli(client, "recover", "--idle", "0")
    assert code == 1 and "another recovery held the lock" in err, (out, err)
    assert len(published_job_ids(client)) == 1 and client.runtime.store.count_by_status().get("queued") == 1


@pytest.mark.parametrize(
    ("variables", "args", "named"),
    [
        pytest.param({"SPILLWAY_REDIS_URL": "garbage"}, ["status"], "$SPILLWAY_REDIS_URL", id="redis-status"),
        pytest.param(
            {"SPILLWAY_REDIS_URL": "garbage"},
            ["submit", "--task", "chat", "--tier", "free", "--prompt", "x"],
            "$SPILLWAY_REDIS_URL",
            id="redis-submit",
        ),
        pytest.param(
            {"SPILLWAY_REDIS_URL": "redis://127.0.0.1:notaport/0"},
            ["usage"],
            "$SPILLWAY_REDIS_URL",
            id="redis-port",
        ),
        pytest.param(
            {"SPILLWAY_DATABASE_URL": "nonsense://x"}, ["status"], "$SPILLWAY_DATABASE_URL", id="db-dialect"
        ),
        pytest.param(
            {"SPILLWAY_DATABASE_URL": "garbage"}, ["usage"], "$SPILLWAY_DATABASE_URL", id="db-garbage"
        ),
        pytest.param(
            {"SPILLWAY_DATABASE_URL": "nonsense://x"},
            ["batch", "{input}", "--task", "chat", "--tier", "free", "--no-wait"],
            "$SPILLWAY_DATABASE_URL",
            id="db-batch",
        ),
        pytest.param(
            {"SPILLWAY_DATABASE_URL": "garbage"},
            ["worker", "--no-supervise"],
            "$SPILLWAY_DATABASE_URL",
            id="db-worker",
        ),
    ],
)
def test_a_malformed_url_is_a_config_error_naming_its_variable(tmp_path, variables, args, named) -> None:
    """The real command, as a process: exit 1 (a config error), one line naming the variable."""
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "fine"}\n')
    env = {
        **os.environ,
        "SPILLWAY_CONFIG": str(CONFIGS / "e2e.toml"),
        "SPILLWAY_REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens: nothing here may connect
        "SPILLWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        **variables,
    }
    env.pop("SPILLWAY_DEBUG", None)
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", *(a.format(input=tmp_path / "in.jsonl") for a in args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"error: {named}: ") and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "store.db").exists()  # refused before the store was opened


def test_get_shows_a_job_by_its_id(client) -> None:
    job_id = client.submit("later", task="chat", tier="free").id  # no worker here: it stays queued
    code, out, err = cli(client, "get", job_id)
    assert code == 4 and "queued" in err
    code, out, _ = cli(client, "get", job_id, "--json")
    assert code == 4 and json.loads(out)["status"] == "queued" and json.loads(out)["job_id"] == job_id
    code, _, err = cli(client, "get", "0" * 32)
    assert code == 2 and "no job with id" in err
