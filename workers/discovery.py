"""Where a Spillway process finds its config file and its ``.env``, the way users expect.

The config file, first found wins:

1. the path given on the command line (``--config``),
2. ``$SPILLWAY_CONFIG``,
3. ``./spillway.toml`` (the current directory),
4. ``<user config dir>/spillway/spillway.toml`` (``$XDG_CONFIG_HOME``, else ``~/.config``).

The ``.env`` file: ``./.env``, else ``<user config dir>/spillway/.env``. It is never looked for
next to the installed package, and variables already in the environment win over it.
A path that is named (flag or variable) must exist: nothing falls back behind the user's back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import dotenv

from workers.constants import DEFAULT_CONFIG_FILE
from workers.env import Env
from workers.errors import ConfigError

DOTENV_FILE = ".env"

FLAG = "--config"
VARIABLE = "$SPILLWAY_CONFIG"
CURRENT_DIR = "the current directory"
USER_DIR = "the user config directory"


@dataclass(frozen=True)
class Found:
    """A file Spillway uses, and which rule found it (`FLAG`, `VARIABLE`, `CURRENT_DIR`, `USER_DIR`).
    `path` is as the user would write it (``spillway.toml`` in the current directory)."""

    path: Path
    origin: str

    def __str__(self) -> str:
        return f"{self.path.resolve()} ({self.origin})"


def user_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/spillway``, else ``~/.config/spillway``."""
    environ = _environ(environ)
    base = environ.get("XDG_CONFIG_HOME", "").strip()
    if not base:
        home = environ.get("HOME", "").strip()
        base = str(Path(home) / ".config") if home else str(Path.home() / ".config")
    return Path(base) / "spillway"


def find_config(
    flag: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Found:
    """The config file this process uses; ConfigError naming every place looked at if none."""
    environ = _environ(environ)
    named = (
        (Path(flag), FLAG)
        if flag
        else (Path(environ["SPILLWAY_CONFIG"].strip()), VARIABLE)
        if environ.get("SPILLWAY_CONFIG", "").strip()
        else None
    )
    if named is not None:
        path, origin = named
        if (_here(cwd) / path).is_file():
            return Found(_here(cwd) / path, origin)
        raise ConfigError(f"{path}: config file not found (named by {origin})")
    candidates = [
        (_here(cwd) / DEFAULT_CONFIG_FILE, CURRENT_DIR),
        (user_config_dir(environ) / DEFAULT_CONFIG_FILE, USER_DIR),
    ]
    for path, origin in candidates:
        if path.is_file():
            return Found(path, origin)
    here, user = (str(path.resolve()) for path, _ in candidates)
    raise ConfigError(
        f"no config file: no {FLAG} given, {VARIABLE} is not set, and neither {here} nor {user} "
        "exists; run `spillway init` to write one here (or `spillway demo` to try Spillway without one)"
    )


def find_dotenv(*, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Found | None:
    """``./.env``, else the user config directory's ``.env``, else None."""
    for path, origin in (
        (_here(cwd) / DOTENV_FILE, CURRENT_DIR),
        (user_config_dir(environ) / DOTENV_FILE, USER_DIR),
    ):
        if path.is_file():
            return Found(path, origin)
    return None


def dotenv_places(*, environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[Path]:
    """Where `find_dotenv` looks, in order (for messages)."""
    return [_here(cwd) / DOTENV_FILE, user_config_dir(environ) / DOTENV_FILE]


def load_dotenv(*, cwd: Path | None = None) -> Found | None:
    """Read the `.env` this process uses into its environment; variables already set win."""
    found = find_dotenv(cwd=cwd)
    if found is not None:
        dotenv.load_dotenv(found.path, override=False)
    return found


def dotenv_names(found: Found | None) -> dict[str, str]:
    """The variables a `.env` file sets (names and values: for comparing, never for printing)."""
    if found is None:
        return {}
    return {name: value for name, value in dotenv.dotenv_values(found.path).items() if value is not None}


def _here(cwd: Path | None) -> Path:
    # Relative to the process's directory by default, so messages say "spillway.toml: …"
    return cwd if cwd is not None else Path()


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    # Env is the one reader of the process environment (tests/test_env.py keeps it so).
    return Env.from_environ().environ if environ is None else environ
