"""Hot-path statements run by the database's own driver (psycopg, sqlite3).

The statements are SQLAlchemy Core, compiled once per store (its dialect and schema). What
SQLAlchemy adds to each execution — its result objects, per-execution parameter handling and
the typing of every returned column — was most of a hot-path write's CPU: a claim's
UPDATE … RETURNING took 0.46 ms through Core and 0.18 ms by the driver on PostgreSQL, 0.17
and 0.08 ms on SQLite (measured alternately in one process). Values still pass through the
column types' own bind and result processors (SQLite keeps datetimes and JSON as text), so a
row reads as it would through Core; errors are SQLAlchemy's.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable

#: `execute(statement, params)`: a result with `fetchone()` and `rowcount`; a list of params
#: runs the statement once for each (the driver's executemany).
Execute = Callable[[Executable, "dict[str, Any] | list[dict[str, Any]]"], "Result"]


class Compiled:
    """One statement as the driver takes it: SQL with the schema in place, the order of its
    positional parameters (SQLite) or None (PostgreSQL's named ones), the values of its
    constant binds, and the types' processors of its parameters and returned columns."""

    def __init__(self, statement: Executable, engine: Engine) -> None:
        dialect = engine.dialect
        schema_map = engine.get_execution_options().get("schema_translate_map")
        compiled: Any = statement.compile(
            dialect=dialect, schema_translate_map=schema_map, render_schema_translate=bool(schema_map)
        )
        self.sql = str(compiled)
        self.order: tuple[str, ...] | None = tuple(compiled.positiontup) if compiled.positional else None
        self.defaults: dict[str, Any] = dict(compiled.params)
        self.binders = {
            name: processor
            for bind, name in compiled.bind_names.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        self.dialect = dialect
        self.returned = list(getattr(statement, "exported_columns", ()))
        self.row = namedtuple("Row", [c.name for c in self.returned]) if self.returned else None  # type: ignore[misc]
        self.readers: list[Any] | None = None  # known at the first row: they depend on the driver's types

    def read(self, raw: Any, description: Any) -> Any:
        if self.row is None:
            return raw
        if self.readers is None:
            self.readers = [
                column.type.dialect_impl(self.dialect).result_processor(self.dialect, described[1])
                for column, described in zip(self.returned, description, strict=True)
            ]
        return self.row(*(r(v) if r else v for r, v in zip(self.readers, raw, strict=True)))

    def parameters(self, params: dict[str, Any]) -> Any:
        values = {**self.defaults, **params}
        for name, processor in self.binders.items():
            values[name] = processor(values[name])
        return values if self.order is None else [values[name] for name in self.order]


class Result:
    def __init__(self, cursor: Any, compiled: Compiled) -> None:
        self.cursor, self.compiled = cursor, compiled
        self.rowcount: int = cursor.rowcount

    def fetchone(self) -> Any:
        raw = self.cursor.fetchone()
        return None if raw is None else self.compiled.read(raw, self.cursor.description)


class Driver:
    """Runs compiled statements on `engine`'s pooled connections. `autocommit` (psycopg): each
    statement commits by itself (the connection is switched for the block — a client-side flag,
    no round trip — and back); otherwise those of one `statements()` block share a transaction,
    committed at its end, under `lock`."""

    def __init__(
        self, engine: Engine, *, autocommit: bool, lock: AbstractContextManager[Any] | None = None
    ) -> None:
        self.engine, self.autocommit = engine, autocommit
        self.lock: AbstractContextManager[Any] = lock if lock is not None else nullcontext()
        self.compiled: dict[Executable, Compiled] = {}

    @contextmanager
    def statements(self, *, together: bool = False) -> Iterator[Execute]:
        """`together`: the block's statements are one transaction even where each would
        commit by itself (several rows that stand or fall together)."""
        dialect = self.engine.dialect
        autocommit = self.autocommit and not together
        with self.lock:
            fairy = self.engine.raw_connection()
            connection, cursor = fairy.driver_connection, None
            try:
                if autocommit:
                    connection.autocommit = True
                cursor = connection.cursor()

                def execute(statement: Executable, params: dict[str, Any] | list[dict[str, Any]]) -> Result:
                    compiled = self.compiled.get(statement)
                    if compiled is None:
                        compiled = self.compiled[statement] = Compiled(statement, self.engine)
                    if isinstance(params, list) and len(params) == 1:
                        params = params[0]  # psycopg's executemany enters pipeline mode: 0.1 ms more
                    if isinstance(params, list):
                        cursor.executemany(compiled.sql, [compiled.parameters(p) for p in params])
                    else:
                        cursor.execute(compiled.sql, compiled.parameters(params))
                    return Result(cursor, compiled)

                yield execute
                if not autocommit:
                    connection.commit()
            except dialect.loaded_dbapi.Error as exc:
                lost = dialect.is_disconnect(exc, fairy, cursor)
                if lost:
                    fairy.invalidate(exc)
                elif not autocommit:
                    connection.rollback()
                raise DBAPIError.instance(None, None, exc, dialect.loaded_dbapi.Error, lost) from exc
            except BaseException:
                if not autocommit:
                    connection.rollback()
                raise
            finally:
                if cursor is not None:
                    cursor.close()
                if autocommit and fairy.is_valid:
                    connection.autocommit = False  # the pool's other users expect transactions
                fairy.close()
