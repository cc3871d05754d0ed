"""Where the config file and `.env` are found: the flag, $SPILLWAY_CONFIG, the current directory,
the user config directory — in that order — and `.env` from the current directory or the user
config directory only (never next to the installed package), the environment winning over it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers import discovery
from workers.config import load_settings
from workers.env import Env
from workers.errors import ConfigError

ROOT = Path(__file__).parent.parent
CONFIG = """
[providers.p]
api = "openai"
base_url = "https://p.example/v1"
key_env = "P_KEY"
[providers.p.models.{model}]
[routes."*"]
free = ["p:{model}"]
"""


def write_config(folder: Path, model: str, name: str = "spillway.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(CONFIG.format(model=model))
    return path


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A working directory, a home and an XDG config home of the test's own; nothing set."""
    work, home, xdg = tmp_path / "work", tmp_path / "home", tmp_path / "xdg"
    for folder in (work, home, xdg):
        folder.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("SPILLWAY_CONFIG", raising=False)
    return {"work": work, "home": home, "xdg": xdg, "tmp": tmp_path}


def test_the_config_is_found_in_order(places: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    flagged = write_config(places["tmp"] / "elsewhere", "flagged", "mine.toml")
    named = write_config(places["tmp"] / "named", "named", "named.toml")
    write_config(places["work"], "here")
    write_config(places["xdg"] / "spillway", "xdg")
    write_config(places["home"] / ".config" / "spillway", "home")
    monkeypatch.setenv("SPILLWAY_CONFIG", str(named))

    def model() -> str:
        return next(iter(load_settings(discovery.find_config(flag).path).providers["p"].models))

    flag: str | None = str(flagged)
    assert discovery.find_config(flag).origin == discovery.FLAG and model() == "flagged"
    flag = None
    assert discovery.find_config().origin == discovery.VARIABLE and model() == "named"
    monkeypatch.delenv("SPILLWAY_CONFIG")
    found = discovery.find_config()
    assert found.origin == discovery.CURRENT_DIR and model() == "here"
    assert found.path == Path("spillway.toml")  # so errors read "spillway.toml: providers…"
    (places["work"] / "spillway.toml").unlink()
    found = discovery.find_config()
    assert found.origin == discovery.USER_DIR and model() == "xdg"
    assert found.path == places["xdg"] / "spillway" / "spillway.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")  # XDG's default: ~/.config
    assert discovery.find_config().path == places["home"] / ".config" / "spillway" / "spillway.toml"
    assert model() == "home"
    # load_settings() with no path uses the same search
    assert next(iter(load_settings().providers["p"].models)) == "home"


def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(places["work"], "here")
    with pytest.raises(ConfigError, match=r"^typo\.toml: config file not found \(named by --config\)$"):
        discovery.find_config("typo.toml")
    monkeypatch.setenv("SPILLWAY_CONFIG", "/nowhere/spillway.toml")
    with pytest.raises(ConfigError, match=r"^/nowhere/spillway\.toml: .*named by \$SPILLWAY_CONFIG"):
        discovery.find_config()


