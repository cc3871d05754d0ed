"""Redis clients from URLs, with short timeouts: a Redis that is gone is reported, not waited on."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def connect(url: str) -> redis.Redis:
    """A client that rides out a blip (a few quick retries) but fails within seconds."""
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        socket_connect_timeout=1,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def answers(url: str) -> bool:
    """Whether a Redis answers PING at `url` (quickly)."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False
