"""The Docker stack matches the code: every service command parses as a real `spillway`
command, every provider of the example config has a worker, every variable is one the code
reads, Redis never evicts and keeps an AOF, Flower and the HTTP service demand credentials,
and the image runs as a user that is not root, in a working directory it can write.

And it is right for real use: keys come from `.env` only, so a real `.env` never meets a
simulator key or the simulator's URL; the simulator and the demo run only with the
`simulator` profile; every service has a healthcheck and starts after what it needs is
healthy. Rendered twice: by a small renderer here (no docker-compose needed) and by
`docker-compose config`, which also validates the file."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.cli import main
from tests.conftest import missing
from workers.config import load_settings
from workers.env import variables

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SPILLWAY = {name: s for name, s in SERVICES.items() if s.get("image") == "spillway:latest"}
EXAMPLE = load_settings(ROOT / "spillway.toml")
KEY_ENVS = {p.key_env for p in EXAMPLE.providers.values() if p.key_env}
SIMULATED = {"simulator", "demo"}  # only with `--profile simulator`
MONITORING = {"prometheus", "grafana"}  # only with `--profile monitoring`
PROFILES = {name: ["simulator" if name in SIMULATED else "monitoring"] for name in SIMULATED | MONITORING}
REAL = {"worker-free", "worker-paid", "flower", "serve"}  # what a real .env configures
CREDENTIALS = {"FLOWER_BASIC_AUTH": "ops:x", "SPILLWAY_API_TOKEN": "x"}
REAL_DOTENV = """\
# a real .env: real keys, two accounts of OpenAI, no simulator
GROQ_API_KEY=gsk_live_7d1f0c2e9a
OPENAI_API_KEY=sk-proj-live-1
OPENAI_API_KEY_1=sk-proj-live-2
ANTHROPIC_API_KEY=sk-ant-live
"""


def read_by_code() -> set[str]:
    return {name for name, *_ in variables()}


def parse_dotenv(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


# -- a small renderer: what `docker-compose config` does with env_file, environment and profiles


def interpolate(value: str, source: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR, $$."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op") or "", match.group("arg") or ""
        present, value = name in source, source.get(name, "")
        if op in (":-", ":?"):
            present = bool(value)
        if present:
            return value
        if op.endswith("?"):
            raise ValueError(f"{name}: {arg}")
        return arg

    pattern = r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<plain>\w+)"
    return re.sub(pattern, one, value)


def render(
    dotenv: str | None, shell: Mapping[str, str], profiles: tuple[str, ...] = ()
) -> dict[str, dict[str, str]]:
    """The environment of every service that `up` would start: the env_file (.env) first, then
    `environment`, interpolated from the shell over .env (as docker-compose does)."""
    dotenv_vars = parse_dotenv(dotenv) if dotenv is not None else None
    source = {**(dotenv_vars or {}), **shell}
    rendered = {}
    for name, service in SERVICES.items():
        if service.get("profiles") and not set(service["profiles"]) & set(profiles):
            continue
        env: dict[str, str] = {}
        for env_file in service.get("env_file", []):
            assert env_file == ".env", f"{name}: reads {env_file}, not .env"
            if dotenv_vars is None:
                raise FileNotFoundError(env_file)
            env.update(dotenv_vars)
        for key, value in (service.get("environment") or {}).items():
            env[key] = interpolate(str(value), source)
        rendered[name] = env
    return rendered


def assert_no_simulator(services: Mapping[str, Mapping[str, Any]]) -> None:
    for name in REAL:
        env = {k: str(v) for k, v in (services[name].get("environment") or {}).items()}
        sim = {k: v for k, v in env.items() if v.startswith("sim-") or "simulator" in v}
        assert not sim, f"{name} gets simulator values: {sim}"
        assert not env.get("SPILLWAY_SIMULATOR_URL"), name
        assert env["GROQ_API_KEY"] == "gsk_live_7d1f0c2e9a" and env["OPENAI_API_KEY_1"] == "sk-proj-live-2"
        assert "GEMINI_API_KEY" not in env  # a provider without a key stays without one


# -- the file itself


def test_every_spillway_command_parses() -> None:
    assert set(SPILLWAY) == {"simulator", "worker-free", "worker-paid", "flower", "serve", "demo"}
    for service in SPILLWAY.values():
        # the image's /app is this repository (its files are checked: the batch input exists)
        command = [re.sub(r"^/app/", f"{ROOT}/", arg) for arg in service["command"]]
        sub = main.commands[command[0]]
        sub.make_context(command[0], command[1:])  # raises on an unknown option or value


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
    known = read_by_code() | KEY_ENVS
    for name, service in SPILLWAY.items():
        unknown = set(service["environment"]) - known
        assert not unknown, f"{name}: variables the code never reads: {unknown}"
        assert service["environment"]["SPILLWAY_CONFIG"] == "/app/spillway.toml"
        # keys and the simulator's URL come from .env alone, never from the compose file
        named = set(service["environment"]) & (KEY_ENVS | {"SPILLWAY_SIMULATOR_URL"})
        assert not named, f"{name} sets {named} itself"
    example = parse_dotenv((ROOT / ".env.example").read_text())
    assert set(example) == KEY_ENVS | {"SPILLWAY_SIMULATOR_URL"}
    assert set(example) <= known
    assert all(example[key].startswith("sim-") for key in KEY_ENVS)
    assert example["SPILLWAY_SIMULATOR_URL"] == "http://simulator:8900"
    assert SERVICES["simulator"]["command"][-1] == "8900"


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


def test_the_image_has_a_writable_data_dir_on_a_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1]
    assert re.findall(r"^WORKDIR (\S+)", dockerfile, re.M)[-1] == "/data"  # sqlite:///spillway.db lands there
    assert re.search(rf"install -d -o {user} -g {user} [^\n]*/data\b", dockerfile)
    for name, service in SPILLWAY.items():
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get("/data") in COMPOSE["volumes"], f"{name}: no volume on /data"


def test_the_demo_keeps_its_output_on_the_host() -> None:
    demo = SERVICES["demo"]
    output = demo["command"][demo["command"].index("-o") + 1]
    binds = {v.split(":")[1]: v.split(":")[0] for v in demo["volumes"]}
    assert output.startswith("/out/") and binds["/out"] == "./out"


def test_dockerignore_keeps_secrets_and_junk_out_but_not_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".env", ".venv", ".git", "**/__pycache__", ".pytest_cache", "**/*.db", "out"):
        assert needed in patterns, needed
    excluded = [p for p in patterns if not p.startswith("!")]
    copied = [
        src
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
    ]
    assert copied and "workers" in copied and "README.md" in copied
    for src in copied:
        hits = [p for p in excluded if fnmatch.fnmatch(src, p.removeprefix("**/"))]
        assert not hits, f"{src} is copied by the Dockerfile but .dockerignore drops it ({hits})"


# -- profiles, healthchecks, start order


def test_the_simulator_and_the_demo_only_run_with_their_profile() -> None:
    assert "version" not in COMPOSE  # the Compose Specification: profiles, health conditions
    for name, service in SERVICES.items():
        assert service.get("profiles", []) == PROFILES.get(name, []), name
        if not service.get("profiles"):
            assert not set(service.get("depends_on") or {}) & SIMULATED, f"{name} would pull in the simulator"
            assert not set(service.get("depends_on") or {}) & MONITORING, f"{name} would pull in Grafana"
    assert "env_file" not in SERVICES["simulator"] or SERVICES["simulator"]["env_file"] == []


def test_healthchecks_and_start_order() -> None:
    for name, service in SERVICES.items():
        if name != "demo":  # the one-shot batch exits
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for target, condition in depends.items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {target}"
            assert "healthcheck" in SERVICES[target], target
    for name in SPILLWAY.keys() - {"simulator"}:
        assert {"redis", "postgres"} <= set(SERVICES[name]["depends_on"]), name
    assert {"simulator", "worker-free", "worker-paid"} <= set(SERVICES["demo"]["depends_on"])
    for name in ("worker-free", "worker-paid"):  # each worker pings its own node, -n NODE@%h
        node = SERVICES[name]["command"][SERVICES[name]["command"].index("-n") + 1]
        assert node.endswith("@%h")
        assert f'-d "{node[:-3]}@$$HOSTNAME"' in SERVICES[name]["healthcheck"]["test"][1]


# -- rendered with a real .env, and with the example (the simulated demo)


@pytest.mark.parametrize("simulator_url", [None, ""])
def test_a_real_env_never_meets_the_simulator(simulator_url: str | None) -> None:
    dotenv = REAL_DOTENV + ("" if simulator_url is None else f"SPILLWAY_SIMULATOR_URL={simulator_url}\n")
    rendered = render(dotenv, CREDENTIALS)
    assert set(rendered) == set(SERVICES) - SIMULATED - MONITORING
    assert_no_simulator({name: {"environment": env} for name, env in rendered.items()})
    simulator = render(dotenv, CREDENTIALS, ("simulator",))["simulator"]
    assert not set(simulator) & set(parse_dotenv(dotenv))  # it takes any key: it gets none of .env


def test_the_example_env_runs_the_simulated_demo() -> None:
    rendered = render((ROOT / ".env.example").read_text(), CREDENTIALS, ("simulator",))
    assert set(rendered) == set(SERVICES) - MONITORING
    for name in REAL | {"demo"}:
        assert rendered[name]["SPILLWAY_SIMULATOR_URL"] == "http://simulator:8900", name
        assert all(rendered[name][key].startswith("sim-") for key in KEY_ENVS), name


def test_credentials_and_env_are_required() -> None:
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
        render(REAL_DOTENV, {"SPILLWAY_API_TOKEN": "x"})
    with pytest.raises(FileNotFoundError):
        render(None, CREDENTIALS)


# -- docker-compose itself


def docker_compose(
    tmp_path: Path, dotenv: str | None, *args: str, **extra: str
) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        missing("docker-compose is not installed (.ci/run installs Debian's package)")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    # a clean environment: only what the README's command line gives
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **extra}
    return subprocess.run(
        [str(binary), *args, "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("simulator_url", [None, ""])
def test_docker_compose_renders_a_real_env_without_the_simulator(
    tmp_path: Path, simulator_url: str | None
) -> None:
    dotenv = REAL_DOTENV + ("" if simulator_url is None else f"SPILLWAY_SIMULATOR_URL={simulator_url}\n")
    out = docker_compose(tmp_path, dotenv, **CREDENTIALS)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == set(SERVICES)  # 1.29 lists every service, with its profiles
    assert_no_simulator(services)
    for name, service in services.items():
        assert service.get("profiles", []) == PROFILES.get(name, []), name
    assert "GROQ_API_KEY" not in services["simulator"].get("environment", {})


def test_docker_compose_renders_the_simulated_demo(tmp_path: Path) -> None:
    out = docker_compose(
        tmp_path, (ROOT / ".env.example").read_text(), "--profile", "simulator", **CREDENTIALS
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name in REAL | {"demo"}:
        assert services[name]["environment"]["SPILLWAY_SIMULATOR_URL"] == "http://simulator:8900"
        assert services[name]["environment"]["XAI_API_KEY"] == "sim-xai"
    assert services["demo"]["depends_on"]["simulator"] == {"condition": "service_healthy"}


def test_docker_compose_demands_credentials_and_env(tmp_path: Path) -> None:
    no_flower = docker_compose(tmp_path, REAL_DOTENV, SPILLWAY_API_TOKEN="x")
    assert no_flower.returncode != 0 and "FLOWER_BASIC_AUTH" in no_flower.stderr
    (tmp_path / ".env").unlink()
    no_env = docker_compose(tmp_path, None, **CREDENTIALS)
    assert no_env.returncode != 0 and ".env" in no_env.stderr


# -- the monitoring profile: Prometheus and Grafana on the shipped files


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> host path (or volume) of a service's volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}


def test_monitoring_mounts_the_shipped_files_and_they_fit_together() -> None:
    prometheus, grafana = SERVICES["prometheus"], SERVICES["grafana"]
    assert {"flower", "serve"} <= set(prometheus["depends_on"]) and "prometheus" in grafana["depends_on"]
    for name in MONITORING:  # each bind mount is a file or folder of this repository, read-only
        for volume in SERVICES[name]["volumes"]:
            source, _target, *mode = volume.split(":")
            assert source in COMPOSE["volumes"] or ((ROOT / source).exists() and mode == ["ro"]), volume
    # Prometheus reads the shipped config, scrapes Flower and serve where compose runs them, and
    # sends serve's token from the file its entrypoint writes on a tmpfs
    script = prometheus["command"][0]
    config_path = re.search(r"--config.file=(\S+)", script).group(1)
    config = yaml.safe_load((ROOT / mounts(prometheus)[config_path]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    flower_port = SERVICES["flower"]["command"][SERVICES["flower"]["command"].index("--port") + 1]
    serve_port = SERVICES["serve"]["command"][SERVICES["serve"]["command"].index("--port") + 1]
    assert jobs["flower"]["static_configs"] == [{"targets": [f"flower:{flower_port}"]}]
    assert jobs["spillway"]["static_configs"] == [{"targets": [f"serve:{serve_port}"]}]
    token_file = jobs["spillway"]["authorization"]["credentials_file"]
    assert f"> {token_file} &&" in script and str(Path(token_file).parent) in prometheus["tmpfs"]
    assert (
        prometheus["environment"]["SPILLWAY_API_TOKEN"]
        == SERVICES["serve"]["environment"]["SPILLWAY_API_TOKEN"]
    )
    assert config["global"]["scrape_interval"] == "15s"
    # Grafana: its data source is that Prometheus, its dashboards come from the mounted folder,
    # and the dashboards name the data source by its uid
    grafana_mounts = mounts(grafana)
    provisioning = ROOT / grafana_mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "127.0.0.1:9090:9090" in prometheus["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards/spillway.yml").read_text())["providers"]
    dashboards = ROOT / grafana_mounts[provider["options"]["path"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).relative_to(provider["options"]["path"])).exists()
    for board in dashboards.glob("*.json"):
        text = board.read_text()
        assert set(re.findall(r'"uid": "([^"]+)"', text)) - {json.loads(text)["uid"]} == {datasource["uid"]}
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def run_entrypoint(
    service: Mapping[str, Any], env: dict[str, str], **replace: str
) -> subprocess.CompletedProcess:
    """A monitoring service's `sh -c` entrypoint, run here, with its paths and programs replaced."""
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    script = service["command"][0].replace("$$", "$")  # Compose's escape of a literal $
    for old, new in replace.items():
        assert old in script, old
        script = script.replace(old, new)
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=10)


