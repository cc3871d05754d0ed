"""The CLI's client: the process's default one, its URLs checked before anything connects, so
a malformed one is a config error naming its variable (not an internal error from a driver)."""

from __future__ import annotations

import click
from redis.connection import parse_url
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from producer.client import Client, default_client
from workers.env import Env
from workers.errors import ConfigError
from workers.redisconn import CLUSTER_SCHEME


def checked_client() -> Client:
    """`default_client()`, once its environment's URLs are known to parse."""
    client = default_client()
    check_urls(client.env)
    return client


def check_urls(env: Env) -> None:
    """ConfigError naming the variable when the store's or Redis's URL cannot even be parsed.
    The messages never repeat a URL: it may hold a password."""
    redis_url = env.redis_url
    if redis_url.startswith(CLUSTER_SCHEME):
        redis_url = "redis://" + redis_url.removeprefix(CLUSTER_SCHEME)
    try:
        parse_url(redis_url)  # what redis.Redis.from_url does before it connects
    except ValueError as exc:
        raise ConfigError(f"$SPILLWAY_REDIS_URL: not a Redis URL ({exc})") from None
    try:
        dialect = make_url(env.database_url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(
            f"$SPILLWAY_DATABASE_URL: not a database URL ({exc}); expected sqlite:///path "
            "or postgresql+psycopg://user@host/db"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise ConfigError(
            f"$SPILLWAY_DATABASE_URL: its driver is not installed ({exc.name or exc})"
        ) from None


#: `--config FILE` for the commands that read the config themselves.
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (default: $SPILLWAY_CONFIG, ./spillway.toml, ~/.config/spillway/spillway.toml).",
)
