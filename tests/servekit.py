"""`spillway serve`'s server in a thread of the test's own process (no subprocess to start)."""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from producer.client import Client
from producer.ops.serve import make_server
from workers.config import parse_settings
from workers.env import Env
from workers.runtime import Runtime
from workers.simulator import sim_settings, start_in_thread
from workers.store import Store


@contextmanager
def front_stack(
    config: str, redis_url: str, store: Path, **variables: str
) -> Iterator[types.SimpleNamespace]:
    """What serve runs on: a runtime on `redis_url` (also broker and results) and a fresh
    SQLite store, with the simulator in a thread serving `config`'s providers. Yields
    ``client``, ``rt`` and ``sim``; `variables` are the environment's (keys, settings)."""
    sim = start_in_thread(sim_settings(parse_settings(config, "front.toml"), port=0))
    urls = {
        "SPILLWAY_REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
    }
    env = Env.from_environ({**urls, **variables})
    settings = parse_settings(config, "front.toml", simulator_url=sim.url)
    rt = Runtime(settings, env=env, store=Store(f"sqlite:///{store}"), quiet=True)
    client = Client(env, runtime=rt)
    try:
        yield types.SimpleNamespace(client=client, rt=rt, sim=sim)
    finally:
        if "app" in client.__dict__:
            client.app.close()
        rt.close()
        sim.shutdown()
        sim.server_close()


@contextmanager
def serve_in_thread(client: Client, token: str | None) -> Iterator[tuple[str, HTTPServer]]:
    """The server on a free loopback port, in a thread with its own event loop: its URL and
    the server (its `request_callback` is the app). Stopped on the way out."""
    started, box = threading.Event(), {}

    def run() -> None:
        async def main() -> None:
            server = make_server(client, token)
            sockets = bind_sockets(0, "127.0.0.1")
            server.add_sockets(sockets)
            box.update(
                port=sockets[0].getsockname()[1],
                loop=asyncio.get_running_loop(),
                done=asyncio.Event(),
                server=server,
            )
            started.set()
            await box["done"].wait()
            server.stop()

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10), "the server did not start within 10 s"
    loop: Any = box["loop"]
    try:
        yield f"http://127.0.0.1:{box['port']}", box["server"]
    finally:
        loop.call_soon_threadsafe(box["done"].set)
        thread.join(10)
