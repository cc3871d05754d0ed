"""Shared fixtures: a private Redis and PostgreSQL schema per test session, a store on each
backend, and the whole stack (simulator + worker processes) for integration tests.

A missing service skips locally and fails in CI (CI=true).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from producer.jobs import job_row
from workers.config import Candidate, parse_settings
from workers.embedded import EmbeddedRedis, start_redis
from workers.env import Env
from workers.limiter import Clock
from workers.messages import build_request
from workers.runtime import Runtime
from workers.simulator import SimServer, sim_settings, start_in_thread
from workers.store import Store

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
    from producer.ops.stack import LocalStack

    stack = LocalStack(
        CONFIGS / "e2e.toml",
        redis_url=redis_server.url(2),
        extra_env={"SPILLWAY_CALLBACK_SECRET": "whsec-test-0123456789"},
    )
    redis.Redis.from_url(redis_server.url(2)).flushdb()
    stack.start()
    stack.start_worker(concurrency=16)
    stack.wait_for_workers()
    yield stack
    stack.close()


# -- a whole runtime in this process (plain-function tests of execution, status, route) -------

RUNTIME_CONFIG = """
[spillway]
inline_wait_s = 0.2
max_countdown_s = 30
max_hops = 4

[providers.a]
api = "openai"
base_url = "https://a.example/v1"
key_env = "A_KEY"
timeout_s = 2
limits = {{ {a_limits} }}
circuit = {{ failures = 3, cooldown_s = 60 }}
[providers.a.models.am]
input_per_mtok = 1.0
output_per_mtok = 2.0
max_output_tokens = 4096

[providers.b]
api = "anthropic"
base_url = "https://b.example"
key_env = "B_KEY"
timeout_s = 2
limits = {{ {b_limits} }}
[providers.b.models.bm]
input_per_mtok = 3.0
output_per_mtok = 4.0
max_output_tokens = 8192

[routes.chat]
free = ["a:am", "b:bm"]
[routes.solo]
free = ["a:am"]

[simulator]
latency_ms = {{ median = 1, p95 = 2 }}
[simulator.providers.a]
reject_keys = ["bad-*"]
"""
A, B = Candidate("a", "am"), Candidate("b", "bm")


#: The e2e config with the simulator's batch APIs quick (0.5 s turnaround) and keys named
#: `bad-*` refused by every provider: what the batch adapter and simulator tests run on.
BATCH_SIM_TURNAROUND_S = 0.5
BATCH_SIM_CONFIG = (
    (CONFIGS / "e2e.toml").read_text()
    + f"""
[simulator.batch]
turnaround_s = {BATCH_SIM_TURNAROUND_S}
[simulator.providers.openai]
reject_keys = ["bad-*"]
[simulator.providers.groq]
reject_keys = ["bad-*"]
[simulator.providers.anthropic]
reject_keys = ["bad-*"]
[simulator.providers.gemini]
reject_keys = ["bad-*"]
"""
)


@pytest.fixture
def batch_sim() -> Iterator[SimServer]:
    """The simulator on BATCH_SIM_CONFIG, in a thread, on a free port."""
    server = start_in_thread(sim_settings(parse_settings(BATCH_SIM_CONFIG, "batch-sim.toml"), port=0))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def make_rt(redis_client: redis.Redis, tmp_path: Path) -> Iterator:
    servers: list[SimServer] = []

    def build(
        a_limits: str = "rpm = 1000",
        b_limits: str = "rpm = 1000",
        a_key: str = "sk-a-1",
        http: httpx.Client | None = None,
        environ: dict[str, str] | None = None,
    ) -> Runtime:
        text = RUNTIME_CONFIG.format(a_limits=a_limits, b_limits=b_limits)
        server = start_in_thread(sim_settings(parse_settings(text, "x.toml"), port=0))
        servers.append(server)
        settings = parse_settings(text, "x.toml", simulator_url=server.url)
        rt = Runtime(
            settings,
            env=Env.from_environ({"A_KEY": a_key, "B_KEY": "sk-b-1", **(environ or {})}),
            store=Store(f"sqlite:///{tmp_path}/s.db"),
            redis_client=redis_client,
            clock=Clock(),
            http=http or httpx.Client(),
            quiet=True,
        )
        rt.sim = server
        return rt

    yield build
    for server in servers:
        server.shutdown()
        server.server_close()


def add_job(
    rt: Runtime,
    task: str = "chat",
    target: Candidate = A,
    prompt: str = "hello there",
    max_tokens: int = 16,
    **extra,
) -> str:
    job_id = uuid.uuid4().hex
    rt.store.add_jobs(
        [job_row(job_id, task, "free", build_request(prompt, max_tokens=max_tokens), target=target, **extra)]
    )
    return job_id


def snapshot(rt: Runtime, c: Candidate) -> dict:
    """The first account of a candidate as the limiter sees it now."""
    return rt.limiter.snapshots([c])[c].accounts[0]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The fault suite's table: faults injected, jobs submitted, lost, charged twice, bad inputs."""
    from tests.faultkit import FULL, LEDGER

    if not LEDGER.rows:
        return
    mode = "full" if FULL else "quick (SPILLWAY_FAULTS=full for the long version)"
    w = max(44, *(len(r.scenario) + 1 for r in LEDGER.rows))
    lines = [
        f"fault suite — {mode}",
        f"{'scenario':<{w}}{'faults':>8}{'jobs':>8}{'lost':>6}{'charged 2x':>12}{'bad inputs':>12}"
        f"{'rejected ok':>13}{'calls seen/ledger (in doubt)':>30}",
    ]
    for r in LEDGER.rows:
        calls = "" if r.provider_calls is None else f"{r.provider_calls}/{r.ledger_calls}"
        calls += f" ({r.in_doubt}?)" if r.in_doubt else ""
        lines.append(
            f"{r.scenario:<{w}}{r.faults:>8}{r.submitted:>8}{r.lost:>6}{r.charged_twice:>12}"
            f"{r.bad_inputs:>12}{r.rejected_cleanly:>13}{calls:>30}"
        )
    total = [
        sum(getattr(r, k) for r in LEDGER.rows)
        for k in ("faults", "submitted", "lost", "charged_twice", "bad_inputs", "rejected_cleanly")
    ]
    lines.append(
        f"{'total':<{w}}{total[0]:>8}{total[1]:>8}{total[2]:>6}{total[3]:>12}{total[4]:>12}{total[5]:>13}"
    )
    terminalreporter.write_sep("=", "faults")
    for line in lines:
        terminalreporter.write_line(line)
