"""Parked jobs: kept in a Redis sorted set with their whole task signature (task id, chord),
published again once due — by exactly one of the workers that look."""

from __future__ import annotations

import json

import pytest
import redis

from workers import parking
from workers.tasks import run_job

pytestmark = pytest.mark.integration


@pytest.fixture
def app_on(redis_server, monkeypatch):
    from workers import app

    url = redis_server.url(9)
    redis.Redis.from_url(url).flushdb()
    before = (app.conf.broker_url, app.conf.result_backend)
    app.conf.broker_url = app.conf.result_backend = url
    app._after_fork()
    yield app, redis.Redis.from_url(url)
    app.conf.broker_url, app.conf.result_backend = before
    app._after_fork()


def test_a_parked_job_is_published_once_when_due(app_on) -> None:
    app, client = app_on
    sig = run_job.signature(
        kwargs={"job_id": "j1", "provider": "groq", "model": "m", "hop": 2},
        task_id="j1",
        queue="llm.groq",
        priority=4,
    )
    parking.park(client, dict(sig), due_s=1000.0, job_id="j1")
    assert parking.parked_job_ids(client) == {"j1"}
    assert parking.release_due(client, app, now_s=999.0) == 0  # not yet
    assert parking.release_due(client, app, now_s=1000.5) == 1
    assert parking.release_due(client, app, now_s=1001.0) == 0  # once
    assert parking.parked_job_ids(client) == set()
    [raw] = [m for q in client.scan_iter("llm.groq*") for m in client.lrange(q, 0, -1)]
    message = json.loads(raw)
    assert message["headers"]["id"] == "j1" and message["headers"]["task"] == "spillway.run_job"
