"""The token-bucket limiter in Redis: every provider account's quota, shared by all processes.

Buckets are keyed by (provider, account, model or ``*``, dimension); all keys of one
provider share the hash tag ``{provider}`` so each script stays valid on Redis Cluster.
Each operation is one Lua script (``lua/*.lua``), one round trip, with time from Redis
``TIME`` plus an offset that tests move (`Clock`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis

from workers import constants
from workers.config import Candidate, ProviderConfig, Settings
from workers.errors import ServiceUnavailable
from workers.keys import ApiKey, KeyRing
from workers.providers.signals import RateLimitSignal, Window

# field -> (kind: 0 rolling / 1 daily, period_ms, unit a job spends)
DIMENSIONS: dict[str, tuple[int, int, str]] = {
    "rpm": (0, 60_000, "requests"),
    "tpm": (0, 60_000, "tokens"),
    "itpm": (0, 60_000, "input"),
    "otpm": (0, 60_000, "output"),
    "rpd": (1, constants.DAY_MS, "requests"),
    "tpd": (1, constants.DAY_MS, "tokens"),
}
ACCOUNT_SCOPE, MODEL_SCOPE = 1, 2
NEVER_S = 1e12


@dataclass
class Clock:
    """Redis TIME plus `offset_ms`; tests move it with `advance`."""

    offset_ms: int = 0

    def advance(self, seconds: float) -> None:
        self.offset_ms += int(seconds * 1000)


@dataclass(frozen=True)
class Costs:
    """What one job spends of each unit."""

    requests: float = 1
    tokens: float = 0
    input: float = 0
    output: float = 0

    @classmethod
    def estimate(cls, input_tokens: int, max_tokens: int) -> Costs:
        return cls(1, input_tokens + max_tokens, input_tokens, max_tokens)

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "tokens": self.tokens, "input": self.input, "output": self.output}

    def __add__(self, other: Costs) -> Costs:
        return Costs(
            self.requests + other.requests,
            self.tokens + other.tokens,
            self.input + other.input,
            self.output + other.output,
        )


@dataclass(frozen=True)
class Lease:
    lease_id: str
    provider: str
    model: str
    key: ApiKey
    now_ms: int
    crossed: tuple[str, ...] = ()  # daily quotas this debit took past 90%: "rpd:901:1000"


@dataclass(frozen=True)
class Settled:
    blocked_until_s: float  # 0 if the account is not blocked
    newly_disabled: bool  # this settle disabled the key (the first of its rejected calls)


@dataclass(frozen=True)
class Denied:
    """Nothing admits the job now; `wait_s` until the earliest account could (`never`: none will)."""

    wait_s: float
    why: str
    now_ms: int

    @property
    def never(self) -> bool:
        return self.why.startswith("never:")


@dataclass(frozen=True)
class Snapshot:
    """One provider:model as `inspect.lua` saw it."""

    candidate: Candidate
    keys: list[ApiKey]
    buckets: list[list[Any]]
    now_ms: int
    next_reset_ms: int
    pending: dict[str, float]
    accounts: list[dict[str, Any]] = field(default_factory=list)


def _script_text(name: str) -> str:
    folder = resources.files("workers.limiter") / "lua"
    common = (folder / "common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


class Limiter:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        keyring: KeyRing,
        *,
        clock: Clock | None = None,
        prefix: str = constants.KEY_PREFIX,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.keyring = keyring
        self.clock = clock or Clock()
        self.prefix = prefix
        self._acquire = client.register_script(_script_text("acquire"))
        self._settle = client.register_script(_script_text("settle"))
        self._inspect = client.register_script(_script_text("inspect"))
        self._buckets: dict[Candidate, list[list[Any]]] = {}

    # -- key names and bucket specs ---------------------------------------------------------

    def key(self, provider: str, *parts: str) -> str:
        return ":".join((self.prefix, f"{{{provider}}}", *parts))

    def account_keys(self, provider: str, account: str, model: str) -> list[str]:
        return [
            self.key(provider, "a", account, "b", "*"),
            self.key(provider, "a", account, "b", model),
            self.key(provider, "a", account, "leases"),
            self.key(provider, "a", account, "state"),
        ]

    def buckets(self, candidate: Candidate) -> list[list[Any]]:
        """[scope, field, kind, capacity, period_ms, unit] for every configured limit."""
        if candidate not in self._buckets:
            provider = self.settings.providers[candidate.provider]
            model = provider.models[candidate.model]
            specs = []
            for scope, limits in ((ACCOUNT_SCOPE, provider.limits), (MODEL_SCOPE, model.limits)):
                for name, value in limits.items():
                    if name in DIMENSIONS:
                        kind, period, unit = DIMENSIONS[name]
                        specs.append([scope, name, kind, value, period, unit])
            self._buckets[candidate] = specs
        return self._buckets[candidate]

    def _concurrency(self, candidate: Candidate) -> int:
        provider = self.settings.providers[candidate.provider]
        values = [
            v for v in (provider.limits.concurrency, provider.models[candidate.model].limits.concurrency) if v
        ]
        return min(values) if values else 0

    def _accounts(self, candidate: Candidate, keys: list[ApiKey]) -> list[dict[str, Any]]:
        buckets, concurrency = self.buckets(candidate), self._concurrency(candidate)
        return [{"key_id": k.key_id, "concurrency": concurrency, "buckets": buckets} for k in keys]

    def _day_shift_ms(self, provider: ProviderConfig) -> int:
        # The zone's UTC offset only changes at a DST switch (never near midnight), so this
        # process's clock is good enough here and saves a round trip; the scripts use Redis TIME.
        return provider.daily_reset.offset_ms(time.time() + self.clock.offset_ms / 1000)

    def _run(self, script: Any, keys: list[str], spec: dict[str, Any], client: Any = None) -> Any:
        try:
            return script(keys=keys, args=[json.dumps(spec)], client=client)
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc

    # -- operations ---------------------------------------------------------------------------

    def now_s(self) -> float:
        """Redis time plus the clock's offset: the one clock every process shares."""
        try:
            seconds, micros = self.redis.time()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc
        return seconds + micros / 1e6 + self.clock.offset_ms / 1000

    def acquire(
        self,
        candidate: Candidate,
        costs: Costs,
        *,
        share: float = 1.0,
        lease_ttl_s: float,
        dequeue: Costs | None = None,
    ) -> Lease | Denied:
        """Debit every bucket of one account at once (all or none) and take a lease."""
        provider = self.settings.providers[candidate.provider]
        keys = self.keyring.keys(candidate.provider)
        lease_id = uuid.uuid4().hex
        redis_keys = [
            self.key(provider.name, "disabled"),
            self.key(provider.name, "pending"),
            self.key(provider.name, "lease", lease_id),
        ]
        for k in keys:
            redis_keys += self.account_keys(provider.name, k.account, candidate.model)
        spec = {
            "offset_ms": self.clock.offset_ms,
            "day_shift_ms": self._day_shift_ms(provider),
            "lease_id": lease_id,
            "lease_ttl_ms": int(lease_ttl_s * 1000),
            "probe_ttl_ms": int((provider.timeout_s + self.settings.lease_margin_s) * 1000),
            "share": share,
            "costs": costs.as_dict(),
            "dequeue": self._pending_fields(candidate.model, dequeue) if dequeue else None,
            "accounts": self._accounts(candidate, keys),
        }
        result = self._run(self._acquire, redis_keys, spec)
        if result[0] == 1:
            crossed = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in result[3] or ())
            return Lease(
                lease_id, candidate.provider, candidate.model, keys[result[1] - 1], result[2], crossed
            )
        why = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
        return Denied(result[1] / 1000, why, result[3])

    def settle(
        self,
        lease: Lease,
        *,
        actual: Costs | None,
        outcome: str,
        signal: RateLimitSignal | None = None,
        block_s: float | None = None,
        block_why: str = "",
        block_account: bool = False,
        disable_why: str | None = None,
    ) -> Settled:
        """Charge real usage and release the lease (once); apply what the provider said."""
        candidate = Candidate(lease.provider, lease.model)
        provider = self.settings.providers[lease.provider]
        redis_keys = [
            self.key(provider.name, "lease", lease.lease_id),
            *self.account_keys(provider.name, lease.key.account, lease.model),
            self.key(provider.name, "disabled"),
        ]
        spec = {
            "offset_ms": self.clock.offset_ms,
            "day_shift_ms": self._day_shift_ms(provider),
            "lease_id": lease.lease_id,
            "actual": actual.as_dict() if actual else None,
            "outcome": outcome,
            "circuit": {
                "failures": provider.circuit.failures,
                "cooldown_ms": int(provider.circuit.cooldown_s * 1000),
            },
            "block": None
            if block_s is None
            else {
                "scope": ACCOUNT_SCOPE if block_account else MODEL_SCOPE,
                "ms": max(0, int(block_s * 1000)),
                "why": block_why,
            },
            "disable": None if disable_why is None else {"key_id": lease.key.key_id, "why": disable_why},
            "observe": self.observations(candidate, signal) if signal else [],
        }
        result = self._run(self._settle, redis_keys, spec)
        return Settled(blocked_until_s=result[1] / 1000, newly_disabled=bool(result[3]))

    def observations(self, candidate: Candidate, signal: RateLimitSignal) -> list[list[Any]]:
        """Each window the provider reported, matched to the configured bucket it describes."""
        by_field = {spec[1]: spec for spec in self.buckets(candidate)}
        out = []
        for window in signal.windows:
            name = _field_for(window, by_field, signal.received_at_s)
            if name is not None:
                out.append([*by_field[name], window.remaining, window.limit])
        return out

    def snapshots(self, candidates: list[Candidate]) -> dict[Candidate, Snapshot]:
        """Every candidate's state in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        plans = []
        for candidate in candidates:
            provider = self.settings.providers[candidate.provider]
            keys = self.keyring.keys(candidate.provider)
            redis_keys = [self.key(provider.name, "disabled"), self.key(provider.name, "pending")]
            for k in keys:
                redis_keys += self.account_keys(provider.name, k.account, candidate.model)
            spec = {
                "offset_ms": self.clock.offset_ms,
                "day_shift_ms": self._day_shift_ms(provider),
                "accounts": self._accounts(candidate, keys),
            }
            self._run(self._inspect, redis_keys, spec, client=pipe)
            plans.append((candidate, keys))
        try:
            results = pipe.execute()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc
        out = {}
        for (candidate, keys), raw in zip(plans, results, strict=True):
            data = json.loads(raw)
            out[candidate] = Snapshot(
                candidate,
                keys,
                self.buckets(candidate),
                int(data["now"]),
                int(data["next_reset"]),
                data["pending"] if isinstance(data["pending"], dict) else {},
                data["accounts"] if isinstance(data["accounts"], list) else [],
            )
        return out

    def add_pending(self, placed: dict[Candidate, Costs]) -> None:
        """Count work queued for a provider (placement reads it; acquire takes it off)."""
        pipe = self.redis.pipeline(transaction=False)
        for candidate, costs in placed.items():
            key = self.key(candidate.provider, "pending")
            for name, amount in self._pending_fields(candidate.model, costs).items():
                pipe.hincrbyfloat(key, name, amount)
            pipe.expire(key, constants.PENDING_TTL_S)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc

    @staticmethod
    def _pending_fields(model: str, costs: Costs) -> dict[str, float]:
        return {f"{model}|{unit}": amount for unit, amount in costs.as_dict().items() if amount}


def _field_for(window: Window, by_field: dict[str, list[Any]], now_s: float) -> str | None:
    """Which configured bucket a reported window describes (OpenAI does not say the period)."""
    minute, day = {
        "requests": ("rpm", "rpd"),
        "tokens": ("tpm", "tpd"),
        "input_tokens": ("itpm", None),
        "output_tokens": ("otpm", None),
    }[window.unit]
    period = window.period
    if period == "unknown":
        limits = {name: by_field[name][3] for name in (minute, day) if name in by_field}
        matches = [name for name, cap in limits.items() if cap == window.limit]
        if len(matches) == 1:
            return matches[0]
        reset_in = (window.reset_at_s or now_s) - now_s
        period = "day" if reset_in > 61 else "minute"
    name = minute if period == "minute" else day
    return name if name in by_field else None
