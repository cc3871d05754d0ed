"""The configuration: one TOML file read into typed, validated, frozen objects.

`load_settings()` fails at start-up with one message naming the file, the key path
and what was expected. Secrets never live here: keys come from the environment
(`workers.keys`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from workers import constants, discovery
from workers.errors import ConfigError, InputError
from workers.providers import ADAPTERS, SIGNAL_PARSERS
from workers.strategies import STRATEGIES
from workers.tomltable import Table, key_path, shown

LIMIT_NAMES = ("rpm", "tpm", "rpd", "tpd", "itpm", "otpm", "concurrency")
DEFAULT_TIERS = {"free": 1, "pro": 5, "admin": 9}


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute and per day, input/output tokens per minute, parallel calls."""

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    concurrency: int | None = None

    def items(self) -> list[tuple[str, int]]:
        return [(n, getattr(self, n)) for n in LIMIT_NAMES if getattr(self, n) is not None]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    limits: Limits = Limits()
    max_output_tokens: int | None = None

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class DailyReset:
    """When the daily quotas start again: a time of day in a time zone (00:00 UTC by default)."""

    seconds_after_midnight: int = 0
    tz: str = "UTC"

    def offset_ms(self, now_s: float) -> int:
        """Shift that makes day windows `floor((now_ms + shift) / DAY_MS)` start at the reset."""
        utc_offset = datetime.fromtimestamp(now_s, ZoneInfo(self.tz)).utcoffset() or timedelta()
        return int(utc_offset.total_seconds() * 1000) - self.seconds_after_midnight * 1000

    def next_reset_s(self, now_s: float) -> float:
        shift = self.offset_ms(now_s)
        window = (int(now_s * 1000) + shift) // constants.DAY_MS
        return ((window + 1) * constants.DAY_MS - shift) / 1000


@dataclass(frozen=True)
class Circuit:
    failures: int = constants.CIRCUIT_FAILURES
    probe_after_s: float = constants.CIRCUIT_PROBE_S  # the first probe; then 1.5x each time
    cooldown_s: float = constants.CIRCUIT_COOLDOWN_S  # the longest it stays open between probes


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    api: str
    base_url: str
    key_env: str | None = None
    limits: Limits = Limits()
    shared_quota: bool = False
    models: dict[str, ModelConfig] = field(default_factory=dict)
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    daily_reset: DailyReset = DailyReset()
    headers: dict[str, str] = field(default_factory=dict)
    max_tokens_field: str = "max_tokens"
    signals: str = ""
    circuit: Circuit = Circuit()
    worker_concurrency: int | None = None
    batch: BatchApi | None = None  # None: jobs here are always called synchronously

    @property
    def queue(self) -> str:
        return constants.queue_name(self.name)

    def threads(self) -> int:
        """Worker threads for this provider: its parallel-call limit, or a sane default."""
        if self.worker_concurrency:
            return self.worker_concurrency
        return self.limits.concurrency or 16


#: How a job may run: a call now (sync), through the provider's batch API (batch), or the
#: cheapest way that still meets its deadline (auto).
MODES = ("sync", "batch", "auto")
BATCH_APIS = ("openai", "anthropic", "gemini")  # wire formats whose providers have a batch API


@dataclass(frozen=True)
class BatchApi:
    """A provider's batch API (`[providers.X.batch]`): its price and how Spillway uses it."""

    discount: float = 0.5  # batch price / synchronous price
    turnaround_s: float = 3600.0  # expected submit → results, until observed batches say
    collect_s: float = 5.0  # jobs are gathered this long into one provider batch
    max_requests: int = 10_000  # per provider batch (below the provider's own cap)
    queue_tokens: int | None = None  # enqueued input tokens per model the provider allows
    poll_s: float = 10.0  # the first poll; later ones back off to POLL_MAX_S


@dataclass(frozen=True)
class Candidate:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


