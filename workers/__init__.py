"""Spillway's workers: the Celery app and tasks, and the engine they use.

``celery -A workers worker -Q llm.<provider> -P threads -c N`` runs them.
"""

from workers import housekeeping, tasks  # noqa: F401  (register tasks and worker hooks)
from workers.app import app

__all__ = ["app"]
