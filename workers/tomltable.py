"""Read a parsed TOML table with its key path in hand, so every error names the key.

A message reads ``spillway.toml: providers.groq.limits.rpm: expected a positive integer,
got "fast"``. Keys left over when a table is finished are errors too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from workers.errors import ConfigError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MISSING: Any = object()


def key_path(parent: str, key: str) -> str:
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{parent}.{part}" if parent else part


def shown(value: object) -> str:
    """A value the way the user wrote it, for error messages."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, default=str, ensure_ascii=False)


class Table:
    """One TOML table being read; `pop_*` take a key out and check its type."""

    def __init__(self, data: object, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(data, dict):
            raise self._error_at(path, "expected a table", data)
        self._data = dict(data)

    def _error_at(self, path: str, expected: str, got: object = _MISSING) -> ConfigError:
        tail = "" if got is _MISSING else f", got {shown(got)}"
        where = f"{path}: " if path else ""
        return ConfigError(f"{self.source}: {where}{expected}{tail}")

    def error(self, key: str, expected: str, got: object = _MISSING) -> ConfigError:
        return self._error_at(key_path(self.path, key), expected, got)

    def names(self) -> list[str]:
        return list(self._data)

    def _take(self, key: str, default: object) -> tuple[bool, Any]:
        """(present, value): a missing key gives its default, or an error when it has none."""
        if key in self._data:
            return True, self._data.pop(key)
        if default is _MISSING:
            raise self.error(key, "is required")
        return False, default

    def pop_str(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None) -> Any:
        present, value = self._take(key, default)
        if not present:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, "expected a non-empty string", value)
        if choices is not None and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}", value)
        return value

    def pop_int(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> Any:
        present, value = self._take(key, default)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.error(key, f"expected {what}", value)
        return value

    def pop_number(
        self, key: str, default: Any = _MISSING, *, minimum: float = 0.0, maximum: float | None = None
    ) -> Any:
        present, value = self._take(key, default)
        if not present:
            return value
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and (value < minimum or (maximum is not None and value > maximum)):
            ok = False
        if not ok:
            bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f">= {minimum:g}"
            raise self.error(key, f"expected a number {bound}", value)
        return float(value)

    def pop_bool(self, key: str, default: Any = _MISSING) -> Any:
        present, value = self._take(key, default)
        if present and not isinstance(value, bool):
            raise self.error(key, "expected true or false", value)
        return value

    def pop_str_list(self, key: str, default: Any = _MISSING) -> Any:
        present, value = self._take(key, default)
        if present and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise self.error(key, "expected a list of non-empty strings", value)
        return value

    def pop_table(self, key: str, *, required: bool = False) -> Table:
        _, value = self._take(key, _MISSING if required else {})
        return Table(value, key_path(self.path, key), self.source)

    def pop_raw(self, key: str, default: Any = None) -> Any:
        return self._take(key, default)[1]

    def subtables(self) -> Iterator[tuple[str, Table]]:
        """Every remaining key as a sub-table, in file order; the table is empty afterwards."""
        for key in list(self._data):
            yield key, Table(self._data.pop(key), key_path(self.path, key), self.source)

    def done(self, known: tuple[str, ...] = ()) -> None:
        """Fail on the first key nobody asked for."""
        for key in self._data:
            hint = f" (known keys: {', '.join(known)})" if known else ""
            raise self.error(key, f"unknown key{hint}")
