"""`Client`: one Spillway deployment, as a producer sees it — its config, store, limiter and
broker, all named by one `Env`.

The module-level `submit`, `get` and `submit_batch` use a default client built on first use
from this process's environment (and a ``.env`` file), the way ``httpx.get`` uses a client of
its own. A script that talks to two deployments, or a test that talks to a stack it started,
makes its own::

    with Client(Env.from_environ(stack_env)) as client:
        print(client.submit("Hi", task="chat", tier="free").wait(60).text)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from producer import batch as batches
from producer import jobs
from workers import discovery
from workers.celery import SpillwayCelery, make_app
from workers.env import Env
from workers.results import JobResult
from workers.runtime import Runtime


class Client:
    def __init__(self, env: Env | None = None, *, runtime: Runtime | None = None) -> None:
        self.env = env or (runtime.env if runtime else Env.from_environ())
        if runtime is not None:
            self.runtime = runtime
        self._lock = threading.Lock()

    @cached_property
    def runtime(self) -> Runtime:
        """Config, keys, store, limiter and router; built on first use (reads the config)."""
        with self._lock:
            return self.__dict__.get("runtime") or Runtime(env=self.env, quiet=True)

    @cached_property
    def app(self) -> SpillwayCelery:
        """A Celery app on this deployment's broker; it publishes by task name only."""
        return make_app(self.env)

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, prompt: str | None = None, **fields: Any) -> jobs.JobHandle:
        """Store one job and publish it to the provider queue that can finish it soonest::

            handle = client.submit("Summarise: ...", task="analysis", tier="free")
            print(handle.wait(60).text)

        Fields: `messages`, `task`, `tier` (required), `system`, `max_tokens`, `temperature`,
        `stop`, `json_mode`, `preferred_provider`, `idempotency_key`, `callback_url`, `deadline_s`.
        """
        return jobs.submit(self, prompt, **fields)

    def get(self, job_id: str) -> JobResult:
        """A job's current state; InputError if the store does not know the id."""
        return jobs.get(self, job_id)

    def job(self, job_id: str) -> jobs.JobHandle:
        return jobs.JobHandle(job_id, self)

    # -- batches --------------------------------------------------------------------------------

    def submit_batch(self, items: Iterable[dict[str, Any]], **options: Any) -> batches.BatchHandle:
        """Many jobs as one batch (see `producer.batch.submit_batch`)."""
        return batches.submit_batch(self, items, **options)

    def submit_file(self, path: str | Path, **options: Any) -> batches.BatchHandle:
        """A JSONL file as one batch; the same file, output, task and tier resume it."""
        return batches.submit_file(self, path, **options)

    def batch(self, batch_id: str) -> batches.BatchHandle:
        return batches.BatchHandle(batch_id, self)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        if "runtime" in self.__dict__:
            self.runtime.close()
        if "app" in self.__dict__:
            self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The process's client, built on first use from its environment and a ``.env`` file."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                discovery.load_dotenv()  # ./.env, else the user config directory's
                _default = Client()
    return _default


@contextmanager
def using(client: Client) -> Iterator[Client]:
    """Make `client` the default for a while (the module-level functions use it)."""
    global _default
    with _default_lock:
        before, _default = _default, client
    try:
        yield client
    finally:
        with _default_lock:
            _default = before


def submit(prompt: str | None = None, **fields: Any) -> jobs.JobHandle:
    """`Client.submit` on the default client::

    handle = submit("Explain token buckets in one line.", task="chat", tier="free")
    print(handle.wait(60).text)
    """
    return default_client().submit(prompt, **fields)


def get(job_id: str) -> JobResult:
    """`Client.get` on the default client."""
    return default_client().get(job_id)


def submit_batch(items: Iterable[dict[str, Any]], **options: Any) -> batches.BatchHandle:
    """`Client.submit_batch` on the default client::

    handle = submit_batch([{"custom_id": "a", "prompt": "Hi"}], task="analysis", tier="free")
    handle.wait()
    for record in handle.results():
        print(record["custom_id"], record["text"])
    """
    return default_client().submit_batch(items, **options)
