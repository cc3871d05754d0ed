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
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from redis.cluster import RedisCluster

from workers import constants
from workers.config import Candidate, ProviderConfig, Settings
from workers.errors import ServiceUnavailable
from workers.keys import ApiKey, KeyRing
from workers.keyspace import Keyspace
from workers.limiter.state import DIMENSIONS, BucketSpec, Scope, Snapshot
from workers.limiter.wait import Wait
from workers.providers.signals import RateLimitSignal, Window

#: How acquire.lua says waiting cannot help (its `why` starts with it); `acquire` turns it into
#: `Wait.never`, so nothing past this module sees the prefix.
NEVER_PREFIX = "never:"
#: Why a redeemed reservation is not admitted yet: its time is a moment away (acquire.lua).
RESERVED = "reserved"


@dataclass
class Clock:
    """Redis TIME plus `offset_ms`; tests move it with `advance`, or stop it: with `stopped_ms`
    set, every script's time is that plus the offset, and only `advance` moves it."""

    offset_ms: int = 0
    stopped_ms: int | None = None

    def advance(self, seconds: float) -> None:
        self.offset_ms += int(seconds * 1000)

    def spec(self) -> dict[str, int]:
        """What every script is told about the clock."""
        if self.stopped_ms is None:
            return {"offset_ms": self.offset_ms}
        return {"offset_ms": self.offset_ms, "stopped_ms": self.stopped_ms}

    def local_now_s(self) -> float:
        """This process's reading of the same clock (no round trip; its own time, not Redis's)."""
        if self.stopped_ms is not None:
            return (self.stopped_ms + self.offset_ms) / 1000
        return time.time() + self.offset_ms / 1000


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
    charges: str = "[]"  # what acquire charged (its JSON), for settle to refund against
    probe: bool = False  # this call is the half-open circuit's probe
    in_ratio: str = "1"  # the model's learned input ratio when the lease was taken


@dataclass(frozen=True)
class Reserved:
    """Budget taken now for a call at `ready_at_s` (the shared clock's epoch seconds), `wait_s`
    from the decision; `reservation_id` redeems it (`Limiter.acquire(reservation=...)`)."""

    reservation_id: str
    candidate: Candidate
    ready_at_s: float
    wait_s: float


@dataclass(frozen=True)
class Settled:
    blocked_until_s: float  # 0 if the account is not blocked
    newly_disabled: bool  # this settle disabled the key (the first of its rejected calls)
    recovered: bool = False  # this call closed an open circuit: the provider is back
    reprobe_at_s: float = 0.0  # this call was a probe that failed: the next one is due then


