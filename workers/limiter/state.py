"""The limiter's state, typed: the buckets configured for a provider:model, and one provider's
accounts as `inspect.lua` saw them — parsed from its JSON here, and nowhere else.

The Lua scripts still take bucket specs as plain lists (`BucketSpec.as_lua`); see the
contract atop `lua/common.lua`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from workers import constants

if TYPE_CHECKING:
    from workers.config import Candidate
    from workers.keys import ApiKey


class Scope(IntEnum):
    """Which hash of an account holds a bucket (and the order of an account's KEYS in every script)."""

    ACCOUNT = 1  # the account's "*" hash: every model of the account draws on it
    MODEL = 2  # the account's hash for one model


class Kind(IntEnum):
    ROLLING = 0  # refills continuously, `capacity` every `period_ms`
    DAILY = 1  # a window that starts again at the provider's daily reset


#: field -> (kind, period_ms, the unit a job spends of it)
DIMENSIONS: dict[str, tuple[Kind, int, str]] = {
    "rpm": (Kind.ROLLING, 60_000, "requests"),
    "tpm": (Kind.ROLLING, 60_000, "tokens"),
    "itpm": (Kind.ROLLING, 60_000, "input"),
    "otpm": (Kind.ROLLING, 60_000, "output"),
    "rpd": (Kind.DAILY, constants.DAY_MS, "requests"),
    "tpd": (Kind.DAILY, constants.DAY_MS, "tokens"),
}


@dataclass(frozen=True)
class BucketSpec:
    """One configured limit: where it lives, what it counts and how it comes back."""

    scope: Scope
    field: str  # "rpm", "tpd", …: the hash field prefix
    kind: Kind
    capacity: float  # as configured; a lower limit learned from the provider wins in Redis
    period_ms: int
    unit: str  # "requests" | "tokens" | "input" | "output"

    @classmethod
    def configured(cls, scope: Scope, name: str, capacity: float) -> BucketSpec:
        kind, period_ms, unit = DIMENSIONS[name]
        return cls(scope, name, kind, capacity, period_ms, unit)

    def as_lua(self) -> list[Any]:
        """The list the scripts take: {scope, field, kind, capacity, period_ms, unit}."""
        return [int(self.scope), self.field, int(self.kind), self.capacity, self.period_ms, self.unit]


@dataclass(frozen=True)
class BucketState:
    """A bucket now: what is available and its effective capacity (a learned limit included)."""

    spec: BucketSpec
    avail: float
    cap: float

    @property
    def field(self) -> str:
        return self.spec.field

    @property
    def scope(self) -> Scope:
        return self.spec.scope


@dataclass(frozen=True)
class AccountState:
    """One key's account as the limiter sees it. Times are epoch milliseconds (0: never set)."""

    key_id: str
    account: str
    disabled: str | None  # why the key is disabled, or None
    blocked_until_ms: int  # the latest block of either scope (it may lie in the past)
    blocked_why: str
    open_until_ms: int  # circuit breaker: open until then; set and past: half-open (probing)
    probe_until_ms: int
    fails: int  # failures in a row
    in_flight: int  # leases not yet expired
    buckets: tuple[BucketState, ...] = ()
    input_ratio: float = 1.0  # real input tokens per estimated one, learned from settled calls

    def usable_from_ms(self, now_ms: int) -> int:
        """When a block or an open circuit lets it take work again (`now_ms` if it can now)."""
        open_until = self.open_until_ms if self.open_until_ms > now_ms else 0
        return max(now_ms, self.blocked_until_ms, open_until)


@dataclass(frozen=True)
class Snapshot:
    """One provider:model as `inspect.lua` saw it: its buckets, accounts and queued work."""

    candidate: Candidate
    keys: tuple[ApiKey, ...]
    buckets: tuple[BucketSpec, ...]
    now_ms: int
    next_reset_ms: int
    pending: dict[str, float]  # "<model>|<unit>" -> work queued for this provider
    accounts: tuple[AccountState, ...] = field(default=())

    @classmethod
    def parse(
        cls, candidate: Candidate, keys: Sequence[ApiKey], buckets: Sequence[BucketSpec], raw: str | bytes
    ) -> Snapshot:
        """Read inspect.lua's JSON. (cjson writes an empty list as ``{}``.)"""
        data = json.loads(raw)
        accounts = _list(data["accounts"])
        return cls(
            candidate,
            tuple(keys),
            tuple(buckets),
            int(data["now"]),
            int(data["next_reset"]),
            {str(k): float(v) for k, v in data["pending"].items()}
            if isinstance(data["pending"], dict)
            else {},
            tuple(_account(key, a, buckets) for key, a in zip(keys, accounts, strict=True)),
        )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _account(key: ApiKey, a: dict[str, Any], specs: Sequence[BucketSpec]) -> AccountState:
    return AccountState(
        key_id=key.key_id,
        account=key.account,
        disabled=a["disabled"] or None,
        blocked_until_ms=int(a["blocked_until"]),
        blocked_why=a["blocked_why"],
        open_until_ms=int(a["open_until"]),
        probe_until_ms=int(a["probe_until"]),
        fails=int(a["fails"]),
        in_flight=int(a["in_flight"]),
        input_ratio=float(a.get("in_ratio", 1)),
        buckets=tuple(
            BucketState(spec, float(b["avail"]), float(b["cap"]))
            for spec, b in zip(specs, _list(a["buckets"]), strict=True)
        ),
    )
