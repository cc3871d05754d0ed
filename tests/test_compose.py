"""The Docker stack matches the code: every service command parses as a real `spillway`
command, every provider of the example config has a worker, every variable is one the code
reads, Redis never evicts and keeps an AOF, Flower and the HTTP service demand credentials,
and the image runs as a user that is not root. `docker-compose config` validates the file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from producer.cli import main
from tests.conftest import IN_CI
from workers.config import load_settings
from workers.env import variables

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SPILLWAY = {name: s for name, s in SERVICES.items() if s.get("image") == "spillway:latest"}
EXAMPLE = load_settings(ROOT / "spillway.toml")


def read_by_code() -> set[str]:
    return {name for name, *_ in variables()}


def test_every_spillway_command_parses() -> None:
    assert set(SPILLWAY) == {"simulator", "worker-free", "worker-paid", "flower", "serve", "demo"}
    for service in SPILLWAY.values():
        command = service["command"]
        sub = main.commands[command[0]]
        sub.make_context(command[0], list(command[1:]))  # raises on an unknown option or value


def test_workers_cover_every_provider_queue_of_the_example_config() -> None:
    groups = []
    for service in SPILLWAY.values():
        if service["command"][0] == "worker":
            command = service["command"]
            groups.append(command[command.index("--providers") + 1].split(","))
    served = [p for group in groups for p in group]
    assert sorted(served) == sorted(EXAMPLE.providers)  # each queue llm.<provider> has one consumer group
    assert "--concurrency" not in str(groups) and "-c" not in str(groups)  # threads come from the config


def test_environment_is_what_the_code_reads() -> None:
    known = read_by_code() | {p.key_env for p in EXAMPLE.providers.values() if p.key_env}
    for name, service in SPILLWAY.items():
        unknown = set(service["environment"]) - known
        assert not unknown, f"{name}: variables the code never reads: {unknown}"
        assert service["environment"]["SPILLWAY_CONFIG"] == "/app/spillway.toml"
    example_keys = {
        line.split("=")[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert example_keys == {p.key_env for p in EXAMPLE.providers.values() if p.key_env}


def test_redis_flower_serve_and_the_image() -> None:
    redis_command = " ".join(SERVICES["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_command and "--appendonly yes" in redis_command
    assert ":?" in SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert ":?" in SERVICES["serve"]["environment"]["SPILLWAY_API_TOKEN"]
    assert all(p.startswith("127.0.0.1:") for s in SERVICES.values() for p in s.get("ports", []))
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "slim" in dockerfile.splitlines()[1] or "slim" in dockerfile
    assert (ROOT / "examples" / "batch.jsonl").exists()


def test_docker_compose_validates_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if IN_CI:
            pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
        pytest.skip("docker-compose is not installed")
    env = {**os.environ, "FLOWER_BASIC_AUTH": "ops:x", "SPILLWAY_API_TOKEN": "x"}
    out = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    missing = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        env={k: v for k, v in env.items() if k != "FLOWER_BASIC_AUTH"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert missing.returncode != 0 and "FLOWER_BASIC_AUTH" in missing.stderr
