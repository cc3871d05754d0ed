"""The response cache (opt-in per route, ``cache_ttl_s``): exact-match answers in Redis, keyed
by a hash of the normalized request and the route — and the tier, unless the route sets
``cache_across_tiers``. A hit spends no quota and is marked ``cached`` in the result and in
`spillway usage`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis

from workers.config import Chain
from workers.keyspace import Keyspace
from workers.messages import ChatRequest


@dataclass(frozen=True)
class CachedAnswer:
    provider: str
    model: str
    text: str
    finish_reason: str

    def result_columns(self) -> dict[str, Any]:
        """What the store records for a job answered from the cache: nothing was spent."""
        return {
            "provider": self.provider,
            "model": self.model,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "cached": True,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
        }


def cache_key(keys: Keyspace, chain: Chain, task: str, tier: str, request: ChatRequest) -> str:
    scope = "*" if chain.cache_across_tiers else tier
    canonical = json.dumps(
        {"task": task, "tier": scope, "request": request.to_json()},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return keys.cached_answer(hashlib.sha256(canonical.encode()).hexdigest())


def lookup_many(client: redis.Redis, keys: list[str]) -> list[CachedAnswer | None]:
    if not keys:
        return []
    return [None if raw is None else CachedAnswer(**json.loads(raw)) for raw in client.mget(keys)]


def lookup(client: redis.Redis, key: str) -> CachedAnswer | None:
    return lookup_many(client, [key])[0]


def store(client: redis.Redis, key: str, answer: CachedAnswer, ttl_s: float) -> None:
    client.set(key, json.dumps(answer.__dict__, ensure_ascii=False), px=int(ttl_s * 1000))
