"""Every Redis key name Spillway writes, built in one place.

Limiter keys of one provider share the hash tag ``{provider}``, so each Lua script touches one
slot and stays valid on Redis Cluster. Everything else (parked jobs, the reconciler's lock,
cached answers) lives under the same prefix, so a deployment or a test suite can keep its keys
apart with ``SPILLWAY_KEY_PREFIX``. The broker's keys (Celery's queues and results) are
kombu's, named by queue: deployments that share a Redis need a database each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Keyspace:
    prefix: str = "spillway"

    # -- the limiter: one hash tag per provider -------------------------------------------------

    def provider(self, provider: str, *parts: str) -> str:
        """``<prefix>:{<provider>}:<parts…>``, e.g. the pending hash or a reservation."""
        return ":".join((self.prefix, f"{{{provider}}}", *parts))

    def pending(self, provider: str) -> str:
        return self.provider(provider, "pending")

    def reservation(self, provider: str, reservation_id: str) -> str:
        return self.provider(provider, "resv", reservation_id)

    @lru_cache(maxsize=4096)  # noqa: B019 - a few hundred accounts, built on every limiter call
    def account(self, provider: str, account: str, model: str) -> tuple[str, ...]:
        """One account's keys, in the order the scripts take them: its account-wide hash
        (buckets, block, circuit, disabled keys), its buckets for `model`, its leases."""
        return (
            self.provider(provider, "a", account, "b", "*"),
            self.provider(provider, "a", account, "b", model),
            self.provider(provider, "a", account, "leases"),
        )

    # -- the rest ---------------------------------------------------------------------------------

    def parked(self) -> str:
        """Sorted set of jobs waiting for a quota reset, scored by when they are due."""
        return f"{self.prefix}:parked"

    def finished_channel(self) -> str:
        """Pub/sub channel (not a key): ids of jobs that became final (`workers.notify`)."""
        return f"{self.prefix}:finished"

    def alive(self) -> str:
        """Hash: worker node name -> its last beat (time, the messages it holds)."""
        return f"{self.prefix}:alive"

    def orphans_lock(self) -> str:
        return f"{self.prefix}:orphans:lock"

    def tenant_day(self, tenant: str, day: str) -> str:
        """Tokens a tenant's jobs of a UTC day hold or spent (`workers.limiter.tenants`)."""
        return f"{self.prefix}:tenant:{tenant}:{day}"

    def recover_lock(self) -> str:
        return f"{self.prefix}:recover:lock"

    def cached_answer(self, digest: str) -> str:
        return f"{self.prefix}:cache:{digest}"
