"""Parked jobs: kept in a Redis sorted set with their whole task signature (task id, chord),
published again once due — by exactly one of the workers that look."""

from __future__ import annotations

import json

import pytest
import redis

from workers import dispatch, parking
from workers.celery import make_app
from workers.env import Env
from workers.keyspace import Keyspace

pytestmark = pytest.mark.integration


@pytest.fixture
def app_on(redis_server):
    url = redis_server.url(9)
    redis.Redis.from_url(url).flushdb()
    app = make_app(Env.from_environ({"SPILLWAY_REDIS_URL": url}))
    yield app, redis.Redis.from_url(url)
    app.close()


def test_a_parked_job_is_published_once_when_due(app_on) -> None:
    app, client = app_on
    keys = Keyspace("test-parking")
    sig = dispatch.job_signature(app, dispatch.Target("j1", "groq", "m", priority=4, hop=2))
    parking.park(client, keys, dict(sig), due_s=1000.0, job_id="j1")
    assert parking.parked_job_ids(client, keys) == {"j1"}
    assert parking.release_due(client, keys, app, now_s=999.0) == 0  # not yet
    assert parking.release_due(client, keys, app, now_s=1000.5) == 1
    assert parking.release_due(client, keys, app, now_s=1001.0) == 0  # once
    assert parking.parked_job_ids(client, keys) == set()
    [raw] = [m for q in client.scan_iter("llm.groq*") for m in client.lrange(q, 0, -1)]
    message = json.loads(raw)
    assert message["headers"]["id"] == "j1" and message["headers"]["task"] == "spillway.run_job"


def test_cancelled_jobs_are_made_due_now_and_their_reservations_named(app_on) -> None:
    app, client = app_on
    keys = Keyspace("test-parking-cancel")
    for job_id in ("c1", "c2", "keep"):
        target = dispatch.Target(job_id, "groq", "m", priority=4, reservation=f"r-{job_id}")
        parking.park(client, keys, dict(dispatch.job_signature(app, target)), due_s=5000.0, job_id=job_id)
    found = parking.due_now(client, keys, {"c1", "c2", "gone"}, now_s=1000.0)
    assert sorted(kw["reservation"] for kw in found) == ["r-c1", "r-c2"]
    assert {kw["provider"] for kw in found} == {"groq"}
    assert parking.release_due(client, keys, app, now_s=1000.0) == 2  # published at once, to end
    assert parking.parked_job_ids(client, keys) == {"keep"}  # the others wait for their time
