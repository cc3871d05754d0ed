"""Redis clients from URLs, with short timeouts: a Redis that is gone is reported, not waited on."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

#: A limiter on Redis Cluster: ``redis+cluster://host:port`` names any node of it.
CLUSTER_SCHEME = "redis+cluster://"


def connect(url: str) -> redis.Redis:
    """A client that rides out a blip (a few quick retries) but fails within seconds."""
    if url.startswith(CLUSTER_SCHEME):
        # Every limiter key of a provider carries its hash tag: each script touches one slot.
        return RedisCluster.from_url(  # type: ignore[return-value]
            "redis://" + url.removeprefix(CLUSTER_SCHEME), socket_timeout=5, socket_connect_timeout=1
        )
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
