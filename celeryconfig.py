"""Spillway's Celery settings as a config module, for tools that load one by name
(``app.config_from_object("celeryconfig")``, as the plain-Celery benchmark does).

The settings themselves, and the environment they read, live in `workers.celery` and
`workers.env`; this module only lays them out as attributes.
"""

from workers.celery import celery_settings
from workers.env import Env

globals().update(celery_settings(Env.from_environ()))
