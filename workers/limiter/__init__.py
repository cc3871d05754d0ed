"""The Redis token-bucket limiter (see `limiter.py` and the contracts atop `lua/*.lua`);
its typed view of a provider's state (`state.py`) and the `Wait` every layer shares."""

from workers.limiter.limiter import RESERVED, Clock, Costs, Denied, Lease, Limiter, Reserved, Settled
from workers.limiter.state import DIMENSIONS, AccountState, BucketSpec, BucketState, Kind, Scope, Snapshot
from workers.limiter.wait import Wait

__all__ = [
    "DIMENSIONS",
    "RESERVED",
    "AccountState",
    "BucketSpec",
    "BucketState",
    "Clock",
    "Costs",
    "Denied",
    "Kind",
    "Lease",
    "Limiter",
    "Reserved",
    "Scope",
    "Settled",
    "Snapshot",
    "Wait",
]
