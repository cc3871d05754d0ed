"""Who calls `spillway serve`: each bearer token names a tenant (``[tenants.<name>]`` in the
config, its token in the environment variable it names). A tenant's files, batches and jobs
are its own; its requests run at its tier. ``$SPILLWAY_API_TOKEN`` is the tenant "default",
which may ask for any tier and is the operator: it alone (and a tenant with ``operator = true``)
sees every tenant's usage, status and jobs."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from workers.config import Settings
from workers.errors import ConfigError

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Tenant:
    name: str
    tier: str
    tiers: tuple[str, ...]
    task: str
    token: str
    operator: bool = False  # sees every tenant's usage, status and jobs (/metrics, the live page)

    @property
    def scope(self) -> str:
        return token_scope(self.token)


def token_scope(token: str) -> str:
    """A stable id of the caller a token names (never the token): its idempotency keys' scope."""
    return "t" + hashlib.sha256(token.encode()).hexdigest()[:12]


class Tenants:
    """The tokens `spillway serve` takes, each to its tenant (compared in constant time)."""

    def __init__(self, tenants: list[Tenant]) -> None:
        self.tenants = tenants
        self.by_name = {t.name: t for t in tenants}

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str], api_token: str | None = None
    ) -> Tenants:
        """Every configured tenant whose token variable is set; a variable that is empty or
        missing is a ConfigError naming it (a tenant that could never sign in is a mistake)."""
        tenants = []
        for config in settings.tenants.values():
            token = environ.get(config.token_env, "")
            if not token:
                raise ConfigError(
                    f"{settings.source}: tenants.{config.name}.token_env: ${config.token_env} is not set"
                )
            tenants.append(
                Tenant(config.name, config.tier, config.tiers, config.task, token, config.operator)
            )
        if api_token:
            tier = "free" if "free" in settings.tiers else next(iter(settings.tiers))
            # its `model="spillway"` requests and batches: chat, or the first route there is
            routed = "chat" in settings.routes or "*" in settings.routes
            task = "chat" if routed else next(iter(settings.routes), "chat")
            operator = Tenant(DEFAULT_TENANT, tier, tuple(settings.tiers), task, api_token, operator=True)
            tenants.append(operator)
        tokens = [t.token for t in tenants]
        if len(set(tokens)) != len(tokens):
            raise ConfigError("two tenants of spillway serve have the same token")
        return cls(tenants)

    def __bool__(self) -> bool:
        return bool(self.tenants)

    def authenticate(self, authorization: str) -> Tenant | None:
        """The tenant an ``Authorization: Bearer …`` header names, or None."""
        given = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        found = None
        for tenant in self.tenants:  # every token compared: the time says nothing about which
            if given and hmac.compare_digest(given.encode(), tenant.token.encode()):
                found = tenant
        return found
