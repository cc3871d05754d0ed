"""`spillway init` and `spillway check`, and the README's path from `pip install` to jobs on two
simulated providers: init in an empty directory, the simulator and a worker started there (no
$SPILLWAY_CONFIG, keys from its .env), jobs on both providers, then check — and each kind of
problem (a missing key, an unknown model, an unreachable URL, a rejected key) as its own row."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from producer.cli import main
from producer.cli.check import PROBE_PROMPT
from producer.cli.init import ROUTES, STARTERS
from workers.config import load_settings
from workers.embedded import EmbeddedRedis, free_port
from workers.simulator import sim_settings

ROOT = Path(__file__).parent.parent
SPILLWAY = Path(sys.executable).parent / "spillway"
TIERS = ("free", "pro", "admin")


# -- spillway init ----------------------------------------------------------------------------


def init(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["init", "--dir", str(tmp_path), *args])


@pytest.mark.parametrize(
    "picked", [[name] for name in STARTERS] + [list(STARTERS)], ids=lambda p: "+".join(p)
)
def test_init_writes_a_config_that_loads_for_every_choice(tmp_path: Path, picked: list[str]) -> None:
    out = init(tmp_path, *(f"--provider={name}" for name in picked))
    assert out.exit_code == 0, out.output
    settings = load_settings(tmp_path / "spillway.toml")
    assert list(settings.providers) == picked
    sim_settings(settings)  # `spillway simulate` takes it as well
    for task, _strategy, _tiers in ROUTES:
        for tier in TIERS:
            chain = settings.chain(task, tier)
            assert {c.provider for c in chain.candidates} == set(picked)  # every pick, nothing else
    dotenv = (tmp_path / ".env").read_text()
    keyed = [STARTERS[n].key_env for n in picked if STARTERS[n].key_env]
    assert re.findall(r"^([A-Z_]+)=$", dotenv, re.M) == keyed  # one empty key line per provider
    assert re.search(r"^# SPILLWAY_SIMULATOR_URL=http://127\.0\.0\.1:8900$", dotenv, re.M)
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600


def test_init_simulated_points_both_files_at_the_simulator(tmp_path: Path) -> None:
    out = init(tmp_path, "--simulated", "--provider", "groq", "--provider", "ANTHROPIC", "--port", "9123")
    assert out.exit_code == 0, out.output
    settings = load_settings(tmp_path / "spillway.toml")
    assert sim_settings(settings).port == 9123
    lines = (tmp_path / ".env").read_text().splitlines()
    assert "SPILLWAY_SIMULATOR_URL=http://127.0.0.1:9123" in lines
    assert "GROQ_API_KEY=sim-groq" in lines and "ANTHROPIC_API_KEY=sim-anthropic" in lines


def test_init_never_overwrites_without_force(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MINE=1\n")
    out = init(tmp_path, "--provider", "groq")
    assert out.exit_code == 1
    assert (
        f"{(tmp_path / '.env').resolve()} already exists: nothing written (--force overwrites)" in out.output
    )
    assert not (tmp_path / "spillway.toml").exists() and (tmp_path / ".env").read_text() == "MINE=1\n"
    out = init(tmp_path, "--provider", "groq", "--force")
    assert out.exit_code == 0 and "GROQ_API_KEY=" in (tmp_path / ".env").read_text()
    out = init(tmp_path, "--provider", "openai")
    assert out.exit_code == 1 and "spillway.toml and " in out.output and "already exist:" in out.output


def test_init_without_providers_off_a_terminal_says_how(tmp_path: Path) -> None:
    out = init(tmp_path)
    assert out.exit_code == 2 and "--provider groq --provider openai" in out.output
    assert ", ".join(STARTERS) in out.output and not (tmp_path / "spillway.toml").exists()


def test_init_asks_on_a_terminal(tmp_path: Path) -> None:
    """On a real terminal (a pty), no --provider: a numbered choice; numbers and names mix."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "init", "--dir", str(tmp_path)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    os.close(slave)
    screen = b""
    try:
        screen = read_until(master, b"separated by spaces", timeout_s=60)
        os.write(master, b"nonsense\n")
        screen += read_until(master, b"unknown provider 'nonsense'", timeout_s=30)
        index = list(STARTERS).index("anthropic") + 1
        os.write(master, f"groq {index}\n".encode())
        assert proc.wait(60) == 0, screen
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        os.close(master)
    assert list(load_settings(tmp_path / "spillway.toml").providers) == ["groq", "anthropic"]


