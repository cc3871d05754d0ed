"""Celery settings for Spillway, every one read from the environment with a sane default.

Kept free of Spillway imports: Celery loads it by module name (``config_from_object``).
"""

import os

_redis = os.environ.get("SPILLWAY_REDIS_URL", "redis://127.0.0.1:6379/0")

broker_url = os.environ.get("CELERY_BROKER_URL", _redis)
# Chords need a result backend (on Redis, workers/app.py swaps in one that does not subscribe
# to every task a producer sends).
result_backend = os.environ.get("CELERY_RESULT_BACKEND", _redis)

# Messages carry ids only, as JSON (never pickle).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# A crash must not lose a job: ack after the task ran, and requeue when the worker dies.
task_acks_late = True
task_reject_on_worker_lost = True
# LLM calls take seconds: a worker holds one message per thread, no more.
worker_prefetch_multiplier = int(os.environ.get("CELERY_WORKER_PREFETCH_MULTIPLIER", "1"))

# Flower sees every task: sent, started, retried, succeeded.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# Redis broker: an unacked message comes back after `visibility_timeout`; it must outlast the
# longest call plus the longest countdown (Spillway parks longer waits in Redis instead).
# Priority lists ``llm.groq``, ``llm.groq:3``... (0 runs first); Flower reads the same options.
broker_transport_options = {
    "visibility_timeout": int(os.environ.get("SPILLWAY_VISIBILITY_TIMEOUT_S", "900")),
    # how often workers look for unacked messages of dead workers (one cheap ZRANGE a sweep)
    "unacked_restore_interval": int(os.environ.get("SPILLWAY_UNACKED_RESTORE_S", "10")),
    "unacked_restore_throttle": 1,
    # A worker restores those messages under a Redis lock; one SIGKILLed while holding it
    # (kombu's default: 300 s) would stop every worker restoring for five minutes. Restoring
    # is safe without it (each message moves in a WATCH transaction): keep it short.
    "unacked_mutex_expire": int(os.environ.get("SPILLWAY_UNACKED_MUTEX_S", "30")),
    "priority_steps": list(range(10)),
    "sep": ":",
    "queue_order_strategy": os.environ.get("SPILLWAY_QUEUE_ORDER", "round_robin"),
}
# RabbitMQ: declare queues with priorities 0-9 (higher runs first there).
task_queue_max_priority = 9
task_default_priority = 5

task_default_queue = "spillway"
result_expires = int(os.environ.get("SPILLWAY_RESULT_EXPIRES_S", "86400"))
result_extended = True

# Submit fails fast when the broker is down instead of hanging the web request.
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
broker_connection_retry_on_startup = True
broker_connection_timeout = float(os.environ.get("CELERY_BROKER_CONNECTION_TIMEOUT", "2"))
worker_cancel_long_running_tasks_on_connection_loss = False

worker_hijack_root_logger = True
worker_redirect_stdouts = False
