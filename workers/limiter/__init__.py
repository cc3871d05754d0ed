"""The Redis token-bucket limiter (see `limiter.py` and the contracts atop `lua/*.lua`);
its typed view of a provider's state (`state.py`) and the `Wait` every layer shares."""

from workers.limiter.limiter import Clock, Costs, Denied, Lease, Limiter, Settled
from workers.limiter.state import AccountState, BucketSpec, BucketState, Kind, Scope, Snapshot
from workers.limiter.wait import Wait

__all__ = [
    "AccountState",
    "BucketSpec",
    "BucketState",
    "Clock",
    "Costs",
    "Denied",
    "Kind",
    "Lease",
    "Limiter",
    "Scope",
    "Settled",
    "Snapshot",
    "Wait",
]