def test_the_monitoring_entrypoints_pass_the_token_and_demand_a_grafana_password(tmp_path: Path) -> None:
    ran = run_entrypoint(
        SERVICES["prometheus"],
        {"SPILLWAY_API_TOKEN": "tok-$pecial 1"},
        **{"/run/spillway": str(tmp_path), "/bin/prometheus": "true"},
    )
    assert ran.returncode == 0, ran.stderr
    token = tmp_path / "api-token"
    assert token.read_text() == "tok-$pecial 1" and token.stat().st_mode & 0o077 == 0
    grafana = SERVICES["grafana"]
    started = run_entrypoint(grafana, {"GF_SECURITY_ADMIN_PASSWORD": "pw"}, **{"/run.sh": "true"})
    assert started.returncode == 0, started.stderr
    refused = run_entrypoint(grafana, {"GF_SECURITY_ADMIN_PASSWORD": ""}, **{"/run.sh": "true"})
    assert refused.returncode == 1 and "set GRAFANA_ADMIN_PASSWORD" in refused.stderr
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    monitored = render(REAL_DOTENV, {**CREDENTIALS, "GRAFANA_ADMIN_PASSWORD": "pw"}, ("monitoring",))
    assert set(monitored) == set(SERVICES) - SIMULATED
    assert monitored["grafana"]["GF_SECURITY_ADMIN_PASSWORD"] == "pw"
    assert not set(monitored["grafana"]) & set(parse_dotenv(REAL_DOTENV))  # no key reaches them
    assert not set(monitored["prometheus"]) & set(parse_dotenv(REAL_DOTENV))


@pytest.mark.parametrize("simulated", [False, True])
def test_docker_compose_renders_the_monitoring_profile(tmp_path: Path, simulated: bool) -> None:
    """As the README starts it: on real keys, or on the example .env with the simulator too."""
    dotenv = (ROOT / ".env.example").read_text() if simulated else REAL_DOTENV
    profiles = ["--profile", "simulator"] * simulated + ["--profile", "monitoring"]
    out = docker_compose(tmp_path, dotenv, *profiles, **CREDENTIALS, GRAFANA_ADMIN_PASSWORD="pw-3000")
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) == set(SERVICES)
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "pw-3000"
    assert services["prometheus"]["environment"]["SPILLWAY_API_TOKEN"] == CREDENTIALS["SPILLWAY_API_TOKEN"]
    for name in MONITORING:  # relative binds resolve next to the compose file: the shipped files
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("/"):
                assert (ROOT / Path(source).relative_to(tmp_path)).exists(), source
    assert services["prometheus"]["tmpfs"] == ["/run/spillway"]
