"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu builds a new `redis.Redis` for each publish, ack and unacked-index update outside its
event loop (`Channel._create_client`), and redis-py's constructor fills a table of about 200
response callbacks every time: about a tenth of a worker's CPU per job. A client is a thin,
thread-safe handle on the channel's connection pool, so one per pool serves them all.
Celery uses this transport for ``redis://`` brokers (`workers.celery.celery_settings`).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the event loop's own client: kombu keeps that one already
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self.__dict__.get("_pooled_client")
        if client is None or client.connection_pool is not pool:  # a new pool after a reconnect
            client = self._pooled_client = super()._create_client(asynchronous=False)
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