@dataclass(frozen=True)
class Chain:
    candidates: tuple[Candidate, ...]
    strategy: str = "ordered"
    cache_ttl_s: float | None = None  # answers cached this long (exact-match), or no cache
    cache_across_tiers: bool = False  # a cached answer may serve another tier of the route
    mode: str = "sync"  # sync | batch | auto (see MODES); a submission may choose its own


@dataclass(frozen=True)
class TierConfig:
    name: str
    priority: int = 1
    budget_share: float = 1.0


@dataclass(frozen=True)
class TenantConfig:
    """A caller of `spillway serve` (``[tenants.<name>]``): its token comes from the
    environment, never the file; what it submits runs at its tier; it sees only its own."""

    name: str
    token_env: str
    tier: str
    tiers: tuple[str, ...]  # the tiers it may ask for (X-Spillway-Tier); its own by default
    task: str  # the task type of a request whose model names none
    daily_tokens: int | None = None  # tokens a UTC day, held at each job's worst case until it ends
    operator: bool = False  # may see every tenant's usage, status and jobs


@dataclass(frozen=True)
class Settings:
    source: str
    providers: dict[str, ProviderConfig]
    routes: dict[str, dict[str, Chain]]
    tiers: dict[str, TierConfig]
    default_max_tokens: int = constants.DEFAULT_MAX_TOKENS
    max_hops: int = constants.MAX_HOPS
    max_crashes: int = constants.MAX_CRASHES
    inline_wait_s: float = constants.INLINE_WAIT_S
    max_countdown_s: float = constants.MAX_COUNTDOWN_S
    lease_margin_s: float = constants.LEASE_MARGIN_S
    admission_margin_s: float = constants.ADMISSION_MARGIN_S
    simulator: dict[str, Any] = field(default_factory=dict)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)

    def fallback_note(self, task: str) -> str | None:
        """What to tell a user whose task type is not configured but the "*" route takes it."""
        if task in self.routes or "*" not in self.routes:
            return None
        known = ", ".join(t for t in self.routes if t != "*") or "none"
        return f'unknown task type {task!r}: it takes the "*" route (known: {known})'

    def chain(self, task: str, tier: str) -> Chain:
        """The route for a task type and tier; unknown names are an InputError naming them."""
        if tier not in self.tiers:
            raise InputError(f"unknown tier {tier!r} (known: {', '.join(self.tiers)})")
        routes = self.routes.get(task) or self.routes.get("*")
        if routes is None:
            known = ", ".join(t for t in self.routes if t != "*")
            raise InputError(f'unknown task type {task!r} and no "*" route (known: {known})')
        if tier not in routes:
            name = task if task in self.routes else "*"
            raise InputError(f"route {name!r} has no chain for tier {tier!r}")
        return routes[tier]

    def model(self, candidate: Candidate) -> ModelConfig:
        return self.providers[candidate.provider].models[candidate.model]


def load_settings(
    path: str | os.PathLike[str] | None = None, *, simulator_url: str | None = None
) -> Settings:
    """Read and validate the config file: `path`, else the one `workers.discovery` finds
    (``$SPILLWAY_CONFIG``, ``./spillway.toml``, the user config directory's)."""
    path = discovery.find_config().path if path is None else Path(path)
    source = path.name if path.parent == Path(".") else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: config file not found (set SPILLWAY_CONFIG, or run `spillway demo`)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc}") from exc
    return parse_settings(text, source, simulator_url=simulator_url)


def parse_settings(text: str, source: str, *, simulator_url: str | None = None) -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return settings_from_data(data, source, simulator_url=simulator_url)