def read_until(fd: int, wanted: bytes, timeout_s: float) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout_s
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {wanted!r} in {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return seen


def test_the_starters_agree_with_the_shipped_example() -> None:
    """Each starter is the repository's commented spillway.toml, cut to one provider."""
    shipped = tomllib.loads((ROOT / "spillway.toml").read_text())["providers"]
    for name, starter in STARTERS.items():
        section = tomllib.loads(starter.section)["providers"][name]
        assert section == shipped[name], name
        assert {starter.fast, starter.strong} <= set(section["models"])
        assert starter.key_env == section.get("key_env")


# -- the README's path, end to end ------------------------------------------------------------


@pytest.fixture
def user_env(tmp_path: Path, redis_server: EmbeddedRedis) -> dict[str, str]:
    """A new user's environment: no Spillway variable, no provider key, a home of their own;
    only the Redis (the test's private one, database 14) is theirs to name."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPILLWAY_", "CELERY_", "FLOWER_", "XDG_")) and "_API_KEY" not in k
    }
    import redis

    redis.Redis.from_url(redis_server.url(14)).flushdb()
    home = tmp_path / "home"
    home.mkdir()
    return {
        **keep,
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "COLUMNS": "200",
        "SPILLWAY_REDIS_URL": redis_server.url(14),
        "CELERY_BROKER_URL": redis_server.celery_url(14),
        "CELERY_RESULT_BACKEND": redis_server.celery_url(14),
    }


def spillway(
    cwd: Path, env: dict[str, str], *args: str, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    if not SPILLWAY.exists():
        pytest.fail(f"no `spillway` command next to {sys.executable}: pip install -e .")
    return subprocess.run(
        [str(SPILLWAY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )


@contextlib.contextmanager
def background(cwd: Path, env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(SPILLWAY), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout_s}s: {log.read_text()}")


@pytest.mark.integration
def test_from_init_to_jobs_on_two_simulated_providers(tmp_path: Path, user_env: dict[str, str]) -> None:
    project = tmp_path / "project"
    project.mkdir()
    port = free_port()
    done = spillway(
        project,
        user_env,
        "init",
        "--simulated",
        "--provider",
        "groq",
        "--provider",
        "openai",
        "--port",
        str(port),
    )
    assert done.returncode == 0, done.stderr
    # canary keys: the simulator takes any, and none may appear in any output or log
    canaries = {
        "GROQ_API_KEY": f"sim-groq-{os.urandom(6).hex()}",
        "OPENAI_API_KEY": f"sim-openai-{os.urandom(6).hex()}",
    }
    dotenv = project / ".env"
    text = dotenv.read_text()
    for name, value in canaries.items():
        text = text.replace(f"{name}=sim-{name.split('_')[0].lower()}\n", f"{name}={value}\n")
    dotenv.write_text(text)
    assert all(f"{n}={v}" in text for n, v in canaries.items())
    prompts = ["Write a haiku about spillways, canary 7f3a", "Summarise token buckets, canary 9b1c"]
    outputs = []

    with (
        background(project, user_env, tmp_path / "simulator.log", "simulate") as simulator,
        background(project, user_env, tmp_path / "worker.log", "worker") as worker,
    ):
        url = wait_for_line(tmp_path / "simulator.log", r"listening on (http://\S+)", simulator).group(1)
        assert url == f"http://127.0.0.1:{port}"  # the port init wrote, found in ./spillway.toml
        results = []
        for prompt, tier in zip(prompts, ("free", "pro"), strict=True):
            done = spillway(
                project,
                user_env,
                "submit",
                "--task",
                "code",
                "--tier",
                tier,
                "--prompt",
                prompt,
                "--wait",
                "--json",
                "--timeout",
                "90",
            )
            assert done.returncode == 0, done.stderr + (tmp_path / "worker.log").read_text()
            outputs += [done.stdout, done.stderr]
            results.append(json.loads(done.stdout))
        assert [(r["status"], r["provider"]) for r in results] == [
            ("succeeded", "groq"),
            ("succeeded", "openai"),
        ]
        stats = httpx.get(f"{url}/_sim/stats", timeout=5).json()
        assert stats["groq"]["ok"] == 1 and stats["openai"]["ok"] == 1  # the simulator saw both

        checked = spillway(project, user_env, "check", "--json")
        outputs += [checked.stdout, checked.stderr]
        assert checked.returncode == 0, checked.stdout + checked.stderr
        report = json.loads(checked.stdout)
        assert report["config"] == {
            "path": str((project / "spillway.toml").resolve()),
            "found_by": "the current directory",
        }
        assert report["dotenv"] == {"path": str(dotenv.resolve()), "found_by": "the current directory"}
        rows = {row["provider"]: row for row in report["accounts"]}
        assert set(rows) == {"groq", "openai"}
        for name, row in rows.items():
            assert row["reachable"] is True and row["simulated"] is True and row["ok"], row
            assert row["keys"] == [f"{name.upper()}_API_KEY"] and row["key_source"] == ".env"
            assert set(row["models"].values()) == {"ok"} and len(row["models"]) == 2
        # what the simulator's headers said: Groq's requests per day and tokens per minute
        groq = {(w["unit"], w["period"]): w for w in rows["groq"]["limits"]}
        assert groq[("requests", "day")]["limit"] == 1000 and groq[("tokens", "minute")]["limit"] == 12000
        assert {w["unit"] for w in rows["openai"]["limits"]} == {"requests", "tokens"}
        after = httpx.get(f"{url}/_sim/stats", timeout=5).json()
        assert after["groq"]["ok"] == 3 and after["openai"]["ok"] == 3  # one call per model

        shown = spillway(project, user_env, "check")
        outputs += [shown.stdout, shown.stderr]
        assert shown.returncode == 0, shown.stdout
        assert f"config    {(project / 'spillway.toml').resolve()} (the current directory)" in shown.stdout
        assert f".env      {dotenv.resolve()} (the current directory)" in shown.stdout
        assert re.search(
            r"groq .*GROQ_API_KEY .*yes \(\.env\) .*yes \(simulated\) .*requests \d+/1,000 a day",
            shown.stdout,
        )
        assert "ready: every configured provider has its key and answers" in shown.stdout

        # a missing key: a second project, the same config, OPENAI_API_KEY not in its .env
        other = tmp_path / "other"
        other.mkdir()
        (other / "spillway.toml").write_text((project / "spillway.toml").read_text())
        (other / ".env").write_text(
            "\n".join(line for line in text.splitlines() if not line.startswith("OPENAI_API_KEY"))
        )
        missing = spillway(other, user_env, "check")
        outputs += [missing.stdout, missing.stderr]
        assert missing.returncode == 1
        assert re.search(r"openai .*OPENAI_API_KEY .*\bno\b", missing.stdout), missing.stdout
        assert (
            "problem openai: $OPENAI_API_KEY is not set: put the key in .env or the environment (get one at https://platform.openai.com/api-keys)"
            in missing.stdout
        )
        assert "problem groq" not in missing.stdout
        no_call = spillway(other, user_env, "check", "--no-call", "--json")
        assert no_call.returncode == 1 and [r["ok"] for r in json.loads(no_call.stdout)["accounts"]] == [
            True,
            False,
        ]

        # an unreachable URL: the environment wins over .env
        closed = free_port()
        gone = spillway(
            project, {**user_env, "SPILLWAY_SIMULATOR_URL": f"http://127.0.0.1:{closed}"}, "check"
        )
        outputs += [gone.stdout, gone.stderr]
        assert gone.returncode == 1
        for name, path in (("groq", "groq/openai/v1"), ("openai", "openai/v1")):
            assert (
                f"problem {name}: cannot connect to http://127.0.0.1:{closed}/{path} (ConnectError)"
                in gone.stdout
            )

        worker_log = (tmp_path / "worker.log").read_text()
        assert worker.poll() is None, worker_log
    outputs.append(worker_log)
    outputs.append((tmp_path / "simulator.log").read_text())
    everything = "\n".join(outputs)
    for secret in [*canaries.values(), *prompts, PROBE_PROMPT]:
        assert secret not in everything


@pytest.mark.integration
def test_worker_without_keys_says_how_to_get_them(tmp_path: Path, user_env: dict[str, str]) -> None:
    """The shipped example's providers all need keys but Ollama's: with none set the worker
    serves Ollama alone — and says so, and how to fix it. With no keyless provider it stops."""
    project = tmp_path / "project"
    assert init(project, "--provider", "groq", "--provider", "ollama").exit_code == 0
    log = tmp_path / "worker.log"
    with background(project, user_env, log, "worker") as worker:
        hint = wait_for_line(log, r"spillway worker: only ollama is served .*\n", worker).group(0)
    assert "no provider key found ($GROQ_API_KEY)" in hint
    assert "`spillway init`" in hint and ".env.example" in hint and "SPILLWAY_SIMULATOR_URL" in hint
    alone = tmp_path / "alone"
    assert init(alone, "--provider", "groq").exit_code == 0
    done = spillway(alone, user_env, "worker")
    assert done.returncode == 2 and "no provider with a key to serve: put the keys in ./.env" in done.stderr


# -- spillway check against a provider's real error answers ----------------------------------


class FakeGroq(BaseHTTPRequestHandler):
    """Answers as Groq does (OpenAI format): a known model, an unknown one (404
    model_not_found), and a wrong key (401 quoting it, as OpenAI's message does)."""

    KEY = "gsk-good"
    MODELS = ("llama-3.1-8b-instant",)

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        if key != self.KEY:
            self.reply(
                401,
                {
                    "error": {
                        "message": f"Invalid API Key: {key}",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
            )
        elif body["model"] not in self.MODELS:
            message = f"The model `{body['model']}` does not exist or you do not have access to it."
            self.reply(
                404,
                {"error": {"message": message, "type": "invalid_request_error", "code": "model_not_found"}},
            )
        else:
            answer = {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
            }
            headers = {
                "x-ratelimit-limit-requests": "14400",
                "x-ratelimit-remaining-requests": "14399",
                "x-ratelimit-reset-requests": "6s",
            }
            self.reply(200, answer, headers)

    def reply(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def test_check_names_an_unknown_model_and_a_rejected_key_and_never_prints_a_key(
    tmp_path: Path, user_env: dict[str, str]
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGroq)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/openai/v1"
        (tmp_path / "spillway.toml").write_text(
            f"""
[providers.groq]
api = "openai"
signals = "groq"
base_url = "{base}"
key_env = "GROQ_API_KEY"
[providers.groq.models."llama-3.1-8b-instant"]
[providers.groq.models."llama-3.1-8b-instnat"]
[providers.other]
api = "openai"
base_url = "{base}"
key_env = "OTHER_KEY"
[providers.other.models."llama-3.1-8b-instant"]
[routes."*"]
free = ["groq:llama-3.1-8b-instant", "other:llama-3.1-8b-instant"]
"""
        )
        wrong_key = f"sk-wrong-{os.urandom(6).hex()}"
        (tmp_path / ".env").write_text(f"GROQ_API_KEY={FakeGroq.KEY}\nOTHER_KEY={wrong_key}\n")
        done = spillway(tmp_path, user_env, "check")
        as_json = spillway(tmp_path, user_env, "check", "--json")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1 and as_json.returncode == 1
    assert (
        "problem groq: model 'llama-3.1-8b-instnat' unknown: groq HTTP 404: The model `llama-3.1-8b-instnat` "
        "does not exist or you do not have access to it." in done.stdout
    )
    assert re.search(
        r"groq .*yes \(\.env\) .*yes .*requests 14,399/14,400 a day .*unknown: llama-3\.1-8b-instnat",
        done.stdout,
    )
    assert "problem other: key rejected: other HTTP 401: Invalid API Key: ***" in done.stdout
    rows = {row["provider"]: row for row in json.loads(as_json.stdout)["accounts"]}
    assert rows["groq"]["models"] == {"llama-3.1-8b-instant": "ok", "llama-3.1-8b-instnat": "unknown"}
    assert rows["other"]["reachable"] is True and not rows["other"]["ok"]
    for output in (done.stdout, done.stderr, as_json.stdout, as_json.stderr):
        assert wrong_key not in output and FakeGroq.KEY not in output and PROBE_PROMPT not in output
