"""The Redis token-bucket limiter (see `limiter.py` and the contracts atop `lua/*.lua`)."""

from workers.limiter.limiter import Clock, Costs, Denied, Lease, Limiter, Settled, Snapshot

__all__ = ["Clock", "Costs", "Denied", "Lease", "Limiter", "Settled", "Snapshot"]
