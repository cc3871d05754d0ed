"""Tenants' daily token budgets, in Redis beside the providers' buckets.

A tenant's jobs hold their worst case (estimated input + max_tokens) from submit — a batch
holds all of its lines at once, or nothing is submitted — and each job gives back what it did
not use when it ends, so a tenant never spends past its budget and two tenants never draw on
each other's. The counter is per UTC day (the day the job was submitted) and expires a day
after it. A tenant without a budget holds nothing: nothing would read its counter (its jobs
carry its name in the store), and a chat completion saves two round trips.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis

from workers.config import Settings
from workers.errors import BudgetExhausted, ServiceUnavailable
from workers.keyspace import Keyspace

log = logging.getLogger("spillway.tenants")

KEEP_S = 2 * 86_400
_HOLD = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local want, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
if used + want > budget then return {0, used} end
used = redis.call('INCRBY', KEYS[1], want)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used}
"""


def day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def budget(settings: Settings, tenant: str) -> int | None:
    """The tenant's tokens a UTC day, as configured now (None: no budget, nothing is held)."""
    config = settings.tenants.get(tenant)
    return config.daily_tokens if config is not None else None


def hold(
    client: redis.Redis, keys: Keyspace, tenant: str, tokens: int, budget: int | None, now: datetime
) -> None:
    """Hold `tokens` of the tenant's day, or raise BudgetExhausted (nothing held) when the
    budget cannot take them. Without a budget nothing is held."""
    if budget is None:
        return
    try:
        script = client.register_script(_HOLD)  # EVALSHA: the script's text crosses once
        taken, used = script(keys=[keys.tenant_day(tenant, day(now))], args=[tokens, budget, KEEP_S])
    except redis.RedisError as exc:
        why = f"Redis does not answer ({type(exc).__name__}); nothing was submitted"
        raise ServiceUnavailable(why) from exc
    if not taken:
        raise BudgetExhausted(
            f"tenant {tenant!r}: {int(used):,} of its {budget:,} tokens for {day(now)} (UTC) are spent "
            f"or held by its jobs; this needs {tokens:,} more"
        )


def give_back(
    client: redis.Redis, keys: Keyspace, settings: Settings, tenant: str, tokens: int, submitted: datetime
) -> None:
    """Return what a job held but did not use (a negative `tokens` charges more). A tenant
    without a budget (as configured now) held nothing. (A budget configured while its jobs ran
    gets back what they never held: that day's budget is looser by as much, never stricter.)"""
    if not tokens or budget(settings, tenant) is None:
        return
    try:
        client.decrby(keys.tenant_day(tenant, day(submitted)), tokens)
    except redis.RedisError:  # a lost give-back only makes the budget stricter for the day
        log.warning("tenant %s: could not give back %d tokens", tenant, tokens)


def used(client: redis.Redis, keys: Keyspace, tenant: str, now: datetime) -> int:
    return int(client.get(keys.tenant_day(tenant, day(now))) or 0)