def settings_from_data(data: dict[str, Any], source: str, *, simulator_url: str | None = None) -> Settings:
    """The parsed TOML document, checked key by key."""
    root = Table(data, "", source)
    general = _general(root.pop_table("spillway"))
    providers = _providers(root.pop_table("providers", required=True), simulator_url)
    tiers = _tiers(root.pop_table("tiers"))
    routes = _routes(root.pop_table("routes", required=True), providers, tiers)
    tenants = _tenants(root.pop_table("tenants"), tiers, routes)
    simulator = root.pop_raw("simulator", {})
    if not isinstance(simulator, dict):
        raise root.error("simulator", "expected a table", simulator)
    root.done(known=("spillway", "providers", "routes", "tiers", "tenants", "simulator"))
    return Settings(
        source=source,
        providers=providers,
        routes=routes,
        tiers=tiers,
        simulator=simulator,
        tenants=tenants,
        **general,
    )


def _tenants(
    table: Table, tiers: dict[str, TierConfig], routes: dict[str, dict[str, Chain]]
) -> dict[str, TenantConfig]:
    tenants = {}
    for name, t in table.subtables():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise table.error(name, "tenant names may use letters, digits, - and _ only")
        token_env = t.pop_str("token_env")
        tier = t.pop_str("tier", "free")
        if tier not in tiers:
            raise t.error("tier", f"unknown tier (known: {', '.join(tiers)})", tier)
        allowed = t.pop_str_list("tiers", [tier])
        for other in allowed:
            if other not in tiers:
                raise t.error("tiers", f"unknown tier (known: {', '.join(tiers)})", other)
        task = t.pop_str("task", "chat")
        if task not in routes and "*" not in routes:
            raise t.error("task", f"unknown task type (known: {', '.join(routes)})", task)
        tenants[name] = TenantConfig(
            name,
            token_env,
            tier,
            tuple(dict.fromkeys([tier, *allowed])),
            task,
            t.pop_int("daily_tokens", None),
            t.pop_bool("operator", False),
        )
        t.done(known=("token_env", "tier", "tiers", "task", "daily_tokens", "operator"))
    return tenants


def _general(t: Table) -> dict[str, Any]:
    out = {
        "default_max_tokens": t.pop_int("default_max_tokens", constants.DEFAULT_MAX_TOKENS),
        "max_hops": t.pop_int("max_hops", constants.MAX_HOPS),
        "max_crashes": t.pop_int("max_crashes", constants.MAX_CRASHES),
        "inline_wait_s": t.pop_number("inline_wait_s", constants.INLINE_WAIT_S, maximum=30),
        "max_countdown_s": t.pop_number("max_countdown_s", constants.MAX_COUNTDOWN_S, minimum=1),
        "lease_margin_s": t.pop_number("lease_margin_s", constants.LEASE_MARGIN_S, minimum=0.5),
        "admission_margin_s": t.pop_number(
            "admission_margin_s", constants.ADMISSION_MARGIN_S, minimum=0, maximum=5
        ),
    }
    t.done(known=tuple(out))
    return out


def _limits(t: Table) -> Limits:
    values = {name: t.pop_int(name, None) for name in LIMIT_NAMES}
    t.done(known=LIMIT_NAMES)
    return Limits(**values)


def _daily_reset(t: Table, key: str) -> DailyReset:
    raw = t.pop_str(key, "00:00 UTC")
    expected = 'expected "HH:MM <time zone>", for example "00:00 UTC" or "00:00 America/Los_Angeles"'
    hhmm, _, tz = raw.partition(" ")
    try:
        hours, minutes = (int(x) for x in hhmm.split(":"))
        ZoneInfo(tz or "UTC")
    except (ValueError, ZoneInfoNotFoundError):
        raise t.error(key, expected, raw) from None
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise t.error(key, expected, raw)
    return DailyReset(seconds_after_midnight=hours * 3600 + minutes * 60, tz=tz or "UTC")


def _providers(table: Table, simulator_url: str | None) -> dict[str, ProviderConfig]:
    providers = {}
    for name, t in table.subtables():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise table.error(name, "provider names may use letters, digits, - and _ only")
        providers[name] = _provider(name, t, simulator_url)
    if not providers:
        raise ConfigError(f"{table.source}: providers: at least one provider is required")
    return providers


