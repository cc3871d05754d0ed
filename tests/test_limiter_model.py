"""The Redis limiter agrees with a small pure-Python model of the same buckets under the same
random operations (hypothesis). Each operation reads the clock the script used (it returns
`now`), so the model judges at the same instant; concurrency leases expire in the model as in
the script (`lease_ttl`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_limiter import P, make
from workers.limiter import Costs, Lease

DAY_MS = 86_400_000
LIMITS = {
    "rpm": (0, 60_000, 20, "requests"),
    "tpm": (0, 60_000, 400, "tokens"),
    "rpd": (1, DAY_MS, 30, "requests"),
    "tpd": (1, DAY_MS, 3000, "tokens"),
}
CONCURRENCY = 4


@dataclass
class Model:
    level: dict[str, float] = field(default_factory=dict)  # rolling: level; daily: used
    stamp: dict[str, float] = field(default_factory=dict)  # rolling: time; daily: window
    # lease id -> (expires at, charges): the script stops counting a lease once the clock passes
    # its expiry, and a settle refunds while the lease is in the set: taking a lease drops the
    # expired ones, at most once a day (`pruned_at`), so a late settle may still refund.
    leases: dict[str, tuple[float, list[tuple[str, float, float]]]] = field(default_factory=dict)
    pruned_at: float = 0

    def avail(self, name: str, now: int) -> float:
        kind, period, cap, _ = LIMITS[name]
        if kind == 0:
            if name not in self.level:
                return cap
            level = self.level[name]
            if now > self.stamp[name]:
                level = level + (now - self.stamp[name]) * cap / period
            return min(cap, level)
        window = now // DAY_MS
        return cap - (self.level.get(name, 0) if self.stamp.get(name) == window else 0)

    def store(self, name: str, now: int, avail: float) -> None:
        kind, _, cap, _ = LIMITS[name]
        if kind == 0:
            self.level[name], self.stamp[name] = avail, now
        else:
            self.level[name], self.stamp[name] = max(0.0, cap - avail), now // DAY_MS

    def in_flight(self, now: int) -> int:
        return sum(1 for expires, _ in self.leases.values() if expires > now)

    def admits(self, costs: Costs, now: int) -> bool:
        unit = costs.as_dict()
        return self.in_flight(now) < CONCURRENCY and all(
            self.avail(name, now) >= unit[spec[3]] for name, spec in LIMITS.items()
        )

    def take(self, lease_id: str, costs: Costs, now: int, ttl_ms: int) -> None:
        if self.pruned_at + DAY_MS < now:
            self.leases = {k: v for k, v in self.leases.items() if v[0] > now}
            self.pruned_at = now
        unit = costs.as_dict()
        charges = []
        for name, spec in LIMITS.items():
            self.store(name, now, self.avail(name, now) - unit[spec[3]])
            charges.append((name, unit[spec[3]], now // DAY_MS))
        self.leases[lease_id] = (now + ttl_ms, charges)

    def settle(self, lease_id: str, actual: Costs, now: int) -> None:
        unit = actual.as_dict()
        if lease_id not in self.leases:
            return  # pruned: nothing to give back
        _, charges = self.leases.pop(lease_id)
        for name, charged, window in charges:
            kind, _, cap, u = LIMITS[name]
            delta = charged - unit[u]
            if delta != 0 and (kind == 0 or window == now // DAY_MS):
                self.store(name, now, min(cap, self.avail(name, now) + delta))


operation = st.one_of(
    # a lease of a minute (the advances below outlast it) or of five days
    st.tuples(st.just("acquire"), st.integers(0, 60), st.integers(1, 60), st.sampled_from([60, 86_400 * 5])),
    st.tuples(st.just("settle"), st.integers(0, 10), st.integers(0, 60), st.integers(0, 60)),
    st.tuples(st.just("advance"), st.integers(0, 90_000)),
    st.tuples(st.just("advance_day"), st.integers(1, 2)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
def test_redis_limiter_matches_the_model(redis_client: redis.Redis, ops: list[tuple]) -> None:
    redis_client.flushdb()
    lim = make(redis_client, f"rpm = 20, tpm = 400, rpd = 30, tpd = 3000, concurrency = {CONCURRENCY}")
    model = Model()
    open_leases: list[Lease] = []
    for op in ops:
        if op[0] == "acquire":
            costs = Costs.estimate(op[1], op[2])
            result = lim.acquire(P, costs, lease_ttl_s=op[3])
            now = result.now_ms
            expected = model.admits(costs, now)
            assert isinstance(result, Lease) == expected, (op, result)
            if expected:
                model.take(result.lease_id, costs, now, op[3] * 1000)
                open_leases.append(result)
        elif op[0] == "settle" and open_leases:
            lease = open_leases.pop(op[1] % len(open_leases))
            actual = Costs(1, op[2] + op[3], op[2], op[3])
            lim.settle(lease, actual=actual, outcome="alive")
            model.settle(lease.lease_id, actual, int(lim.snapshots([P])[P].now_ms))
        elif op[0] == "advance":
            lim.clock.advance(op[1] / 1000)
        elif op[0] == "advance_day":
            lim.clock.advance(op[1] * 86_400)
        snap = lim.snapshots([P])[P]
        for bucket in snap.accounts[0].buckets:
            assert math.isclose(bucket.avail, model.avail(bucket.field, snap.now_ms), abs_tol=0.05), (
                bucket,
                model.avail(bucket.field, snap.now_ms),
            )
