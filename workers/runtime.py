"""Everything a process needs to place and run jobs, built from one `Env`: the config, keys,
store, limiter, router and the shared HTTP client.

A worker process has one (`runtime()`, built on first use from its environment); a producer
`Client` owns its own, so two stacks can be used side by side in one process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import redis

from workers import discovery, redisconn
from workers.config import Settings, load_settings
from workers.dispatch import message_priority
from workers.env import Env
from workers.keys import KeyRing
from workers.keyspace import Keyspace
from workers.limiter import Clock, Limiter
from workers.providers.transport import shared_client
from workers.router import Router
from workers.store import Store


def database_url(env: Env, config: Path | None) -> str:
    """``$SPILLWAY_DATABASE_URL``; unset, a SQLite file beside the config file, so that every
    process reading one config shares one store whatever directory it runs in."""
    if "SPILLWAY_DATABASE_URL" in env.environ or config is None:
        return env.database_url
    return f"sqlite:///{config.resolve().parent / 'spillway.db'}"


class Runtime:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        env: Env | None = None,
        store: Store | None = None,
        redis_client: redis.Redis | None = None,
        clock: Clock | None = None,
        http: httpx.Client | None = None,
        quiet: bool = False,
    ) -> None:
        self.env = env or Env.from_environ()
        config = None
        if settings is None:
            config = discovery.find_config(environ=self.env.environ).path
            settings = load_settings(config, simulator_url=self.env.simulator_url)
        self.settings = settings
        self.keyring = KeyRing(self.settings, self.env.environ, quiet=quiet)
        self.keys = Keyspace(self.env.key_prefix)
        self.store = store or Store(database_url(self.env, config), schema=self.env.database_schema)
        self.redis = redis_client or redisconn.connect(self.env.redis_url)
        self.limiter = Limiter(self.redis, self.settings, self.keyring, clock=clock, keys=self.keys)
        self.router = Router(self.settings, self.keyring, self.limiter)
        self.http = http or shared_client()

    def priority(self, tier: str) -> int:
        """The message priority of a tier's jobs (5, the middle, for a tier the config dropped)."""
        config = self.settings.tiers.get(tier)
        return message_priority(config.priority, amqp=self.env.amqp_broker) if config else 5

    def close(self) -> None:
        self.store.close()
        self.redis.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """The worker process's runtime, built on first use (reads ./.env or the user config directory's,
    the environment, the config: `workers.discovery`)."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                discovery.load_dotenv()
                _runtime = Runtime()
    return _runtime


def set_runtime(value: Runtime | None) -> None:
    """Install a runtime (tests) or drop the cached one."""
    global _runtime
    _runtime = value
