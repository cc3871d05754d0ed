"""RabbitMQ as the broker (Celery's recommended production broker) while the limiter stays on
Redis: single jobs and a batch chord run end to end."""

from __future__ import annotations

import socket
import uuid

import pytest
import redis

from producer.client import default_client
from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS, missing

pytestmark = pytest.mark.integration
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbit_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def test_jobs_and_a_chord_over_rabbitmq(redis_server, tmp_path) -> None:
    if not rabbit_answers():
        missing("RabbitMQ does not answer on 127.0.0.1:5672")
    suffix = uuid.uuid4().hex[:6]
    name = f"rmq{suffix}"  # queues of this run only: llm.rmq<suffix>
    config = tmp_path / "rabbit.toml"
    config.write_text(
        (CONFIGS / "e2e.toml")
        .read_text()
        .replace("[providers.groq", f"[providers.{name}")
        .replace('"groq:', f'"{name}:')
        .replace('key_env = "GROQ_API_KEY"', 'key_env = "RMQ_KEY"')
    )
    url = redis_server.url(12)
    redis.Redis.from_url(url).flushdb()
    stack = LocalStack(config, redis_url=url, celery_broker_url=AMQP_URL, workdir=str(tmp_path))
    try:
        stack.start()
        stack.start_worker(concurrency=8, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit, submit_batch

            app = default_client().app

            assert str(app.conf.broker_url).startswith("amqp://")
            single = submit("over rabbit", task="chat", tier="free").wait(60)
            batch = submit_batch(
                [{"custom_id": f"r{i}", "prompt": f"rabbit {i}"} for i in range(20)], task="chat", tier="free"
            )
            progress = batch.wait(120)
            records = list(batch.results())
            limiter_keys = redis.Redis.from_url(url).keys(f"*{{{name}}}*")
    finally:
        stack.close()
        _delete_queues(f"llm.{name}")
    assert single.status == "succeeded" and single.provider == name
    assert progress.finished and [r["status"] for r in records] == ["succeeded"] * 20
    assert limiter_keys  # the buckets live in Redis, whatever the broker


def _delete_queues(*names: str) -> None:
    from kombu import Connection

    with Connection(AMQP_URL) as conn:
        channel = conn.channel()
        for queue in names:
            try:
                channel.queue_delete(queue)
            except Exception:  # already gone
                channel = conn.channel()
