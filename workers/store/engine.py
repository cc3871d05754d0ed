"""The store's connection: which database (URL and schema), its engine, pragmas and sessions.

SQLite by default, PostgreSQL by URL. `Database` is the base every part of the `Store` builds on:
it creates the tables and hands out sessions.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from workers.errors import ConfigError, ServiceUnavailable
from workers.store.driver import Driver, Execute
from workers.store.models import Base, Meta

#: The PostgreSQL advisory lock that serializes creating the tables ("spillway" in ASCII).
SCHEMA_LOCK_KEY = 0x7370696C6C776179
#: A pooled PostgreSQL connection idle this long is pinged before use (a restart is noticed).
PING_IDLE_S = 5.0

#: The layout of the tables. A change to it bumps this and adds the step from the version
#: before to MIGRATIONS, which every process runs once (under the schema lock) on its way in.
SCHEMA_VERSION = 4


def _add_column(conn: Connection, table: str, column: str) -> None:
    """ALTER TABLE … ADD COLUMN for a column the models declare, in the store's schema
    (nothing if the table has it already: tables made from the models without a version)."""
    col = Base.metadata.tables[table].c[column]
    prep = conn.dialect.identifier_preparer
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    if column in {c["name"] for c in inspect(conn).get_columns(table, schema=schema)}:
        return
    name = (f"{prep.quote_schema(schema)}." if schema else "") + prep.quote(table)
    conn.execute(text(f"ALTER TABLE {name} ADD COLUMN {prep.quote(column)} {col.type.compile(conn.dialect)}"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {  # from version N to N + 1
    1: lambda conn: _add_column(conn, "spillway_batches", "line_format"),
    2: lambda conn: _add_column(conn, "spillway_jobs", "tenant"),  # the API's tables: create_all
    3: lambda conn: _to_version_4(conn),
}


def _to_version_4(conn: Connection) -> None:
    """Provider batches (their table: create_all): a job's mode and provider batch (indexed),
    an attempt's provider batch and what it saved."""
    for table, column in (
        ("spillway_jobs", "mode"),
        ("spillway_jobs", "provider_batch_id"),
        ("spillway_attempts", "provider_batch_id"),
        ("spillway_attempts", "saved_usd"),
    ):
        _add_column(conn, table, column)
    for index in Base.metadata.tables["spillway_jobs"].indexes:
        if index.name == "ix_spillway_jobs_provider_batch_id":
            index.create(conn, checkfirst=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; everything stored is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


class Database:
    """The engine and its sessions; the tables are created (and the schema) on the way in."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.url = url  # `Env.database_url`: $SPILLWAY_DATABASE_URL
        self.engine = _engine(self.url, schema)
        # SQLite has one writer at a time and its busy handler backs off in coarse sleeps (up to
        # 100 ms): queueing writers on a lock — this process's threads, then every process on the
        # machine through a file lock the kernel hands on at once — is an order of magnitude faster.
        self._write_lock: Any = contextlib.nullcontext()
        if self.url.startswith("sqlite"):
            self._write_lock = WriteLock(_sqlite_path(self.url))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        postgres = self.engine.dialect.name == "postgresql"
        self._driver = Driver(self.engine, autocommit=postgres, lock=None if postgres else self._write_lock)
        try:
            self._create_tables(schema)
        except OperationalError as exc:
            raise ServiceUnavailable(
                f"the store at {_safe_url(self.url)} is unreachable: {exc.orig}"
            ) from exc

    def _create_tables(self, schema: str | None) -> None:
        """Create what is missing — one process at a time, or several starting together on a
        fresh store race ("table already exists", a duplicate pg_type row)."""
        if self.url.startswith("sqlite"):
            with self._write_lock, self.engine.begin() as conn:
                fresh = not _has_jobs_table(conn)
                Base.metadata.create_all(conn)
                _migrate(conn, self.url, fresh)
            return
        with self.engine.begin() as conn:
            # held until this transaction ends, by every process creating Spillway's tables
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            if schema:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            fresh = not _has_jobs_table(conn)
            Base.metadata.create_all(conn)
            _migrate(conn, self.url, fresh)

    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        if not write:
            with self._sessions.begin() as session:
                yield session
            return
        with self._write_lock, self._sessions.begin() as session:
            yield session

    @property
    def single_statements(self) -> bool:
        """Whether `statements` commits each statement by itself (PostgreSQL)."""
        return self._driver.autocommit

    @contextmanager
    def statements(self, *, together: bool = False) -> Iterator[Execute]:
        """For hot-path writes that each stand alone: yields `execute(statement, params)`,
        whose result has `fetchone()` (rows read like a Job's attributes) and `rowcount`. The
        database's driver runs them (`workers.store.driver`: a third of Core's CPU). On
        SQLite, where a transaction costs no round trip, they share one under the write lock.
        On PostgreSQL each commits by itself: one round trip, not three (BEGIN, the statement,
        COMMIT); `together` makes the block one transaction there too."""
        with self._driver.statements(together=together) as execute:
            yield execute

    def close(self) -> None:
        self.engine.dispose()


def _has_jobs_table(conn: Connection) -> bool:
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    return inspect(conn).has_table("spillway_jobs", schema=schema)


def _migrate(conn: Connection, url: str, fresh: bool) -> None:
    """Bring the store to SCHEMA_VERSION. Tables created just now are at it; a store from
    before versions were recorded is version 1."""
    meta = Meta.__table__
    row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
    version = int(row[0]) if row else (SCHEMA_VERSION if fresh else 1)
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the store at {_safe_url(url)} has schema version {version}, newer than this "
            f"Spillway's ({SCHEMA_VERSION}): upgrade Spillway before pointing it at this store"
        )
    for step in range(version, SCHEMA_VERSION):
        MIGRATIONS[step](conn)
    if row is None:
        conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    elif version != SCHEMA_VERSION:
        conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))


class WriteLock:
    """One writer at a time: a thread lock for this process, a `flock` for the others."""

    def __init__(self, database: str | None) -> None:
        self._threads = threading.Lock()
        self._file = open(f"{database}.lock", "a+b") if database else None  # noqa: SIM115 - process-long

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._threads.release()


def _sqlite_path(url: str) -> str | None:
    """The database file of a SQLite URL (None in memory)."""
    database = make_url(url).database
    return database if database and database != ":memory:" else None


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split(":", 1)[0] + "://…"


def _engine(url: str, schema: str | None) -> Engine:
    # A worker runs up to a few hundred threads: never make them queue for a connection.
    options: dict[str, Any] = {"pool_size": 32, "max_overflow": 256}
    if schema:
        options["execution_options"] = {"schema_translate_map": {None: schema}}
    if url.startswith("sqlite"):
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, **options)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_engine(url, **options)

    # A restarted server must be noticed, but a ping on every checkout is a round trip per
    # statement on the hot path: ping only a connection that sat idle for a while.
    @event.listens_for(engine, "checkin")
    def _idle_since(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", time.monotonic()) < PING_IDLE_S:
            return
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()  # the ping's implicit transaction: leave none open
        except Exception as exc:  # the driver's own disconnect error: the pool takes a new one
            raise DisconnectionError() from exc

    return engine
