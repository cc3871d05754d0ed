"""The simulated provider's own quota: per-key (or per-organization) buckets, as the real
providers enforce them — continuous refill per minute, windows per day, parallel calls."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from workers.config import DailyReset, Limits

DAY_S = 86_400.0
# limit name -> (unit, period_s or None for a daily window)
DIMENSIONS = {
    "rpm": ("requests", 60.0),
    "tpm": ("tokens", 60.0),
    "itpm": ("input", 60.0),
    "otpm": ("output", 60.0),
    "rpd": ("requests", None),
    "tpd": ("tokens", None),
}


@dataclass
class Bucket:
    name: str
    unit: str
    limit: int
    period_s: float | None  # None: a daily window
    level: float = 0.0  # rolling: units available; daily: units used
    stamp: float = 0.0  # rolling: time of `level`; daily: window number

    def __post_init__(self) -> None:
        self.level = float(self.limit) if self.period_s else 0.0

    def available(self, now: float, window: int) -> float:
        if self.period_s is None:
            return self.limit - (self.level if self.stamp == window else 0.0)
        return min(self.limit, self.level + (now - self.stamp) * self.limit / self.period_s)

    def take(self, amount: float, now: float, window: int) -> None:
        if self.period_s is None:
            self.level = (self.level if self.stamp == window else 0.0) + amount
            self.stamp = window
        else:
            self.level = self.available(now, window) - amount
            self.stamp = now

    def seconds_until(self, amount: float, now: float, window_end: float, window: int) -> float:
        """How long until `amount` units are there."""
        missing = amount - self.available(now, window)
        if missing <= 0:
            return 0.0
        if self.period_s is None:
            return window_end - now
        return missing * self.period_s / self.limit

    def seconds_until_full(self, now: float, window_end: float, window: int) -> float:
        return self.seconds_until(self.limit, now, window_end, window)


@dataclass
class Refusal:
    bucket: Bucket
    requested: float
    retry_after_s: float


@dataclass
class Account:
    """The quota one key (or one organization) has with the simulated provider."""

    buckets: list[Bucket]
    concurrency: int | None
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_account(limits: Limits) -> Account:
    buckets = [
        Bucket(name, DIMENSIONS[name][0], value, DIMENSIONS[name][1])
        for name, value in limits.items()
        if name in DIMENSIONS
    ]
    return Account(buckets, limits.concurrency)


class Quota:
    """Thread-safe admission for one simulated provider (every key and model)."""

    def __init__(
        self, limits: Limits, model_limits: dict[str, Limits], reset: DailyReset, shared: bool
    ) -> None:
        self.limits = limits
        self.model_limits = model_limits
        self.reset = reset
        self.shared = shared
        self._accounts: dict[tuple[str, str], Account] = {}
        self._lock = threading.Lock()

    def _window(self, now: float) -> tuple[int, float]:
        shift = self.reset.offset_ms(now) / 1000
        window = math.floor((now + shift) / DAY_S)
        return window, (window + 1) * DAY_S - shift

    def accounts(self, key: str, model: str) -> list[Account]:
        owner = "org" if self.shared else key
        with self._lock:
            found = []
            for scope, limits in (("*", self.limits), (model, self.model_limits.get(model))):
                if limits is None:
                    continue
                if (owner, scope) not in self._accounts:
                    self._accounts[(owner, scope)] = make_account(limits)
                found.append(self._accounts[(owner, scope)])
            return found

    def admit(self, accounts: list[Account], costs: dict[str, float], now: float) -> Refusal | None:
        """Take every bucket's share at once, or refuse naming the bucket that is short."""
        window, window_end = self._window(now)
        for account in accounts:
            account.lock.acquire()
        try:
            worst: Refusal | None = None
            for account in accounts:
                if account.concurrency is not None and account.in_flight >= account.concurrency:
                    return Refusal(Bucket("concurrency", "requests", account.concurrency, 1.0), 1, 1.0)
                for bucket in account.buckets:
                    wait = bucket.seconds_until(costs[bucket.unit], now, window_end, window)
                    if wait > 0 and (worst is None or wait > worst.retry_after_s):
                        worst = Refusal(bucket, costs[bucket.unit], wait)
            if worst is not None:
                return worst
            for account in accounts:
                account.in_flight += 1
                for bucket in account.buckets:
                    bucket.take(costs[bucket.unit], now, window)
            return None
        finally:
            for account in accounts:
                account.lock.release()

    def release(self, accounts: list[Account], refund: dict[str, float], now: float) -> None:
        """The call is over: free its parallel slot and give back what it did not use."""
        window, _ = self._window(now)
        for account in accounts:
            with account.lock:
                account.in_flight -= 1
                for bucket in account.buckets:
                    if refund.get(bucket.unit):
                        bucket.take(-refund[bucket.unit], now, window)

    def report(self, accounts: list[Account], now: float) -> dict[str, tuple[int, int, float]]:
        """name -> (limit, remaining, seconds until full), the tightest of each dimension."""
        window, window_end = self._window(now)
        out: dict[str, tuple[int, int, float]] = {}
        for account in accounts:
            with account.lock:
                for b in account.buckets:
                    remaining = max(0, math.floor(b.available(now, window)))
                    if b.name not in out or remaining < out[b.name][1]:
                        out[b.name] = (b.limit, remaining, b.seconds_until_full(now, window_end, window))
        return out
