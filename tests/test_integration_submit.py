"""submit → provider queue → real `celery worker` → simulator → store, over real sockets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration


def test_cli_submit_wait_json_returns_a_stored_result(e2e_stack) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "submit",
            "--task",
            "chat",
            "--tier",
            "free",
            "--prompt",
            "hi",
            "--wait",
            "--json",
            "--timeout",
            "60",
        ],
        env={**__import__("os").environ, **e2e_stack.env},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded" and result["text"]
    assert result["provider"] == "groq" and result["model"] == "llama-3.3-70b-versatile"
    assert result["input_tokens"] > 0 and result["output_tokens"] > 0
    assert result["cost_usd"] == pytest.approx(
        (result["input_tokens"] * 0.59 + result["output_tokens"] * 0.79) / 1e6
    )
    with e2e_stack.applied():
        from producer import get

        stored = get(result["job_id"])
    assert stored.text == result["text"] and stored.attempts == 1


def test_python_api_submit_and_wait(e2e_stack) -> None:
    with e2e_stack.applied():
        from producer import submit

        handles = [
            submit(f"question {i}", task="chat", tier=tier, max_tokens=16)
            for i, tier in enumerate(["free", "pro", "admin"])
        ]
        results = [h.wait(60) for h in handles]
    assert [r.status for r in results] == ["succeeded"] * 3
    assert [r.provider for r in results] == ["groq", "openai", "anthropic"]
    assert all(r.output_tokens <= 16 for r in results)


def test_cli_errors_are_one_clear_line(e2e_stack) -> None:
    env = {**__import__("os").environ, **e2e_stack.env}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "submit",
            "--task",
            "chat",
            "--tier",
            "gold",
            "--prompt",
            "hi",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == "error: unknown tier 'gold' (known: free, pro, admin)"
    assert "Traceback" not in out.stderr


def test_no_route_names_each_skipped_candidate(redis_server, tmp_path, monkeypatch) -> None:
    from producer.ops.stack import LocalStack

    stack = LocalStack(CONFIGS / "e2e.toml", redis_url=redis_server.url(3), workdir=str(tmp_path))
    stack.start(simulator=False)
    stack.env.pop("GROQ_API_KEY")
    stack.env.pop("GEMINI_API_KEY")
    for name in ("GROQ_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with stack.applied():
        from producer import submit
        from workers.errors import NoRouteError

        with pytest.raises(NoRouteError) as info:
            submit("hi", task="chat", tier="free")
    assert "groq:llama-3.3-70b-versatile: no key in $GROQ_API_KEY" in str(info.value)
    assert "gemini:gemini-2.0-flash: no key in $GEMINI_API_KEY" in str(info.value)
    stack.close()


def test_broker_message_holds_ids_not_prompt_or_key(redis_server, tmp_path) -> None:
    """Nobody consumes this Redis: the message stays in the queue for us to read raw."""
    from producer.ops.stack import LocalStack

    url = redis_server.url(4)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(CONFIGS / "e2e.toml", redis_url=url, workdir=str(tmp_path))
    stack.start(simulator=False)
    prompt = "my secret prompt text 8f3a"
    key = stack.env["GROQ_API_KEY"]
    with stack.applied():
        from producer import submit

        handle = submit(prompt, task="chat", tier="free", system="system secret 77c1")
    client = redis.Redis.from_url(url)
    queues = list(client.scan_iter("llm.groq*"))
    raw = b"".join(m for q in queues for m in client.lrange(q, 0, -1))
    stack.close()
    assert queues == [b"llm.groq:8"]  # the free tier (priority 1) waits behind paid work
    assert handle.id.encode() in raw
    assert prompt.encode() not in raw and b"system secret" not in raw and key.encode() not in raw
    message = json.loads(raw)
    assert message["headers"]["task"] == "spillway.run_job"
