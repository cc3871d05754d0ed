"""The Celery app: ``celery -A workers worker -Q llm.groq,llm.gemini -P threads``.

`make_app(env)` builds one from an `Env`; `app` is the process's own, from its environment.
Tasks are registered through ``include`` (imported when a worker starts), so a producer that
only publishes never imports them: it sends by task name (`workers.dispatch`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.app import backends
from celery.backends.redis import RedisBackend

from workers import discovery
from workers.env import Env
from workers.resultbackend import QuietRedisBackend

#: Modules with tasks and worker hooks, imported by a starting worker.
TASK_MODULES = ["workers.tasks", "workers.housekeeping"]


def celery_settings(env: Env) -> dict[str, Any]:
    """Spillway's Celery configuration, the environment's part taken from `env`."""
    return {
        "broker_url": env.broker,
        # the same transport kombu would pick, with fewer Redis clients built (see the module)
        "broker_transport": "workers.redis_transport:Transport"
        if env.broker.startswith("redis://")
        else None,
        # Chords need a result backend (on Redis, a quiet one: see workers/resultbackend.py).
        "result_backend": env.results,
        # Messages carry ids only, as JSON (never pickle).
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A crash must not lose a job: ack after the task ran, and requeue when the worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # LLM calls take seconds: a worker holds one message per thread, no more.
        "worker_prefetch_multiplier": env.prefetch_multiplier,
        # Flower sees every task from its worker: received, started, retried, succeeded. No
        # "sent" event from producers: one publish fewer per job, and a sent event arriving
        # after the worker's overwrote the provider:model name Flower shows with the plain one.
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "task_track_started": True,
        # Redis broker: an unacked message comes back after `visibility_timeout`; it must outlast
        # the longest call plus the longest countdown (Spillway parks longer waits in Redis).
        # Priority lists ``llm.groq``, ``llm.groq:3``... (0 runs first); Flower reads the same.
        "broker_transport_options": {
            "visibility_timeout": env.visibility_timeout_s,
            # how often workers look for unacked messages of dead workers (one cheap ZRANGE)
            "unacked_restore_interval": env.unacked_restore_s,
            "unacked_restore_throttle": 1,
            # A worker restores those messages under a Redis lock; one SIGKILLed while holding it
            # (kombu's default: 300 s) would stop every worker restoring for five minutes.
            # Restoring is safe without it (each message moves in a WATCH transaction).
            "unacked_mutex_expire": env.unacked_mutex_s,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": env.queue_order,
        },
        # RabbitMQ: declare queues with priorities 0-9 (higher runs first there).
        "task_queue_max_priority": 9,
        "task_default_priority": 5,
        "task_default_queue": "spillway",
        "result_expires": env.result_expires_s,
        "result_extended": True,
        # Submit fails fast when the broker is down instead of hanging the web request.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": env.broker_connection_timeout_s,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
    }


class SpillwayCelery(Celery):
    """Celery, with Redis results kept quiet and a way to pipeline everything one thread sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._publishing = threading.local()

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


def make_app(env: Env, *, main: bool = False) -> SpillwayCelery:
    """A Celery app for the broker and result backend `env` names. Only the process's own
    (`main`) becomes Celery's current app; a client's app for another stack stays apart."""
    app = SpillwayCelery("spillway", include=TASK_MODULES, set_as_current=main)
    app.conf.update(celery_settings(env))
    return app


discovery.load_dotenv()  # the broker's URL may be in ./.env: read before the app is made
app = make_app(Env.from_environ(), main=True)