PROVIDER_KEYS = (
    "api",
    "base_url",
    "key_env",
    "limits",
    "shared_quota",
    "models",
    "timeout_s",
    "connect_timeout_s",
    "daily_reset",
    "headers",
    "max_tokens_field",
    "signals",
    "circuit",
    "worker_concurrency",
    "batch",
)


def _provider(name: str, t: Table, simulator_url: str | None) -> ProviderConfig:
    api = t.pop_str("api")
    if api not in ADAPTERS:
        raise t.error("api", f"unknown wire format (known: {', '.join(sorted(ADAPTERS))})", api)
    base_url = t.pop_str("base_url").rstrip("/")
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise t.error("base_url", "expected an http:// or https:// URL", base_url)
    if simulator_url:
        base_url = simulated_base_url(simulator_url, name, base_url)
    key_env = t.pop_str("key_env", None)
    signals = t.pop_str("signals", api)
    if signals not in SIGNAL_PARSERS:
        raise t.error(
            "signals",
            f"unknown rate-limit header style (known: {', '.join(sorted(SIGNAL_PARSERS))})",
            signals,
        )
    headers = t.pop_table("headers")
    header_values = {k: headers.pop_str(k) for k in headers.names()}
    circuit_t = t.pop_table("circuit")
    circuit = Circuit(
        failures=circuit_t.pop_int("failures", constants.CIRCUIT_FAILURES),
        probe_after_s=circuit_t.pop_number("probe_after_s", constants.CIRCUIT_PROBE_S, minimum=0.1),
        cooldown_s=circuit_t.pop_number("cooldown_s", constants.CIRCUIT_COOLDOWN_S, minimum=0.1),
    )
    circuit_t.done(known=("failures", "probe_after_s", "cooldown_s"))
    config = ProviderConfig(
        name=name,
        api=api,
        base_url=base_url,
        key_env=key_env,
        limits=_limits(t.pop_table("limits")),
        shared_quota=t.pop_bool("shared_quota", False),
        timeout_s=t.pop_number("timeout_s", 60.0, minimum=0.1),
        connect_timeout_s=t.pop_number("connect_timeout_s", 5.0, minimum=0.1),
        daily_reset=_daily_reset(t, "daily_reset"),
        headers=header_values,
        max_tokens_field=t.pop_str(
            "max_tokens_field", "max_tokens", choices=("max_tokens", "max_completion_tokens")
        ),
        signals=signals,
        circuit=circuit,
        worker_concurrency=t.pop_int("worker_concurrency", None),
        batch=_batch_api(t, api),
        models=_models(t.pop_table("models", required=True)),
    )
    t.done(known=PROVIDER_KEYS)
    return config


def _batch_api(t: Table, api: str) -> BatchApi | None:
    if "batch" not in t.names():
        return None
    if api not in BATCH_APIS:
        raise t.error("batch", f"a batch API for the {api} wire format (known: {', '.join(BATCH_APIS)})")
    b = t.pop_table("batch")
    default = BatchApi()
    config = BatchApi(
        discount=b.pop_number("discount", default.discount, minimum=0.01, maximum=1.0),
        turnaround_s=b.pop_number("turnaround_s", default.turnaround_s, minimum=1),
        collect_s=b.pop_number("collect_s", default.collect_s, minimum=0.1, maximum=300),
        max_requests=b.pop_int("max_requests", default.max_requests, minimum=1),
        queue_tokens=b.pop_int("queue_tokens", None, minimum=1),
        poll_s=b.pop_number("poll_s", default.poll_s, minimum=0.1, maximum=600),
    )
    b.done(known=("discount", "turnaround_s", "collect_s", "max_requests", "queue_tokens", "poll_s"))
    return config


