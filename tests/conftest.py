"""Shared fixtures: a private Redis and PostgreSQL schema per test session, a store on each
backend, and the whole stack (simulator + worker processes) for integration tests.

A missing service skips locally and fails in CI (CI=true).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from workers.embedded import EmbeddedRedis, start_redis

CONFIGS = Path(__file__).parent / "configs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_URL = os.environ.get("SPILLWAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A clean database of the session's own Redis for each test."""
    client = redis.Redis.from_url(redis_server.url(1))
    client.flushdb()
    yield client
    client.close()


def _postgres_reachable() -> bool:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 2})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    if not _postgres_reachable():
        missing(f"PostgreSQL does not answer at {PG_URL}")
    schema = f"spillway_test_{uuid.uuid4().hex[:8]}"
    yield schema
    import sqlalchemy

    engine = sqlalchemy.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh store on SQLite, then on PostgreSQL (a schema of the session's own)."""
    from workers.store import Store

    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        schema = request.getfixturevalue("pg_schema")
        s = Store(PG_URL, schema=schema)
        from workers.store.models import Base

        Base.metadata.drop_all(s.engine)
        Base.metadata.create_all(s.engine)
    yield s
    s.close()


@pytest.fixture(scope="session")
def e2e_stack(redis_server: EmbeddedRedis):
    """Simulator + one real worker on every provider of configs/e2e.toml (session-wide)."""
    from producer.stack import LocalStack

    stack = LocalStack(CONFIGS / "e2e.toml", redis_url=redis_server.url(2))
    redis.Redis.from_url(redis_server.url(2)).flushdb()
    stack.start()
    stack.start_worker(concurrency=16)
    stack.wait_for_workers()
    yield stack
    stack.close()
