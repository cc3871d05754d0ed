"""Which Spillway route an OpenAI request takes (its `model`, headers, the tenant)."""

from __future__ import annotations

import logging
from typing import Any

from producer.ops.openai.errors import ApiError
from producer.ops.tenants import Tenant
from workers.config import Settings
from workers.errors import InputError
from workers.runtime import Runtime

log = logging.getLogger("spillway.openai")

# -- which route a request takes ---------------------------------------------------------------


def route_for(
    settings: Settings, tenant: Tenant, model: Any, task: str | None = None, tier: str | None = None
) -> tuple[str, str, str | None]:
    """(task type, tier, preferred provider) for a request naming `model`; see the module doc."""
    tier = tier or tenant.tier
    if tenant.tiers and tier not in tenant.tiers:
        raise ApiError(
            403,
            f"tier {tier!r} is not open to this key (it may use: {', '.join(tenant.tiers)})",
            type="permission_error",
            param="X-Spillway-Tier",
        )
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "you must provide a model parameter", param="model", code="missing_required_parameter"
        )
    if model == "spillway" or model.startswith("spillway/"):
        task = task or model.partition("/")[2] or tenant.task
        _check_route(settings, task, tier, model)
        return task, tier, None
    tasks = [task] if task else list(dict.fromkeys([tenant.task, *(t for t in settings.routes if t != "*")]))
    for name in tasks:
        chains = settings.routes.get(name) or settings.routes.get("*") or {}
        for candidate in chains[tier].candidates if tier in chains else ():
            if model in (candidate.model, str(candidate)):
                return name, tier, candidate.provider
    configured = {m for p in settings.providers.values() for m in p.models} | {
        f"{n}:{m}" for n, p in settings.providers.items() for m in p.models
    }
    if model in configured:
        where = f"the {task} route" if task else "any route"
        raise ApiError(400, f"model {model!r} is not in {where} for tier {tier!r}", param="model")
    raise ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def _check_route(settings: Settings, task: str, tier: str, model: str) -> None:
    try:
        settings.chain(task, tier)
    except InputError as exc:
        raise ApiError(
            404, f"The model `{model}` cannot be served: {exc}", param="model", code="model_not_found"
        ) from None


def line_router(tenant: Tenant, task: str | None, tier: str | None) -> Any:
    """`route_for` for a batch's lines: a line whose model has no route is a bad line, the
    error in its place in the error file (as OpenAI reports one)."""

    def route(rt: Runtime, model: Any, _task: str, _tier: str) -> tuple[str, str, str | None]:
        try:
            return route_for(rt.settings, tenant, model, task, tier)
        except ApiError as exc:
            error = exc.body["error"]
            raise InputError(f"body.model: {error['message']}") from None

    return route
