"""A whole Spillway on one machine, as child processes: Redis (if none is given), the
simulator and workers. `spillway demo`, the integration tests and the benchmarks use it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx

from producer.client import Client, using
from workers.config import Settings, load_settings
from workers.embedded import EmbeddedRedis, free_port, start_redis
from workers.env import Env


class LocalStack:
    """Start with `start()`, stop with `close()` (or use it as a context manager)."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        redis_url: str | None = None,
        celery_broker_url: str | None = None,
        celery_result_backend: str | None = None,
        database_url: str | None = None,
        workdir: str | None = None,
        keys_per_provider: dict[str, int] | None = None,
        extra_env: dict[str, str] | None = None,
        redis_db: int = 0,
    ) -> None:
        self.config_path = str(Path(config_path).resolve())
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="spillway-stack-")
        self.workdir = Path(workdir or self._tmp.name)
        self.redis: EmbeddedRedis | None = None
        self.redis_url = redis_url
        self.redis_db = redis_db
        self.celery_broker_url = celery_broker_url
        self.celery_result_backend = celery_result_backend
        self.database_url = database_url or f"sqlite:///{self.workdir / 'spillway.db'}"
        self.keys_per_provider = keys_per_provider or {}
        self.extra_env = extra_env or {}
        self.simulator: subprocess.Popen[str] | None = None
        self.simulator_url = ""
        self.workers: list[subprocess.Popen[bytes]] = []
        self.services: list[subprocess.Popen[bytes]] = []  # Flower, `spillway serve`
        self.env: dict[str, str] = {}
        self._logs: list[IO[Any]] = []
        self._clients: dict[tuple[tuple[str, str], ...], Client] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, *, simulator: bool = True) -> LocalStack:
        if self.redis_url is None:
            self.redis = start_redis()
            self.redis_url = self.redis.url(self.redis_db)
            broker = self.redis.celery_url(self.redis_db)
        else:
            broker = self.redis_url.replace("unix://", "redis+socket://")
        settings = load_settings(self.config_path)
        self.env = {
            "SPILLWAY_CONFIG": self.config_path,
            "SPILLWAY_REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.celery_broker_url or broker,
            "CELERY_RESULT_BACKEND": self.celery_result_backend or broker,
            "SPILLWAY_DATABASE_URL": self.database_url,
            **fake_keys(settings, self.keys_per_provider),
            **self.extra_env,
        }
        if simulator:
            self.start_simulator()
        return self

    def start_simulator(self, port: int = 0) -> str:
        log = self._log_file("simulator.log")
        self.simulator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "producer.cli",
                "simulate",
                "--config",
                self.config_path,
                "--port",
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        line = self.simulator.stdout.readline() if self.simulator.stdout else ""
        if "listening on " not in line:
            self.close()
            raise RuntimeError(f"the simulator did not start: {line!r} (see {log.name})")
        self.simulator_url = line.rsplit(" ", 1)[1].strip()
        self.env["SPILLWAY_SIMULATOR_URL"] = self.simulator_url
        return self.simulator_url

    def start_worker(
        self,
        *,
        providers: list[str] | None = None,
        concurrency: int = 16,
        name: str | None = None,
        extra_env: dict[str, str] | None = None,
        loglevel: str = "INFO",
    ) -> subprocess.Popen[bytes]:
        index = len(self.workers)
        name = name or f"w{index}-{os.getpid()}@%h"
        argv = [
            sys.executable,
            "-m",
            "producer.cli",
            "worker",
            "-c",
            str(concurrency),
            "-n",
            name,
            "-l",
            loglevel,
        ]
        if providers:
            argv += ["--providers", ",".join(providers)]
        log = self._log_file(f"worker{index}.log")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, **(extra_env or {})},
            start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, count: int | None = None, timeout_s: float = 60.0) -> None:
        """Until `count` workers answer a ping (default: every worker started)."""
        app = self.client().app
        want = len([w for w in self.workers if w.poll() is None]) if count is None else count
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=0.5)
            if len(replies) >= want:
                return
            dead = [w for w in self.workers if w.poll() is not None]
            if dead and count is None:
                raise RuntimeError(f"a worker exited with {dead[0].returncode}; see {self.workdir}")
        raise TimeoutError(f"{want} worker(s) did not answer within {timeout_s:g}s; logs in {self.workdir}")

    def kill_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(30)

    def simulator_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.simulator_url}/_sim/stats", timeout=5).json()

    def set_faults(self, provider: str, faults: dict[str, float]) -> None:
        httpx.post(
            f"{self.simulator_url}/_sim/faults", json={"provider": provider, "faults": faults}, timeout=5
        ).raise_for_status()

    def start_service(
        self,
        command: list[str],
        ready_path: str,
        *,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> str:
        """Start a `spillway` command that listens on 127.0.0.1 (`flower`, `serve`); its URL once
        `ready_path` answers."""
        port = port or free_port()
        log = self._log_file(f"{command[0]}.log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", *command, "--port", str(port)],
            stdout=log,
            stderr=log,
            env={**os.environ, **self.env, **(extra_env or {})},
            start_new_session=True,
        )
        self.services.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`spillway {command[0]}` exited with {proc.returncode} (see {log.name})")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + ready_path, timeout=1)
                return url
            time.sleep(0.2)
        raise TimeoutError(f"`spillway {command[0]}` did not answer on {url} in {timeout_s:.0f}s")

    def start_flower(self, port: int | None = None, timeout_s: float = 60.0) -> str:
        """Flower on this stack, once it hears from every worker (it shows only the tasks whose
        events it receives while connected)."""
        url = self.start_service(["flower", "--address", "127.0.0.1"], "/healthcheck", port=port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()  # served without auth
            online = [m for m in metrics if m.startswith("flower_worker_online{") and m.endswith(" 1.0")]
            if len(online) >= max(1, len(self.workers)):
                return url
            time.sleep(0.3)
        raise TimeoutError(f"Flower on {url} heard from no worker in {timeout_s:.0f}s")

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients = {}
        for proc in self.services:
            stop_process(proc, graceful_s=5)
        self.services = []
        for proc in self.workers:
            stop_process(proc, graceful_s=10)
        self.workers = []
        if self.simulator is not None:
            stop_process(self.simulator, graceful_s=3)
            self.simulator = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        for log in self._logs:
            log.close()
        self._logs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- the producer side, in this process ---------------------------------------------------

    def client(self) -> Client:
        """A producer client on this stack (one per state of its environment)."""
        key = tuple(sorted(self.env.items()))
        if key not in self._clients:
            self._clients[key] = Client(Env.overlaid(self.env))
        return self._clients[key]

    @contextlib.contextmanager
    def applied(self) -> Iterator[Client]:
        """This process's default client (`producer.submit`, `get`…) on the stack, for a while."""
        with using(self.client()) as client:
            yield client

    def settings(self) -> Settings:
        return self.client().runtime.settings

    def _log_file(self, name: str) -> IO[Any]:
        log = open(self.workdir / name, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        return log


def fake_keys(settings: Settings, per_provider: dict[str, int]) -> dict[str, str]:
    """Recognisable fake keys for every provider that wants one (the simulator takes any)."""
    env = {}
    for name, provider in settings.providers.items():
        if provider.key_env is None:
            continue
        for i in range(per_provider.get(name, 1)):
            suffix = f"_{i}" if i else ""
            env[f"{provider.key_env}{suffix}"] = f"sk-sim-{name}-{i}-{os.urandom(6).hex()}"
    return env


def stop_process(proc: subprocess.Popen[Any], graceful_s: float = 10) -> None:
    """SIGTERM to its process group (started with start_new_session), then SIGKILL after graceful_s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(graceful_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
