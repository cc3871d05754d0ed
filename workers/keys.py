"""API keys from the environment, and the accounts their quota belongs to.

``key_env = "GROQ_API_KEY"`` finds ``GROQ_API_KEY``, ``GROQ_API_KEY_1``, ``GROQ_API_KEY_2`` …
A key is known everywhere else only by its id (``k1-3fa9c1``: index and a short hash), never by
its value; messages, the store, Redis and logs carry ids.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from workers.config import ProviderConfig, Settings

log = logging.getLogger("spillway.keys")

NO_KEY_ID = "nokey"
SHARED_ACCOUNT = "shared"


@dataclass(frozen=True)
class ApiKey:
    provider: str
    key_id: str
    account: str
    env_name: str
    secret: str | None = field(default=None, repr=False)


def key_id(index: int, secret: str) -> str:
    return f"k{index}-{hashlib.sha256(secret.encode()).hexdigest()[:6]}"


def find_keys(provider: ProviderConfig, env: Mapping[str, str]) -> list[ApiKey]:
    """The provider's keys in index order; a provider without `key_env` has one empty key."""
    if provider.key_env is None:
        return [ApiKey(provider.name, NO_KEY_ID, NO_KEY_ID, "")]
    pattern = re.compile(rf"{re.escape(provider.key_env)}(?:_(\d+))?")
    found = []
    for name, value in env.items():
        match = pattern.fullmatch(name)
        if match and value.strip():
            found.append((int(match.group(1) or 0), name, value.strip()))
    keys = []
    for index, name, secret in sorted(found):
        kid = key_id(index, secret)
        account = SHARED_ACCOUNT if provider.shared_quota else kid
        keys.append(ApiKey(provider.name, kid, account, name, secret))
    return keys


class KeyRing:
    """Every usable provider's keys; providers without a key are skipped with one log line."""

    def __init__(self, settings: Settings, env: Mapping[str, str], *, quiet: bool = False) -> None:
        self.by_provider: dict[str, list[ApiKey]] = {}
        self.skipped: dict[str, str] = {}
        for name, provider in settings.providers.items():
            keys = find_keys(provider, env)
            if keys:
                self.by_provider[name] = keys
            else:
                why = f"no key in ${provider.key_env} (nor ${provider.key_env}_1, _2, …)"
                self.skipped[name] = why
                if not quiet:
                    log.info("provider %s skipped: %s", name, why)
        self._by_id = {(k.provider, k.key_id): k for ks in self.by_provider.values() for k in ks}

    def usable(self, provider: str) -> bool:
        return provider in self.by_provider

    def keys(self, provider: str) -> list[ApiKey]:
        return self.by_provider.get(provider, [])

    def get(self, provider: str, key_id: str) -> ApiKey | None:
        return self._by_id.get((provider, key_id))

    def secrets(self) -> list[str]:
        """Every key value, so log filters can scrub them."""
        return [k.secret for ks in self.by_provider.values() for k in ks if k.secret]