def test_no_config_anywhere_names_every_place_and_the_way_out(places: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as error:
        discovery.find_config()
    message = str(error.value)
    for place in (
        "--config",
        "$SPILLWAY_CONFIG",
        str(places["work"].resolve() / "spillway.toml"),
        str(places["xdg"] / "spillway" / "spillway.toml"),
        "`spillway init`",
        "`spillway demo`",
    ):
        assert place in message


def test_dotenv_is_read_from_here_else_the_user_config_directory(places: dict[str, Path]) -> None:
    assert discovery.find_dotenv() is None
    (places["xdg"] / "spillway").mkdir()
    (places["xdg"] / "spillway" / ".env").write_text("A=user\n")
    assert discovery.find_dotenv() == discovery.Found(places["xdg"] / "spillway" / ".env", discovery.USER_DIR)
    (places["work"] / ".env").write_text("A=here\n")
    found = discovery.find_dotenv()
    assert found == discovery.Found(Path(".env"), discovery.CURRENT_DIR)
    assert discovery.dotenv_names(found) == {"A": "here"}


def run_python(code: str, cwd: Path, **env: str) -> dict:
    """`code` as a script of its own (python-dotenv's own search differs for ``python -c``) run
    by a fresh interpreter in `cwd`, with none of this process's Spillway variables."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPILLWAY_", "CELERY_")) and k != "XDG_CONFIG_HOME"
    }
    base["PYTHONPATH"] = str(ROOT)
    script = cwd.parent / "scripts" / "probe.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_process_reads_dotenv_from_its_directory_and_the_environment_wins(tmp_path: Path) -> None:
    """The producer API's default client, in a process started elsewhere than the package:
    ./.env is read (python-dotenv's own search walked up from the package, not from here), a
    .env in a parent directory is not, and a variable already set wins over the file."""
    parent, work = tmp_path, tmp_path / "project"
    work.mkdir()
    (parent / ".env").write_text("SPILLWAY_KEY_PREFIX=from-the-parent\nPARENT_ONLY=1\n")
    (work / ".env").write_text(
        "SPILLWAY_KEY_PREFIX=from-dotenv\nSPILLWAY_DATABASE_URL=sqlite:///from-dotenv.db\n"
    )
    code = (
        "import json, os\n"
        "from producer.client import default_client\n"
        "env = default_client().env\n"
        "print(json.dumps({'prefix': env.key_prefix, 'db': env.database_url,"
        " 'parent': 'PARENT_ONLY' in env.environ}))"
    )
    home = str(tmp_path / "home")
    seen = run_python(code, work, HOME=home, XDG_CONFIG_HOME=home)
    assert seen == {"prefix": "from-dotenv", "db": "sqlite:///from-dotenv.db", "parent": False}
    seen = run_python(code, work, HOME=home, XDG_CONFIG_HOME=home, SPILLWAY_KEY_PREFIX="from-env")
    assert seen["prefix"] == "from-env" and seen["db"] == "sqlite:///from-dotenv.db"


def test_a_process_finds_the_user_config_directory(tmp_path: Path) -> None:
    """Nothing in the working directory: the .env and config of ~/.config/spillway are used,
    and the .env may name the config ($SPILLWAY_CONFIG) for every process."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    user = home / ".config" / "spillway"
    write_config(user, "from-home")
    write_config(tmp_path / "other", "from-dotenv-variable", "other.toml")
    code = (
        "import json\n"
        "from workers import discovery\n"
        "from workers.config import load_settings\n"
        "dotenv = discovery.load_dotenv()\n"
        "settings = load_settings()\n"
        "print(json.dumps({'dotenv': dotenv and str(dotenv.path), 'source': settings.source,"
        " 'model': next(iter(settings.providers['p'].models))}))"
    )
    seen = run_python(code, work, HOME=str(home))
    assert seen == {"dotenv": None, "source": str(user / "spillway.toml"), "model": "from-home"}
    (user / ".env").write_text(f"SPILLWAY_CONFIG={tmp_path / 'other' / 'other.toml'}\n")
    seen = run_python(code, work, HOME=str(home))
    assert seen["dotenv"] == str(user / ".env") and seen["model"] == "from-dotenv-variable"


def test_the_store_lies_beside_the_config_unless_named(tmp_path) -> None:
    """Processes in different directories that read one config share one store: a worker in
    one finds the jobs a producer in another stored."""
    from workers.runtime import database_url

    config = tmp_path / "cfg" / "spillway.toml"
    assert database_url(Env.from_environ({}), config) == f"sqlite:///{tmp_path / 'cfg' / 'spillway.db'}"
    named = Env.from_environ({"SPILLWAY_DATABASE_URL": "sqlite:////srv/s.db"})
    assert database_url(named, config) == "sqlite:////srv/s.db"
    assert database_url(Env.from_environ({}), None) == "sqlite:///spillway.db"  # settings given: as named
