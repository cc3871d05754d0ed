"""Helpers the benchmarks share: a stack from a config text, and waiting on the store."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from producer.ops.stack import LocalStack
from workers.store import Store


def stack_from(text: str, workdir: Path, **kwargs) -> LocalStack:
    config = workdir / "bench.toml"
    config.write_text(text)
    return LocalStack(config, workdir=str(workdir), **kwargs)


def wait_all_final(store: Store, total: int, timeout_s: float, *, batch_id: str | None = None) -> float:
    """When (monotonic clock) `total` jobs (of `batch_id`, else any) are final; raises
    TimeoutError on timeout.

    The count reads every job (5 ms of CPU at 8,000 on PostgreSQL): polled every 50 ms, the
    watcher itself took a tenth of a core from the run it times. So it polls every 50 ms only
    near the end the rate so far predicts, and at most every half second before."""
    deadline = time.monotonic() + timeout_s
    first: tuple[float, int] | None = None
    while (now := time.monotonic()) < deadline:
        counts = store.count_by_status(batch_id)
        done = counts.get("succeeded", 0) + counts.get("failed", 0)
        if done >= total:
            return now
        first = first or (now, done)
        rate = (done - first[1]) / (now - first[0]) if now > first[0] else 0.0
        left_s = (total - done) / rate if rate > 0 else 0.0
        time.sleep(min(0.5, max(0.05, left_s / 2)))
    raise TimeoutError(f"jobs not final after {timeout_s:g}s: {store.count_by_status(batch_id)}")


def cpu_s(procs: list[subprocess.Popen[Any]]) -> float:
    """User + system CPU of every process in these trees (the supervisor and its Celery child)."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = p.cpu_times()
                    total += times.user + times.system
    return total


def machine_busy_s() -> float:
    """CPU seconds every core of this machine has spent on anything but idling, since boot."""
    times = psutil.cpu_times()  # not steal (another VM's) nor guest (already in user)
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def named_cpu_s(name: str) -> dict[int, float]:
    """User + system CPU of each running process called `name` (the database server's), by pid."""
    found = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        if p.info["name"] == name and p.info["cpu_times"] is not None:
            found[p.pid] = p.info["cpu_times"].user + p.info["cpu_times"].system
    return found


def spent_since(before: dict[int, float], after: dict[int, float]) -> float:
    """What processes spent between two `named_cpu_s` readings (those started since: all of it)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
