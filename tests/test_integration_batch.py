"""Batches over real workers and the simulator: every item comes back in order, failures
with their errors, the chord callback runs once, and an interrupted batch resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.client import default_client
from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def batch_stack(redis_server, tmp_path_factory):
    stack = LocalStack(
        CONFIGS / "batch.toml", redis_url=redis_server.url(11), workdir=str(tmp_path_factory.mktemp("batch"))
    )
    import redis

    redis.Redis.from_url(redis_server.url(11)).flushdb()
    stack.start()
    stack.start_worker(concurrency=32, loglevel="WARNING")
    stack.wait_for_workers()
    yield stack
    stack.close()


def write_input(path: Path, count: int) -> list[str]:
    ids = []
    with open(path, "w") as out:
        for i in range(count):
            cid = f"item-{i:04d}"
            ids.append(cid)
            task = {"task": "flakyonly"} if i % 2 else {}
            out.write(json.dumps({"custom_id": cid, "prompt": f"question number {i}", **task}) + "\n")
    return ids


def cli(stack: LocalStack, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", "batch", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_300_items_with_a_flaky_provider(batch_stack, tmp_path) -> None:
    ids = write_input(tmp_path / "in.jsonl", 300)
    out = cli(
        batch_stack,
        str(tmp_path / "in.jsonl"),
        "--task",
        "work",
        "--tier",
        "free",
        "-o",
        str(tmp_path / "out.jsonl"),
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ids  # every item, in input order
    assert f"wrote 300 lines to {tmp_path / 'out.jsonl'}" in out.stdout.splitlines()  # a line of its own
    failed = [x for x in lines if x["status"] == "failed"]
    succeeded = [x for x in lines if x["status"] == "succeeded"]
    assert len(failed) + len(succeeded) == 300 and succeeded and failed
    assert all(x["error"] and x["text"] is None for x in failed)
    assert all(x["error"] is None and x["text"] and x["usage"]["output_tokens"] > 0 for x in succeeded)
    assert all(
        x["custom_id"] in {f"item-{i:04d}" for i in range(1, 300, 2)} for x in failed
    )  # flaky-only items
    batch_id = out.stdout.split("batch ", 1)[1].split(":", 1)[0].strip()
    status = json.loads(cli(batch_stack, "--status", batch_id, "--json").stdout)
    assert status["finished"] and status["chords"] == 1 and status["callback_runs"] == 1
    assert status["by_status"] == {"succeeded": len(succeeded), "failed": len(failed)}
    assert status["cost_usd"] == pytest.approx(sum(x["cost_usd"] for x in lines), abs=1e-6)


def test_resume_after_the_producer_is_killed_half_way(batch_stack, tmp_path) -> None:
    ids = write_input(tmp_path / "in.jsonl", 300)
    args = [str(tmp_path / "in.jsonl"), "--task", "work", "--tier", "free", "-o", str(tmp_path / "out.jsonl")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "batch", *args],
        env={**os.environ, **batch_stack.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with batch_stack.applied():
        from producer.batch import fingerprint

        store, key = default_client().runtime.store, fingerprint(args[0], args[-1], "work", "free")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            batch = store.batch_by_fingerprint(key)
            counts = store.count_by_status(batch.id) if batch else {}
            if counts.get("succeeded", 0) + counts.get("failed", 0) >= 60:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "out.jsonl").exists()
        before = {j.custom_id: (j.id, j.status, j.calls) for j in store.batch_jobs(batch.id, limit=1000)}
        assert 60 <= sum(1 for _, status, _ in before.values() if status in ("succeeded", "failed")) < 300
        again = cli(batch_stack, *args)
        assert again.returncode == 0, again.stderr
        after = {j.custom_id: (j.id, j.status, j.calls) for j in store.batch_jobs(batch.id, limit=1000)}
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ids
    assert set(after) == set(ids) and len(after) == 300  # one job per item, no duplicates
    for cid, (job_id, status, calls) in before.items():
        assert after[cid][0] == job_id
        if status == "succeeded":
            assert after[cid] == (job_id, status, calls)  # not sent again


def test_skip_invalid_writes_bad_lines_as_failed(batch_stack, tmp_path) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"custom_id": "a", "prompt": "good"}\n{"custom_id": "b", "prompt": ""}\nnot json\n'
        '{"custom_id": "c", "prompt": "good too", "task": "flakyonly"}\n'
    )
    args = [str(tmp_path / "in.jsonl"), "--task", "work", "--tier", "free", "-o", str(tmp_path / "out.jsonl")]
    refused = cli(batch_stack, *args)
    assert refused.returncode == 2 and not (tmp_path / "out.jsonl").exists()
    assert "2 bad line(s); nothing was enqueued" in refused.stderr
    assert "line 2: prompt: is empty" in refused.stderr and "line 3: not valid JSON" in refused.stderr
    ok = cli(batch_stack, *args, "--skip-invalid")
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(x["custom_id"], x["status"]) for x in lines][:3] == [
        ("a", "succeeded"),
        ("b", "failed"),
        (None, "failed"),
    ]
    assert lines[1]["error"] == "line 2: prompt: is empty" and lines[2]["error"].startswith(
        "line 3: not valid JSON"
    )
    assert lines[3]["custom_id"] == "c"


def test_no_wait_then_attach(batch_stack, tmp_path) -> None:
    write_input(tmp_path / "in.jsonl", 40)
    started = cli(batch_stack, str(tmp_path / "in.jsonl"), "--task", "work", "--tier", "free", "--no-wait")
    assert started.returncode == 0, started.stderr
    batch_id = started.stdout.strip().splitlines()[-1]
    attached = cli(batch_stack, "--attach", batch_id, "-o", str(tmp_path / "out.jsonl"))
    assert attached.returncode == 0, attached.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 40


def test_resume_after_a_crash_while_enqueueing(batch_stack, monkeypatch) -> None:
    """The first run dies after one chunk went out; the second sends only the rest."""
    import producer.batch as batch_module

    monkeypatch.setattr(batch_module, "CHUNK", 25)
    items = [{"custom_id": f"k-{i}", "prompt": f"crash test {i}"} for i in range(100)]
    with batch_stack.applied():
        from producer import submit_batch

        class Crash(Exception):
            pass

        calls = {"n": 0}
        real_add = batch_module._Enqueuer.add

        def dying_add(self, chunk):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash("producer killed")
            return real_add(self, chunk)

        monkeypatch.setattr(batch_module._Enqueuer, "add", dying_add)
        with pytest.raises(Crash):
            submit_batch(items, task="work", tier="free", batch_key="crash-test")
        monkeypatch.setattr(batch_module._Enqueuer, "add", real_add)
        handle = submit_batch(items, task="work", tier="free", batch_key="crash-test")
        handle.wait(120)
        records = list(handle.results())
        states = default_client().runtime.store.batch_states(handle.id)
    assert [r["custom_id"] for r in records] == [f"k-{i}" for i in range(100)]
    assert len(states) == 100


def test_a_lost_batch_message_is_sent_again_into_its_chord(redis_server, tmp_path) -> None:
    """The broker loses one message (a worker killed between BRPOP and its unacked record can do
    that): the reconciler sends the job again as a member of its chord, so the callback runs."""
    import redis

    url = redis_server.url(7)
    client = redis.Redis.from_url(url)
    client.flushdb()
    stack = LocalStack(CONFIGS / "batch.toml", redis_url=url, workdir=str(tmp_path))
    try:
        stack.start()
        with stack.applied():
            from producer import submit_batch

            app = default_client().app
            from workers.reconciler import recover_once

            items = [{"custom_id": f"l{i}", "prompt": f"lost {i}", "task": "flakyonly"} for i in range(10)]
            handle = submit_batch(items, task="work", tier="free")
            queues = [q for q in client.scan_iter("llm.*")]
            lost = json.loads(client.rpop(queues[0]))["headers"]["id"]  # the broker loses one message
            recovery = recover_once(default_client().runtime, app, idle_for_s=0, confirm_s=0.2)
            stack.set_faults("flaky", {})
            stack.start_worker(concurrency=8, loglevel="WARNING")
            progress = handle.wait(120)
            deadline = time.monotonic() + 30
            while (
                default_client().runtime.store.batch(handle.id).callback_runs < 1
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            batch = default_client().runtime.store.batch(handle.id)
    finally:
        stack.close()
    assert recovery.republished == [lost.split("-")[0]]
    assert progress.finished and progress.total == 10
    assert batch.callback_runs == 1 and batch.chords == 1 and batch.summary["total"] == 10


def test_openai_batch_lines_in_give_openai_batch_output_out(batch_stack, tmp_path) -> None:
    """OpenAI Batch API lines in, OpenAI's batch output format out (through --attach too)."""
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 20,
                **({"model": "s1"} if i else {}),  # body.model: steady's model, placed there
            },
        }
        for i in range(5)
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = [str(tmp_path / "in.jsonl"), "--task", "work", "--tier", "free"]
    done = cli(batch_stack, *args, "-o", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(5)]
    for record in out:
        assert set(record) == {"id", "custom_id", "response", "error"} and record["error"] is None
        assert record["id"].startswith("batch_req_") and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"] and body["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # as each line asked (round robin alone would have sent about half of them to flaky)
    assert [x["response"]["body"]["model"] for x in out][1:] == ["s1"] * 4
    started = cli(batch_stack, *args, "--no-wait")
    batch_id = started.stdout.strip().splitlines()[-1]
    attached = cli(batch_stack, "--attach", batch_id, "-o", str(tmp_path / "again.jsonl"))
    assert attached.returncode == 0, attached.stderr
    again = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert all(x["response"]["status_code"] == 200 for x in again)
