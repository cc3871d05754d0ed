"""Everything a process needs to place and run jobs, built once per process from the
environment: settings, keys, store, limiter, router and the shared HTTP client."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import httpx
import redis
from dotenv import load_dotenv

from workers import redisconn
from workers.config import Settings, TierConfig, load_settings
from workers.keys import KeyRing
from workers.limiter import Clock, Limiter
from workers.providers.transport import shared_client
from workers.router import Router
from workers.store import Store


class Runtime:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        env: Mapping[str, str] | None = None,
        store: Store | None = None,
        redis_client: redis.Redis | None = None,
        clock: Clock | None = None,
        http: httpx.Client | None = None,
        quiet: bool = False,
    ) -> None:
        self.settings = settings or load_settings()
        self.keyring = KeyRing(self.settings, os.environ if env is None else env, quiet=quiet)
        self.store = store or Store()
        self.redis = redis_client or redisconn.connect()
        self.limiter = Limiter(self.redis, self.settings, self.keyring, clock=clock)
        self.router = Router(self.settings, self.keyring, self.limiter)
        self.http = http or shared_client()

    def priority(self, tier: str) -> int:
        return message_priority(self.settings.tiers[tier])


def message_priority(tier: TierConfig) -> int:
    """A tier's priority as a Celery message priority: on Redis 0 runs first, on AMQP 9 does."""
    level = min(9, tier.priority)
    broker = os.environ.get("CELERY_BROKER_URL", "")
    return level if broker.startswith(("amqp", "pyamqp")) else 9 - level


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """The process's runtime, built on first use (reads .env, the config, the environment)."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                load_dotenv(override=False)
                _runtime = Runtime()
    return _runtime


def set_runtime(value: Runtime | None) -> None:
    """Install a runtime (tests, the demo) or drop the cached one."""
    global _runtime
    _runtime = value
