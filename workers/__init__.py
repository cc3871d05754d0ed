"""Spillway's workers: the Celery app and tasks, and the engine they use.

``celery -A workers worker -Q llm.<provider> -P threads -c N`` runs them. Importing a module of
this package loads only that module: ``workers.app`` (the Celery app) is built on first use,
and its tasks are registered by the worker through the app's ``include``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.celery import SpillwayCelery

    app: SpillwayCelery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        # Lazy on purpose: `import workers.errors` must not load Celery.
        from workers.celery import app

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
