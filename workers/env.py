"""Every environment variable Spillway reads, in one frozen object built in one place.

``Env.from_environ(os.environ)`` reads and checks them all at once; nothing else in the code
calls ``os.environ``. The README's table lists the same variables (a test compares the two).
Provider API keys are the one exception by design: their names come from the config
(``key_env``), so `Env` keeps the mapping it was built from for the key ring, and never
prints it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from workers.constants import DEFAULT_CONFIG_FILE
from workers.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _var(name: str, default: Any, unit: str, doc: str) -> Any:
    return field(default=default, metadata={"env": name, "unit": unit, "doc": doc})


@dataclass(frozen=True)
class Env:
    """What the environment says; every field names its variable, default and unit."""

    config_file: str = _var(
        "SPILLWAY_CONFIG",
        DEFAULT_CONFIG_FILE,
        "path",
        "the config file (unset: found as *Where Spillway looks* says)",
    )
    redis_url: str = _var(
        "SPILLWAY_REDIS_URL",
        DEFAULT_REDIS_URL,
        "URL",
        "the limiter's Redis (`redis+cluster://host:port`: a Redis Cluster; then set the broker's own)",
    )
    broker_url: str | None = _var(
        "CELERY_BROKER_URL", None, "URL", "the broker (Redis or RabbitMQ); default `$SPILLWAY_REDIS_URL`"
    )
    result_backend: str | None = _var(
        "CELERY_RESULT_BACKEND", None, "URL", "chord results; default `$SPILLWAY_REDIS_URL`"
    )
    database_url: str = _var(
        "SPILLWAY_DATABASE_URL",
        "sqlite:///spillway.db",
        "URL",
        "the store (PostgreSQL: `postgresql+psycopg://…`); unset: `spillway.db` beside the config file",
    )
    database_schema: str | None = _var(
        "SPILLWAY_DATABASE_SCHEMA", None, "name", "PostgreSQL schema of the store's tables"
    )
    key_prefix: str = _var(
        "SPILLWAY_KEY_PREFIX",
        "spillway",
        "",
        "prefix of Spillway's own Redis keys (limiter, parking, cache); not of the broker's queues: give "
        "each deployment its own Redis database for those",
    )
    simulator_url: str | None = _var(
        "SPILLWAY_SIMULATOR_URL", None, "URL", "point every provider at a running `spillway simulate`"
    )
    api_token: str | None = _var("SPILLWAY_API_TOKEN", None, "", "bearer token of `spillway serve`")
    callback_secret: str | None = _var(
        "SPILLWAY_CALLBACK_SECRET", None, "", "HMAC key that signs result callbacks"
    )
    alert_webhook_url: str | None = _var(
        "SPILLWAY_ALERT_WEBHOOK_URL", None, "URL", 'where "90% of a daily quota used" is posted'
    )
    submit_when_broker_down: str = _var(
        "SPILLWAY_SUBMIT_WHEN_BROKER_DOWN",
        "fail",
        "fail/store",
        "`store`: keep the job, the reconciler publishes it later",
    )
    visibility_timeout_s: int = _var(
        "SPILLWAY_VISIBILITY_TIMEOUT_S", 900, "s", "Redis broker: when an unacked message comes back"
    )
    unacked_restore_s: int = _var(
        "SPILLWAY_UNACKED_RESTORE_S",
        10,
        "s",
        "Redis broker: how often workers look for a dead worker's messages",
    )
    unacked_mutex_s: int = _var(
        "SPILLWAY_UNACKED_MUTEX_S",
        30,
        "s",
        "Redis broker: how long a worker that died restoring others' messages blocks the rest from it "
        "(kombu: 300)",
    )
    queue_order: str = _var(
        "SPILLWAY_QUEUE_ORDER",
        "round_robin",
        "name",
        "Redis broker: how a worker takes turns between its queues (`round_robin`, `priority`, `sorted`)",
    )
    result_expires_s: int = _var("SPILLWAY_RESULT_EXPIRES_S", 86400, "s", "how long chord results are kept")
    broker_connection_timeout_s: float = _var(
        "CELERY_BROKER_CONNECTION_TIMEOUT", 2.0, "s", "how long a submit waits for a broker that is down"
    )
    prefetch_multiplier: int = _var(
        "CELERY_WORKER_PREFETCH_MULTIPLIER", 1, "messages", "messages a worker holds per thread"
    )
    stuck_s: float = _var(
        "SPILLWAY_STUCK_S",
        120.0,
        "s",
        "a worker that starts no task this long while its messages wait is ended and restarted",
    )
    parked_every_s: float = _var(
        "SPILLWAY_PARKED_EVERY_S", 2.0, "s", "how often a worker publishes parked jobs that are due"
    )
    recover_every_s: float = _var(
        "SPILLWAY_RECOVER_EVERY_S", 60.0, "s", "how often a worker runs the reconciler (0: never)"
    )
    recover_idle_s: float = _var(
        "SPILLWAY_RECOVER_IDLE_S",
        30.0,
        "s",
        "a job nothing touched this long, with no broker message, counts as lost",
    )
    serve_inline_calls: int = _var(
        "SPILLWAY_SERVE_INLINE_CALLS",
        64,
        "calls",
        "`spillway serve`: chat completions it calls the provider for itself when there is room at once "
        "(0: workers make every call)",
    )
    flower_basic_auth: str | None = _var(
        "FLOWER_BASIC_AUTH", None, "user:password", "basic auth of `spillway flower`"
    )
    debug: bool = _var("SPILLWAY_DEBUG", False, "flag", "print tracebacks instead of one-line errors")
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Env:
        """Read every variable from `environ` (default: this process's); a bad value raises
        ConfigError naming the variable."""
        source = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.metadata.get("env")
            raw = source.get(name, "") if name else ""
            if name and raw.strip():
                values[f.name] = _parse(name, raw.strip(), f.default)
        env = cls(**values, environ=source)
        if env.redis_url.startswith("redis+cluster://") and not (env.broker_url and env.result_backend):
            raise ConfigError(
                "$SPILLWAY_REDIS_URL names a Redis Cluster: set $CELERY_BROKER_URL and "
                "$CELERY_RESULT_BACKEND to a Redis (or RabbitMQ) of their own"
            )
        return env

    @classmethod
    def overlaid(cls, variables: Mapping[str, str]) -> Env:
        """This process's environment with `variables` on top (a stack's, a child's)."""
        return cls.from_environ({**os.environ, **variables})

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def results(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def amqp_broker(self) -> bool:
        return self.broker.startswith(("amqp", "pyamqp"))

    @property
    def keep_when_broker_down(self) -> bool:
        return self.submit_when_broker_down == "store"


def variables() -> list[tuple[str, str, str, str]]:
    """(variable, default, unit, what) of every variable, in the README's order."""
    rows = []
    for f in fields(Env):
        if "env" in f.metadata:
            default = "—" if f.default is None else str(f.default)
            if isinstance(f.default, bool):
                default = "on" if f.default else "off"
            rows.append((f.metadata["env"], default, f.metadata["unit"], f.metadata["doc"]))
    return rows


def markdown_table() -> str:
    """The README's table of variables: ``python -m workers.env`` prints it."""
    lines = ["| variable | default | unit | what |", "|---|---|---|---|"]
    for name, default, unit, doc in variables():
        shown = "—" if default == "—" else f"`{default}`"
        lines.append(f"| `{name}` | {shown} | {unit or '—'} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())


def _parse(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.lower() not in ("0", "false", "no", "off")
    if isinstance(default, int | float):
        try:
            value = type(default)(raw)
        except ValueError:
            kind = "a whole number" if isinstance(default, int) else "a number"
            raise ConfigError(f"${name}: expected {kind}, got {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"${name}: expected a finite number ≥ 0, got {raw!r}")
        return value
    if name == "SPILLWAY_SUBMIT_WHEN_BROKER_DOWN" and raw not in ("fail", "store"):
        raise ConfigError(f"${name}: expected 'fail' or 'store', got {raw!r}")
    return raw
