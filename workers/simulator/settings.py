"""The simulator's settings: the config's providers plus its ``[simulator]`` table.

```toml
[simulator]
port = 8900
latency_ms = { median = 120, p95 = 400 }   # lognormal; default for every provider
seed = 7                                    # fault and latency draws repeat run to run

[simulator.providers.groq]
limits = { rpm = 15 }          # the "real" limits, if not the ones in [providers.groq]
latency_ms = { median = 300, p95 = 900 }
faults = { error_500 = 0.2, rate_limit = 0.1 }
reject_keys = ["bad-*"]        # keys answered with the format's authentication error
tokenizer = "cjk"              # count input like a real tokenizer (CJK: 5x Spillway's estimate)
# The batch APIs (workers/simulator/batches.py); [simulator] batch = {...} sets every provider's.
batch = { turnaround_s = 2, error_rate = 0.05, expire_rate = 0.0, queue_tokens = 90000 }
```
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from workers.config import LIMIT_NAMES, DailyReset, Limits, Settings
from workers.errors import ConfigError
from workers.tomltable import Table

#: Fault name -> what the simulator answers.
FAULTS = (
    "error_500",  # 500 with the format's server error
    "error_503",  # 503 unavailable
    "overloaded",  # Anthropic 529 overloaded_error; 503 for the others
    "timeout",  # hold the request past the client's timeout, then close it
    "reset",  # reset the TCP connection (RST) without an answer
    "malformed",  # 200 with a body that is not JSON
    "insufficient_quota",  # OpenAI insufficient_quota / Anthropic spend cap / Gemini billing 429
    "rate_limit",  # a 429 although the quota is not empty (another tenant, acceleration)
)


@dataclass(frozen=True)
class Latency:
    median_ms: float = 20.0
    p95_ms: float = 50.0


@dataclass(frozen=True)
class BatchBehaviour:
    """How the simulated batch APIs behave for one provider."""

    turnaround_s: float = 5.0  # a batch is done this long after it was created
    error_rate: float = 0.0  # share of requests answered with the provider's per-request error
    expire_rate: float = 0.0  # share of batches that expire with half their requests unanswered
    queue_tokens: int | None = None  # enqueued input tokens per model and owner; None: no limit


BATCH_KEYS = ("turnaround_s", "error_rate", "expire_rate", "queue_tokens")


@dataclass
class SimProvider:
    name: str
    api: str
    signals: str
    limits: Limits
    model_limits: dict[str, Limits]
    daily_reset: DailyReset
    shared_quota: bool
    require_key: bool
    latency: Latency = Latency()
    faults: dict[str, float] = field(default_factory=dict)
    reject_keys: tuple[str, ...] = ()
    hang_s: float = 10.0
    tokenizer: str = "estimate"  # how input tokens are counted: "estimate" or "cjk"
    batch: BatchBehaviour = BatchBehaviour()


@dataclass
class SimSettings:
    host: str
    port: int
    seed: int | None
    providers: dict[str, SimProvider]


def _latency(t: Table, default: Latency) -> Latency:
    if not t.names():
        return default
    median = t.pop_number("median", default.median_ms)
    p95 = t.pop_number("p95", max(median, default.p95_ms), minimum=median)
    t.done(known=("median", "p95"))
    return Latency(median, p95)


def _faults(t: Table) -> dict[str, float]:
    out = {name: t.pop_number(name, 0.0, maximum=1.0) for name in FAULTS}
    t.done(known=FAULTS)
    return {k: v for k, v in out.items() if v > 0}


def _batch(t: Table, default: BatchBehaviour) -> BatchBehaviour:
    behaviour = BatchBehaviour(
        turnaround_s=t.pop_number("turnaround_s", default.turnaround_s),
        error_rate=t.pop_number("error_rate", default.error_rate, maximum=1.0),
        expire_rate=t.pop_number("expire_rate", default.expire_rate, maximum=1.0),
        queue_tokens=t.pop_int("queue_tokens", default.queue_tokens),
    )
    t.done(known=BATCH_KEYS)
    return behaviour


def _limits(t: Table, default: Limits) -> Limits:
    if not t.names():
        return default
    values = {name: t.pop_int(name, None) for name in LIMIT_NAMES}
    t.done(known=LIMIT_NAMES)
    return Limits(**values)


def sim_settings(settings: Settings, *, port: int | None = None, host: str | None = None) -> SimSettings:
    """Every configured provider, simulated with its configured limits unless told otherwise.

    The config may only name a loopback host; `host` (``spillway simulate --host``, for a
    container) is taken as given."""
    root = Table(settings.simulator, "simulator", settings.source)
    config_host = root.pop_str("host", "127.0.0.1")
    if config_host not in ("127.0.0.1", "localhost", "::1"):
        raise root.error("host", "the simulator only listens on loopback", config_host)
    config_port = root.pop_int("port", 8900, minimum=0)
    seed = root.pop_int("seed", None, minimum=0)
    latency = _latency(root.pop_table("latency_ms"), Latency())
    batch = _batch(root.pop_table("batch"), BatchBehaviour())
    overrides = root.pop_table("providers")
    root.done(known=("host", "port", "seed", "latency_ms", "batch", "providers"))

    providers = {}
    for name, p in settings.providers.items():
        providers[name] = SimProvider(
            name=name,
            api=p.api,
            signals=p.signals,
            limits=p.limits,
            model_limits={m: c.limits for m, c in p.models.items()},
            daily_reset=p.daily_reset,
            shared_quota=p.shared_quota,
            require_key=p.key_env is not None,
            latency=latency,
            batch=batch,
        )
    for name, t in overrides.subtables():
        if name not in providers:
            raise ConfigError(f"{settings.source}: {t.path}: no provider {name!r} in [providers]")
        base = providers[name]
        providers[name] = replace(
            base,
            limits=_limits(t.pop_table("limits"), base.limits),
            latency=_latency(t.pop_table("latency_ms"), base.latency),
            faults=_faults(t.pop_table("faults")),
            reject_keys=tuple(t.pop_str_list("reject_keys", [])),
            hang_s=t.pop_number("hang_s", base.hang_s, minimum=0.1),
            tokenizer=t.pop_str("tokenizer", "estimate", choices=("estimate", "cjk")),
            batch=_batch(t.pop_table("batch"), base.batch),
        )
        t.done(known=("limits", "latency_ms", "faults", "reject_keys", "hang_s", "tokenizer", "batch"))
    return SimSettings(host or config_host, config_port if port is None else port, seed, providers)
