"""Operating it: usage and cost from the store, quota alerts, signed callbacks, idempotent
submits and the response cache."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from producer import Client, Env
from producer.client import default_client
from producer.ops.stack import LocalStack
from producer.usage import parse_since, usage_report
from tests.conftest import CONFIGS, A, B, add_job
from tests.faultkit import wait_for
from workers import callbacks
from workers.errors import ConfigError, IdempotencyConflict, InputError
from workers.execution import run_job


class Receiver:
    """A web backend on 127.0.0.1 that records POSTs; `fail_first` answers 503 that many times."""

    def __init__(self, fail_first: int = 0) -> None:
        self.bodies: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self.send_response(503)
                else:
                    outer.bodies.append((dict(self.headers), body))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_usage_counts_requests_tokens_cost_failures_reroutes(make_rt) -> None:
    rt = make_rt()
    for _ in range(3):
        run_job(rt, add_job(rt), A)
    rt.sim.sim.settings.providers["a"].faults = {"error_500": 1.0}
    moved = add_job(rt)
    run_job(rt, moved, A)  # a fails, the job moves to b
    run_job(rt, moved, B, hop=1)
    report = usage_report(rt.store, by="model")
    groups = {g["model"]: g for g in report["groups"]}
    a, b = groups["a/am"], groups["b/bm"]
    assert (a["requests"], a["failures"], a["reroutes"]) == (4, 1, 1)
    assert (b["requests"], b["failures"], b["reroutes"]) == (1, 0, 0)
    assert report["total"]["requests"] == 5
    assert report["total"]["cost_usd"] == pytest.approx(a["cost_usd"] + b["cost_usd"])
    assert a["latency_p50_ms"] is not None and a["latency_p95_ms"] >= a["latency_p50_ms"]
    by_provider = usage_report(rt.store, by="provider")["groups"]
    assert [g["provider"] for g in by_provider] == ["a", "b"]
    assert usage_report(rt.store, by="tier")["groups"][0]["tier"] == "free"
    assert usage_report(rt.store, by="day")["groups"][0]["requests"] == 5
    assert usage_report(rt.store, by="key")["groups"][0]["key"].startswith("a/k0-")
    assert usage_report(rt.store, since=parse_since("2999-01-01"))["groups"] == []


def test_usage_cost_matches_the_jobs(make_rt) -> None:
    rt = make_rt()
    ids = [add_job(rt) for _ in range(4)]
    for job_id in ids:
        run_job(rt, job_id, A)
    report = usage_report(rt.store, by="provider")
    assert report["total"]["cost_usd"] == pytest.approx(sum(rt.store.job(i).cost_usd for i in ids), abs=1e-6)
    assert report["total"]["input_tokens"] == sum(rt.store.job(i).input_tokens for i in ids)


def test_since_parsing() -> None:
    assert parse_since("24h") is not None and parse_since("2026-11-01").year == 2026
    with pytest.raises(InputError, match="--since: expected a date"):
        parse_since("yesterday-ish")
    with pytest.raises(InputError, match="--by: expected one of"):
        usage_report(None, by="colour")  # type: ignore[arg-type]


def test_a_daily_quota_past_90_percent_warns_once_and_calls_the_webhook(make_rt, caplog) -> None:
    receiver = Receiver()
    rt = make_rt(a_limits="rpd = 10", environ={"SPILLWAY_ALERT_WEBHOOK_URL": receiver.url})
    try:
        with caplog.at_level(logging.WARNING, logger="spillway.alerts"):
            for _ in range(10):
                run_job(rt, add_job(rt, task="solo"), A)
        deadline = time.monotonic() + 10
        while not receiver.bodies and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        receiver.close()
    warnings = [r.getMessage() for r in caplog.records if "passed 90%" in r.getMessage()]
    assert len(warnings) == 1 and "daily quota rpd" in warnings[0] and "9 of 10" in warnings[0]
    [(_, body)] = receiver.bodies
    alert = json.loads(body)
    assert alert["event"] == "quota_90_percent" and alert["quota"] == "rpd" and alert["limit"] == 10


def test_signatures_verify_and_tampering_fails() -> None:
    key = b"whsec-abc"
    body = b'{"job_id": "1"}'
    header = callbacks.sign(body, key, timestamp=1_000_000)
    assert callbacks.verify(body, header, key, now=1_000_010)
    assert not callbacks.verify(body + b" ", header, key, now=1_000_010)
    assert not callbacks.verify(body, header, b"other", now=1_000_010)
    assert not callbacks.verify(body, header, key, now=1_000_000 + 3600)  # stale
    assert not callbacks.verify(body, "garbage", key)


def test_verify_takes_the_secret_as_str_and_calls_any_malformed_header_invalid() -> None:
    key = "whsec-abc"  # as the environment gives it
    body = b'{"job_id": "1"}'
    header = callbacks.sign(body, key.encode(), timestamp=1_000_000)
    assert callbacks.verify(body, header, key, now=1_000_010)
    assert callbacks.verify(body.decode(), header.encode(), key, now=1_000_010)  # str body, bytes header
    t = header.split(",")[0]
    for malformed in (None, "", t, t + ",v1=", t + ",v1=é", "t=x,v1=00", "v1=00", b"\xff\xfe", 42):
        assert callbacks.verify(body, malformed, key, now=1_000_010) is False  # no exception


@pytest.mark.integration
def test_callback_arrives_signed_and_is_retried_while_the_backend_is_down(e2e_stack) -> None:
    receiver = Receiver(fail_first=1)
    try:
        with e2e_stack.applied():
            from producer import submit

            handle = submit("call me back", task="chat", tier="pro", callback_url=receiver.url)
            result = handle.wait(60)
            deadline = time.monotonic() + 30
            while not receiver.bodies and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        receiver.close()
    [(headers, body)] = receiver.bodies
    lower = {k.lower(): v for k, v in headers.items()}
    assert callbacks.verify(body, lower["x-spillway-signature"], b"whsec-test-0123456789")
    assert lower["x-spillway-job-id"] == handle.id
    payload = json.loads(body)
    assert (
        payload["job_id"] == handle.id and payload["text"] == result.text and payload["status"] == "succeeded"
    )


@pytest.mark.integration
def test_a_callback_needs_the_signing_secret(e2e_stack) -> None:
    without = {k: v for k, v in e2e_stack.env.items() if k != "SPILLWAY_CALLBACK_SECRET"}
    with (
        Client(Env.from_environ(without)) as client,
        pytest.raises(ConfigError, match="SPILLWAY_CALLBACK_SECRET"),
    ):
        client.submit("x", task="chat", tier="pro", callback_url="http://127.0.0.1:9/hook")


@pytest.mark.integration
def test_an_idempotency_key_reused_for_another_request_is_a_conflict(e2e_stack) -> None:
    with e2e_stack.applied() as client:
        first = client.submit("summarise order 7", task="chat", tier="free", idempotency_key="order-7")
        before = sum(client.runtime.store.count_by_status().values())
        for other in (
            {"prompt": "summarise order 8"},  # another body
            {"prompt": "summarise order 7", "max_tokens": 99},  # other options
        ):
            with pytest.raises(IdempotencyConflict, match="idempotency_key: 'order-7' was already used"):
                client.submit(task="chat", tier="free", idempotency_key="order-7", **other)
        assert sum(client.runtime.store.count_by_status().values()) == before  # nothing stored
        again = client.submit("summarise order 7", task="chat", tier="free", idempotency_key="order-7")
        assert again.id == first.id  # the same request still finds its job


@pytest.mark.integration
def test_idempotency_key_returns_the_same_job(e2e_stack) -> None:
    with e2e_stack.applied():
        from producer import submit

        first = submit("once", task="chat", tier="free", idempotency_key="order-42-summary")
        again = submit("once", task="chat", tier="free", idempotency_key="order-42-summary")
        assert first.id == again.id
        assert first.wait(60).status == "succeeded"


@pytest.mark.integration
def test_cache_hit_spends_nothing_and_stays_in_its_tier(e2e_stack) -> None:
    prompt = f"cache me {time.time()}"
    with e2e_stack.applied():
        from producer import submit

        first = submit(prompt, task="cached", tier="free").wait(60)
        calls_before = e2e_stack.simulator_stats()["openai"].get("requests", 0)
        hit = submit(prompt, task="cached", tier="free").wait(10)
        other_tier = submit(prompt, task="cached", tier="pro").wait(60)
        calls_after = e2e_stack.simulator_stats()["openai"].get("requests", 0)

        usage = usage_report(default_client().runtime.store, by="tier")
    assert not first.cached and hit.cached and hit.text == first.text and hit.cost_usd == 0
    assert not other_tier.cached
    assert calls_after - calls_before == 1  # only the pro-tier job called the provider
    free = next(g for g in usage["groups"] if g["tier"] == "free")
    assert free["cached"] >= 1


@pytest.mark.integration
def test_a_callback_waits_for_a_worker_that_has_the_secret(tmp_path) -> None:
    """The producer has the secret, the first worker has not: the delivery is not lost but
    waits, and a worker with the secret delivers it once the first one is gone."""
    stack = LocalStack(
        CONFIGS / "e2e.toml",
        workdir=str(tmp_path),
        extra_env={"SPILLWAY_CALLBACK_SECRET": "whsec-test-0123456789"},
    )
    receiver = Receiver()
    stack.start()
    try:
        first = stack.start_worker(concurrency=4, extra_env={"SPILLWAY_CALLBACK_SECRET": ""})
        stack.wait_for_workers()
        with stack.applied() as client:
            handle = client.submit("call me back", task="chat", tier="pro", callback_url=receiver.url)
            assert handle.wait(60).status == "succeeded"
        log = stack.workdir / "worker0.log"
        wait_for(
            lambda: "waits for a worker that can sign it" in log.read_text(), timeout_s=30, what="the wait"
        )
        assert receiver.bodies == []  # nothing unsigned went out
        stack.kill_worker(first, signal.SIGTERM)  # a warm shutdown hands its messages back
        stack.start_worker(concurrency=4)
        wait_for(lambda: receiver.bodies, timeout_s=60, what="the callback from the worker with the secret")
    finally:
        receiver.close()
        stack.close()
    [(headers, body)] = receiver.bodies
    lower = {k.lower(): v for k, v in headers.items()}
    assert callbacks.verify(body, lower["x-spillway-signature"], "whsec-test-0123456789")
    assert json.loads(body)["job_id"] == handle.id


def test_since_too_far_back_is_an_input_error_naming_since() -> None:
    for text in ("99999999999h", "9" * 30 + "w", "9" * 5000 + "d"):
        with pytest.raises(InputError, match=r"^--since: .* reaches back before the year 1"):
            parse_since(text)
    assert parse_since("1000000h").year < 1970  # far, but a date
