"""What the broker holds, read from a real Redis: queue lengths per priority and message ids."""

from __future__ import annotations

import json

import pytest
import redis

from workers.broker import is_redis, message_task_ids, queue_lengths
from workers.celery import make_app
from workers.dispatch import Target, publish_jobs
from workers.env import Env

DB = 11


@pytest.fixture
def app(redis_server):
    client = redis.Redis.from_url(redis_server.url(DB))
    client.flushdb()
    app = make_app(Env.from_environ({"SPILLWAY_REDIS_URL": redis_server.celery_url(DB)}))
    yield app, client
    app.close()
    client.flushdb()
    client.close()


def test_is_redis(app) -> None:
    celery_app, _ = app
    assert is_redis(celery_app)


def test_lengths_and_ids_cover_every_priority_and_unacked(app) -> None:
    celery_app, client = app
    jobs = {"j0": 0, "j3": 3, "j3b": 3, "j9": 9}
    publish_jobs(celery_app, [Target(job, "groq", "m", priority=p) for job, p in jobs.items()])
    publish_jobs(celery_app, [Target("o1", "other", "m", priority=5)])
    assert client.llen("llm.groq") == 1
    assert client.llen("llm.groq:3") == 2
    assert client.llen("llm.groq:9") == 1
    assert queue_lengths(celery_app, ["llm.groq", "llm.other", "llm.none"]) == {
        "llm.groq": 4,
        "llm.other": 1,
        "llm.none": 0,
    }
    assert message_task_ids(celery_app, ["llm.groq"]) == set(jobs)
    assert message_task_ids(celery_app, ["llm.groq", "llm.other"]) == {*jobs, "o1"}

    # a worker took j9: it left the list for the unacked hash, and is still the broker's
    raw = client.rpop("llm.groq:9")
    client.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", "llm.groq"]))
    assert queue_lengths(celery_app, ["llm.groq"]) == {"llm.groq": 3}
    assert message_task_ids(celery_app, ["llm.groq"]) == set(jobs)
    assert message_task_ids(celery_app, []) == {"j9"}


def test_a_redis_broker_builds_one_client_per_pool_not_one_per_command(app) -> None:
    celery_app, client = app
    with celery_app.connection_for_write() as conn:
        channel = conn.default_channel
        assert type(conn.transport).__module__ == "workers.redis_transport"
        first = channel._create_client()
        assert channel._create_client() is first  # kombu's own would build a new one
        channel._disconnect_pools()  # as after a fork or a lost connection: a new pool, a new client
        assert channel._create_client() is not first
    publish_jobs(celery_app, [Target("after", "groq", "m", priority=0)])  # still publishes
    assert client.llen("llm.groq") == 1


def test_other_brokers_keep_kombus_transport() -> None:
    amqp = make_app(Env.from_environ({"CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}))
    assert amqp.conf.broker_transport is None
    amqp.close()
