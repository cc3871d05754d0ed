"""The environment is read in one place: every variable the code names is a field of `Env`,
the README's table is exactly `Env`'s, nothing else reads ``os.environ``, and a bad value
fails naming its variable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from workers.env import Env, markdown_table, variables
from workers.errors import ConfigError

ROOT = Path(__file__).parent.parent
SOURCES = [ROOT / "celeryconfig.py", *(ROOT / "workers").rglob("*.py"), *(ROOT / "producer").rglob("*.py")]
NAMED = re.compile(r"\b((?:SPILLWAY|CELERY|FLOWER)_[A-Z0-9_]+)\b")


def test_every_variable_the_code_names_is_in_env() -> None:
    known = {name for name, *_ in variables()}
    named = {m for path in SOURCES for m in NAMED.findall(path.read_text(encoding="utf-8"))}
    assert named - known == set()
    assert len(known) == len(variables())  # each variable once


def test_nothing_but_env_reads_the_environment() -> None:
    readers = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            reads = "getenv(" in line or re.search(r"os\.environ(?!\s*,|\s*\})", line)
            # Handing this process's environment to a child (`{**os.environ, ...}`) is not a read.
            if reads and "**os.environ" not in line and path.name != "env.py":
                readers.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert readers == []


def test_the_readme_table_is_envs_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
    rows = [line for line in readme.splitlines() if re.match(r"^\| `(SPILLWAY|CELERY|FLOWER)_", line)]
    assert len(rows) == len(variables())


def test_defaults_and_parsing() -> None:
    env = Env.from_environ({})
    assert env.broker == env.results == env.redis_url == "redis://127.0.0.1:6379/0"
    assert env.visibility_timeout_s == 900 and env.stuck_s == 120.0 and not env.keep_when_broker_down
    env = Env.from_environ(
        {
            "SPILLWAY_REDIS_URL": "redis://h:1/2",
            "CELERY_BROKER_URL": "amqp://guest@h//",
            "SPILLWAY_STUCK_S": "7.5",
            "SPILLWAY_SUBMIT_WHEN_BROKER_DOWN": "store",
            "SPILLWAY_DEBUG": "1",
            "GROQ_API_KEY": "sk-not-in-repr",
        }
    )
    assert env.broker == "amqp://guest@h//" and env.amqp_broker and env.results == "redis://h:1/2"
    assert env.stuck_s == 7.5 and env.keep_when_broker_down and env.debug
    assert env.environ["GROQ_API_KEY"] == "sk-not-in-repr"  # the key ring finds keys there
    assert "sk-not-in-repr" not in repr(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SPILLWAY_STUCK_S", "soon"),
        ("SPILLWAY_VISIBILITY_TIMEOUT_S", "1.5"),
        ("SPILLWAY_RECOVER_IDLE_S", "nan"),
        ("SPILLWAY_PARKED_EVERY_S", "-1"),
        ("SPILLWAY_SUBMIT_WHEN_BROKER_DOWN", "maybe"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^\${name}: expected"):
        Env.from_environ({name: value})


def test_importing_a_module_of_workers_loads_no_framework() -> None:
    code = (
        "import sys, workers.errors, workers.env, workers.keyspace, workers.dispatch\n"
        "print(sorted(m for m in ('sqlalchemy', 'workers.tasks', 'workers.store') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
