"""The Celery app: ``celery -A workers worker -Q llm.groq,llm.gemini -P threads``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.app import backends
from celery.backends.redis import RedisBackend

from workers.resultbackend import QuietRedisBackend


class SpillwayCelery(Celery):
    """Celery, with Redis results kept quiet and a way to pipeline everything one thread sends."""

    _publishing = threading.local()

    def _get_backend(self) -> Any:
        """Celery's own choice, except the Redis backend becomes the quiet one."""
        backend, url = backends.by_url(self.backend_cls or self.conf.result_backend, self.loader)
        if backend is RedisBackend:
            backend = QuietRedisBackend
        return backend(app=self, url=url)

    @contextmanager
    def publishing_batch(self) -> Iterator[Any]:
        """Everything this thread publishes inside — chords included, whose groups acquire their
        own producer — goes through one producer and its pipelined batch (kombu's
        `Producer.batch`): a chunk of messages costs a round trip, not one each."""
        with self.producer_or_acquire() as producer, producer.batch():
            self._publishing.producer = producer
            try:
                yield producer
            finally:
                self._publishing.producer = None

    def producer_or_acquire(self, producer: Any = None) -> Any:
        return super().producer_or_acquire(producer or getattr(self._publishing, "producer", None))


app = SpillwayCelery("spillway")
app.config_from_object("celeryconfig")
