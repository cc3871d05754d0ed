"""Quota alerts: one warning line per crossed daily quota, and one webhook POST when configured."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from tests.test_operate import Receiver
from workers.alerts import quota_crossed
from workers.keys import ApiKey
from workers.limiter.limiter import Lease


def lease(crossed: tuple[str, ...] = ("rpd:901:1000",)) -> Lease:
    key = ApiKey("groq", "k0-abc123", "acct-7", "GROQ_KEY", secret="sk-secret")
    return Lease("lease-1", "groq", "m", key, now_ms=1_000, crossed=crossed)


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def alert_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "spillway-alert"]


def test_crossed_quota_logs_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="spillway.alerts"):
        quota_crossed(lease(), None)
    records = [r for r in caplog.records if r.name == "spillway.alerts"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    for part in ("groq/acct-7", "rpd", "901 of 1000", "90%"):
        assert part in message
    assert "sk-secret" not in message
    assert not alert_threads()


def test_nothing_crossed_logs_nothing(caplog, receiver) -> None:
    with caplog.at_level(logging.DEBUG, logger="spillway.alerts"):
        quota_crossed(lease(crossed=()), receiver.url)
    assert not [r for r in caplog.records if r.name == "spillway.alerts"]
    assert not alert_threads()
    time.sleep(0.2)
    assert receiver.bodies == []


def test_webhook_gets_one_json_post(caplog, receiver) -> None:
    with caplog.at_level(logging.WARNING, logger="spillway.alerts"):
        quota_crossed(lease(), receiver.url)
    deadline = time.monotonic() + 10
    while not receiver.bodies and time.monotonic() < deadline:
        time.sleep(0.02)
    for thread in alert_threads():
        thread.join(timeout=10)
    assert len(receiver.bodies) == 1
    headers, body = receiver.bodies[0]
    assert {k.lower(): v for k, v in headers.items()}["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["event"] == "quota_90_percent"
    assert (payload["provider"], payload["account"], payload["model"]) == ("groq", "acct-7", "m")
    assert (payload["quota"], payload["used"], payload["limit"]) == ("rpd", 901, 1000)
    assert payload["at"]
    assert "sk-secret" not in body.decode()
    assert len([r for r in caplog.records if r.name == "spillway.alerts"]) == 1