@dataclass(frozen=True)
class Denied:
    """Nothing admits the job now: `wait` until the earliest account could (`Wait.never`: none will)."""

    wait: Wait
    now_ms: int

    @property
    def wait_s(self) -> float:
        return self.wait.seconds

    @property
    def why(self) -> str:
        return self.wait.why

    @property
    def never(self) -> bool:
        return self.wait.is_never


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
        keys: Keyspace | None = None,
    ) -> None:
        self.redis = client
        self.settings = settings
        self.keyring = keyring
        self.clock = clock or Clock()
        self.keys = keys or Keyspace()
        self._acquire = client.register_script(_script_text("acquire"))
        self._settle = client.register_script(_script_text("settle"))
        self._inspect = client.register_script(_script_text("inspect"))
        self._buckets: dict[Candidate, tuple[BucketSpec, ...]] = {}
        # What the scripts take for a candidate's accounts, built once (the hot path sends it).
        self._lua_specs: dict[Candidate, tuple[list[list[Any]], int]] = {}
        self._pending_kept: dict[str, float] = {}  # pending hash -> when its TTL was renewed

    # -- bucket specs -----------------------------------------------------------------------

    def buckets(self, candidate: Candidate) -> tuple[BucketSpec, ...]:
        """Every configured limit of a provider:model: the account's, then the model's."""
        if candidate not in self._buckets:
            provider = self.settings.providers[candidate.provider]
            model = provider.models[candidate.model]
            self._buckets[candidate] = tuple(
                BucketSpec.configured(scope, name, value)
                for scope, limits in ((Scope.ACCOUNT, provider.limits), (Scope.MODEL, model.limits))
                for name, value in limits.items()
                if name in DIMENSIONS
            )
        return self._buckets[candidate]

    def concurrency_limit(self, candidate: Candidate) -> int:
        """Calls one account may have in flight on this model (0: no limit)."""
        provider = self.settings.providers[candidate.provider]
        values = [
            v for v in (provider.limits.concurrency, provider.models[candidate.model].limits.concurrency) if v
        ]
        return min(values) if values else 0

    def _accounts(self, candidate: Candidate, keys: list[ApiKey]) -> list[dict[str, Any]]:
        if candidate not in self._lua_specs:
            specs = [spec.as_lua() for spec in self.buckets(candidate)]
            self._lua_specs[candidate] = (specs, self.concurrency_limit(candidate))
        buckets, concurrency = self._lua_specs[candidate]
        return [{"key_id": k.key_id, "concurrency": concurrency, "buckets": buckets} for k in keys]

    def _day_shift_ms(self, provider: ProviderConfig) -> int:
        # The zone's UTC offset only changes at a DST switch (never near midnight), so this
        # process's clock is good enough here and saves a round trip; the scripts use Redis TIME.
        return provider.daily_reset.offset_ms(self.clock.local_now_s())

    def _run(self, script: Any, keys: list[str], spec: dict[str, Any]) -> Any:
        try:
            return script(keys=keys, args=[json.dumps(spec)])
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc

    # -- operations ---------------------------------------------------------------------------

    def now_s(self) -> float:
        """Redis time plus the clock's offset: the one clock every process shares."""
        if self.clock.stopped_ms is not None:
            return self.clock.local_now_s()
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
        reservation: str | None = None,
    ) -> Lease | Denied:
        """Debit every bucket of one account at once (all or none) and take a lease. With the
        id of this job's `reservation`, the lease takes what it reserved (no second debit)."""
        result, keys, lease_id = self._acquire_script(
            candidate, costs, share, lease_ttl_s, dequeue, reservation=reservation
        )
        if result[0] == 1:
            crossed = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in result[3] or ())
            charges = result[4].decode() if isinstance(result[4], bytes) else str(result[4])
            return Lease(
                lease_id,
                candidate.provider,
                candidate.model,
                keys[result[1] - 1],
                result[2],
                crossed,
                charges,
                bool(result[5]),
                result[6].decode() if isinstance(result[6], bytes) else str(result[6]),
            )
        return self._denied(result)

    def reserve(
        self,
        candidate: Candidate,
        costs: Costs,
        *,
        share: float = 1.0,
        within_s: float,
        lease_ttl_s: float,
    ) -> Reserved | Denied:
        """Debit the account whose budget is back soonest, for a call at the time it is back —
        if that is within `within_s` (else Denied with the wait). The job then waits once, for
        that time, and redeems the reservation with `acquire(reservation=...)`."""
        reservation = uuid.uuid4().hex
        result, _, _ = self._acquire_script(
            candidate, costs, share, lease_ttl_s, None, reservation=reservation, within_s=within_s
        )
        if result[0] == 2:
            return Reserved(reservation, candidate, result[2] / 1000, (result[2] - result[3]) / 1000)
        return self._denied(result)

    def release(self, candidate: Candidate, reservation: str) -> bool:
        """Give back what `reservation` took, for a job that will not redeem it (cancelled, or
        final by its turn): later jobs need not wait behind it. False: nothing was there (it
        was redeemed, given back, or expired)."""
        result, _, _ = self._acquire_script(
            candidate, Costs(0, 0, 0, 0), 1.0, 0.0, None, reservation=reservation, release=True
        )
        return bool(result[1])

    def _acquire_script(
        self,
        candidate: Candidate,
        costs: Costs,
        share: float,
        lease_ttl_s: float,
        dequeue: Costs | None,
        *,
        reservation: str | None,
        within_s: float | None = None,
        release: bool = False,
    ) -> tuple[Any, list[ApiKey], str]:
        provider = self.settings.providers[candidate.provider]
        keys = self.keyring.keys(candidate.provider)
        lease_id = uuid.uuid4().hex
        redis_keys = [self.keys.pending(provider.name)]
        for k in keys:
            redis_keys += self.keys.account(provider.name, k.account, candidate.model)
        spec = {
            **self.clock.spec(),
            "day_shift_ms": self._day_shift_ms(provider),
            "lease_id": lease_id,
            "lease_ttl_ms": int(lease_ttl_s * 1000),
            "probe_ttl_ms": int((provider.timeout_s + self.settings.lease_margin_s) * 1000),
            "probe_recheck_ms": int(constants.PROBE_RECHECK_S * 1000),
            "share": share,
            "costs": costs.as_dict(),
            "dequeue": self._pending_fields(candidate, dequeue) if dequeue else None,
            "accounts": self._accounts(candidate, keys),
            "margin_ms": int(self.settings.admission_margin_s * 1000),
        }
        if reservation is not None:
            redis_keys.append(self.keys.reservation(provider.name, reservation))
            spec["stale_ms"] = int(constants.RESERVATION_STALE_S * 1000)
            if within_s is None:
                spec["reservation"] = True
                if release:  # (a JSON null would be truthy in Lua)
                    spec["release"] = True
            else:
                spec["reserve_ms"] = int(within_s * 1000)
        return self._run(self._acquire, redis_keys, spec), keys, lease_id

    @staticmethod
    def _denied(result: Any) -> Denied:
        why = result[2].decode() if isinstance(result[2], bytes) else str(result[2])
        if why.startswith(NEVER_PREFIX):
            return Denied(Wait.never(why.removeprefix(NEVER_PREFIX)), result[3])
        return Denied(Wait(result[1] / 1000, why), result[3])

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
        learn_lower: bool = False,
        input_ratio: float | None = None,
    ) -> Settled:
        """Charge real usage and release the lease (once); apply what the provider said."""
        candidate = Candidate(lease.provider, lease.model)
        provider = self.settings.providers[lease.provider]
        redis_keys = list(self.keys.account(provider.name, lease.key.account, lease.model))
        spec = {
            **self.clock.spec(),
            "day_shift_ms": self._day_shift_ms(provider),
            "lease_id": lease.lease_id,
            "charges": lease.charges,
            "probe": int(lease.probe),
            "known_ratio": lease.in_ratio,
            "actual": actual.as_dict() if actual else None,
            "outcome": outcome,
            "circuit": {
                "failures": provider.circuit.failures,
                "probe_ms": int(provider.circuit.probe_after_s * 1000),
                "cooldown_ms": int(provider.circuit.cooldown_s * 1000),
            },
            "block": None
            if block_s is None
            else {
                "scope": int(Scope.ACCOUNT if block_account else Scope.MODEL),
                "ms": max(0, int(block_s * 1000)),
                "why": block_why,
            },
            "disable": None if disable_why is None else {"key_id": lease.key.key_id, "why": disable_why},
            "observe": self.observations(candidate, signal) if signal else [],
            # a 429 that names no limits: halve them (at most once a second), then recover slowly
            "decrease": {"factor": 0.5, "gap_ms": 1000} if learn_lower else None,
            # real / estimated input tokens of this call: later estimates learn from it
            "input_ratio": input_ratio,
        }
        result = self._run(self._settle, redis_keys, spec)
        return Settled(
            blocked_until_s=result[1] / 1000,
            newly_disabled=bool(result[3]),
            recovered=bool(result[4]),
            reprobe_at_s=result[5] / 1000,
        )

    def observations(self, candidate: Candidate, signal: RateLimitSignal) -> list[list[Any]]:
        """Each window the provider reported, matched to the configured bucket it describes."""
        by_field = {spec.field: spec for spec in self.buckets(candidate)}
        out = []
        for window in signal.windows:
            name = _field_for(window, by_field, signal.received_at_s)
            if name is not None:
                out.append([*by_field[name].as_lua(), window.remaining, window.limit])
        return out

    def snapshots(self, candidates: list[Candidate]) -> dict[Candidate, Snapshot]:
        """Every candidate's state in one pipelined round trip (on Redis Cluster, which pipelines
        no scripts, one script call per candidate: each touches one provider's slot)."""
        calls = {c: self._inspect_call(c) for c in candidates}
        if isinstance(self.redis, RedisCluster):
            results = [self._run(self._inspect, redis_keys, spec) for _, redis_keys, spec in calls.values()]
        elif len(calls) == 1:
            [(_, redis_keys, spec)] = calls.values()
            results = [self._run(self._inspect, redis_keys, spec)]
        else:
            results = self._inspect_pipelined([(k, s) for _, k, s in calls.values()])
        return {
            candidate: Snapshot.parse(candidate, keys, self.buckets(candidate), raw)
            for (candidate, (keys, _, _)), raw in zip(calls.items(), results, strict=True)
        }

    def _inspect_pipelined(self, calls: list[tuple[list[str], dict[str, Any]]]) -> list[Any]:
        """EVALSHA each call in one round trip. (redis-py's script pipelines send a SCRIPT
        EXISTS first, every time; here the script is loaded only when Redis says it lacks it.)"""
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for redis_keys, spec in calls:
                pipe.evalsha(self._inspect.sha, len(redis_keys), *redis_keys, json.dumps(spec))
            try:
                results = pipe.execute(raise_on_error=False)
                missing = any(isinstance(r, redis.exceptions.NoScriptError) for r in results)
                if not missing:
                    for r in results:
                        if isinstance(r, Exception):
                            raise r
                    return results
                if attempt == 0:
                    self.redis.script_load(self._inspect.script)  # a Redis that restarted empty
            except redis.RedisError as exc:
                raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc
        raise ServiceUnavailable("the limiter's Redis lost its inspect script twice in a row")

    def _inspect_call(self, candidate: Candidate) -> tuple[list[ApiKey], list[str], dict[str, Any]]:
        """The keys, Redis keys and spec of one `inspect.lua` call."""
        provider = self.settings.providers[candidate.provider]
        keys = self.keyring.keys(candidate.provider)
        redis_keys = [self.keys.pending(provider.name)]
        for k in keys:
            redis_keys += self.keys.account(provider.name, k.account, candidate.model)
        spec = {
            **self.clock.spec(),
            "day_shift_ms": self._day_shift_ms(provider),
            "accounts": self._accounts(candidate, keys),
        }
        return keys, redis_keys, spec

    def add_pending(self, placed: dict[Candidate, Costs]) -> None:
        """Count work queued for a provider (placement reads it; acquire takes it off). The
        hash expires after PENDING_TTL_S without new work; its TTL is renewed once a minute
        per process, not on every job."""
        pipe = self.redis.pipeline(transaction=False)
        now = time.monotonic()
        for candidate, costs in placed.items():
            key = self.keys.pending(candidate.provider)
            for name, amount in self._pending_fields(candidate, costs).items():
                pipe.hincrbyfloat(key, name, amount)
            if self._pending_kept.get(key, -1e9) + 60 < now:
                pipe.expire(key, constants.PENDING_TTL_S)
                self._pending_kept[key] = now
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"the limiter's Redis does not answer: {exc}") from exc

    def _pending_fields(self, candidate: Candidate, costs: Costs) -> dict[str, float]:
        """Queued work in the units the candidate's buckets count (no bucket, no field)."""
        units = {spec.unit for spec in self.buckets(candidate)}
        return {
            f"{candidate.model}|{unit}": amount
            for unit, amount in costs.as_dict().items()
            if amount and unit in units
        }


def _field_for(window: Window, by_field: dict[str, BucketSpec], now_s: float) -> str | None:
    """Which configured bucket a reported window describes (OpenAI does not say the period)."""
    minute, day = {
        "requests": ("rpm", "rpd"),
        "tokens": ("tpm", "tpd"),
        "input_tokens": ("itpm", None),
        "output_tokens": ("otpm", None),
    }[window.unit]
    period = window.period
    if period == "unknown":
        limits = {name: by_field[name].capacity for name in (minute, day) if name in by_field}
        matches = [name for name, cap in limits.items() if cap == window.limit]
        if len(matches) == 1:
            return matches[0]
        reset_in = (window.reset_at_s or now_s) - now_s
        period = "day" if reset_in > 61 else "minute"
    name = minute if period == "minute" else day
    return name if name in by_field else None