def _models(table: Table) -> dict[str, ModelConfig]:
    models = {}
    for name, t in table.subtables():
        models[name] = ModelConfig(
            name=name,
            input_per_mtok=t.pop_number("input_per_mtok", 0.0),
            output_per_mtok=t.pop_number("output_per_mtok", 0.0),
            limits=_limits(t.pop_table("limits")),
            max_output_tokens=t.pop_int("max_output_tokens", None),
        )
        t.done(known=("input_per_mtok", "output_per_mtok", "limits", "max_output_tokens"))
    if not models:
        raise ConfigError(f"{table.source}: {table.path}: at least one model is required")
    return models


def _tiers(table: Table) -> dict[str, TierConfig]:
    if not table.names():
        return {name: TierConfig(name, priority) for name, priority in DEFAULT_TIERS.items()}
    tiers = {}
    for name, t in table.subtables():
        tiers[name] = TierConfig(
            name=name,
            priority=t.pop_int("priority", 1, minimum=0),
            budget_share=t.pop_number("budget_share", 1.0, minimum=0.01, maximum=1.0),
        )
        t.done(known=("priority", "budget_share"))
    return tiers


def _routes(
    table: Table, providers: dict[str, ProviderConfig], tiers: dict[str, TierConfig]
) -> dict[str, dict[str, Chain]]:
    routes: dict[str, dict[str, Chain]] = {}
    for task, t in table.subtables():
        strategy = _strategy(t, "strategy", "ordered")
        mode = t.pop_str("mode", "sync", choices=MODES)
        cache_ttl_s = t.pop_number("cache_ttl_s", None, minimum=1)
        across = t.pop_bool("cache_across_tiers", False)
        chains = {}
        for tier in t.names():
            path = key_path(t.path, tier)
            if tier not in tiers:
                raise ConfigError(
                    f"{t.source}: {path}: unknown tier {shown(tier)} (known: {', '.join(tiers)})"
                )
            value = t.pop_raw(tier)
            if isinstance(value, dict):
                sub = Table(value, path, t.source)
                names = sub.pop_str_list("chain")
                chains[tier] = Chain(
                    _candidates(sub, "chain", names, providers),
                    _strategy(sub, "strategy", strategy),
                    sub.pop_number("cache_ttl_s", cache_ttl_s, minimum=1),
                    across,
                    sub.pop_str("mode", mode, choices=MODES),
                )
                sub.done(known=("chain", "strategy", "cache_ttl_s", "mode"))
            else:
                names = _str_list(t, tier, value)
                chains[tier] = Chain(
                    _candidates(t, tier, names, providers), strategy, cache_ttl_s, across, mode
                )
        if not chains:
            raise ConfigError(f"{t.source}: {t.path}: a route needs a chain for at least one tier")
        routes[task] = chains
    return routes


def _strategy(t: Table, key: str, default: str) -> str:
    name = t.pop_str(key, default)
    if name not in STRATEGIES:
        raise t.error(key, f"unknown strategy (known: {', '.join(STRATEGIES)})", name)
    return name


def _str_list(t: Table, key: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise t.error(key, 'expected a list of "provider:model" strings', value)
    return value


def _candidates(
    t: Table, key: str, names: list[str], providers: dict[str, ProviderConfig]
) -> tuple[Candidate, ...]:
    out = []
    for name in names:
        provider, sep, model = name.partition(":")
        if not sep or not model:
            raise t.error(key, 'expected "provider:model" entries', name)
        if provider not in providers:
            raise t.error(key, f"unknown provider {shown(provider)} (known: {', '.join(providers)})")
        if model not in providers[provider].models:
            known = ", ".join(providers[provider].models)
            raise t.error(key, f"unknown model {shown(model)} of provider {provider} (known: {known})")
        out.append(Candidate(provider, model))
    if not out:
        raise t.error(key, "expected at least one provider:model")
    return tuple(out)


def simulated_base_url(simulator_url: str, provider: str, base_url: str) -> str:
    """Where the simulator serves a provider: ``<simulator>/<provider><original path>``."""
    return f"{simulator_url.rstrip('/')}/{provider}{urlsplit(base_url).path}".rstrip("/")
