"""What `spillway serve`'s `/v1/chat/completions` adds over calling the provider directly.

`python -m bench.front_door [--quick]` prints the detail; `python -m bench --only front` the
summary rows.

Open loop: requests leave at a fixed rate whatever the answers do (a closed loop would hide
queueing). Phase 1, quota free: the same chat completion at `rate` requests/s to the simulator
directly, through a bare Python proxy on serve's own HTTP stack (`bench.bare_proxy`: no queue,
no store, no limiter) and through the front door (submit, queue, worker, provider, store,
answer), in alternating rounds after a warm-up, so that a neighbour's load on this shared
machine falls on all three; the differences of the latency percentiles are what each adds
(the proxy's is what Python's HTTP stack alone costs on this machine). Meanwhile the bench
listens on the channel workers announce finished jobs on (`workers.notify`): how many were
heard says whether serve was woken or had to find them by polling. Phase 2, overload:
`burst_rate` requests/s offered to a provider whose limit is far lower — every request must be
answered (queued, not failed) while a probe of `GET /v1/models` shows the server still
answers. Every loop is bounded in count and time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import cpu_s, stack_from
from workers.env import Env
from workers.keyspace import Keyspace
from workers.redisconn import connect

TOKEN = "sk-bench-front-door"
CONFIG = """
[spillway]
default_max_tokens = 16

[providers.fast]
api = "openai"
base_url = "https://fast.example/v1"
key_env = "FAST_KEY"
timeout_s = 30
limits = { rpm = 10000000, tpm = 1000000000, concurrency = 1000 }
[providers.fast.models.f1]

[providers.capped]
api = "openai"
base_url = "https://capped.example/v1"
key_env = "CAPPED_KEY"
timeout_s = 30
limits = { rpm = 1200 }  # a burst of 1,200, then 20 requests/s
[providers.capped.models.c1]

[routes.free]
free = ["fast:f1"]
[routes.capped]
free = ["capped:c1"]

[simulator]
seed = 3
latency_ms = { median = 20, p95 = 30 }
"""
BODY = {"messages": [{"role": "user", "content": "How long is a minute?"}], "max_tokens": 16}
WARM_UP_S = 2.0  # at the full rate, both ways: serve's and the worker's threads, connections, caches
PROBE_EVERY_S = 0.1
ANSWER_TIMEOUT_S = 300.0  # the overload drains at 20/s: 1,800 requests past the burst take 90 s


def run(
    workdir: Path,
    *,
    rate: float = 100,
    seconds: float = 10,
    burst_rate: float = 1000,
    burst_s: float = 3,
    rounds: int = 3,
    workers: int = 2,
    inline_calls: int | None = None,
    serve_processes: int = 1,
) -> dict[str, Any]:
    """Phase 1: `rounds` alternating rounds of `seconds / rounds` each way; phase 2: the burst.
    `inline_calls`: serve's `$SPILLWAY_SERVE_INLINE_CALLS` (None: its default);
    `serve_processes`: `spillway serve --processes`."""
    extra_env = {"SPILLWAY_API_TOKEN": TOKEN}
    if inline_calls is not None:
        extra_env["SPILLWAY_SERVE_INLINE_CALLS"] = str(inline_calls)
    stack = stack_from(CONFIG, workdir, extra_env=extra_env)
    stack.start()
    proxy: _BareProxy | None = None
    try:
        for _ in range(workers):  # one process tops out near 100 jobs/s (one GIL): a deployment runs more
            stack.start_worker(concurrency=64, loglevel="WARNING")
        stack.wait_for_workers()
        front = stack.start_service(["serve", "--processes", str(serve_processes)], "/v1/models")
        key = next(v for k, v in stack.env.items() if k.startswith("FAST_KEY"))
        direct_url = f"{stack.simulator_url}/fast/v1/chat/completions"
        through_url = f"{front}/v1/chat/completions"
        proxy = _BareProxy(direct_url, key)
        proxy_url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
        fast = {**BODY, "model": "f1"}
        for url, token in ((direct_url, key), (proxy_url, "-"), (through_url, TOKEN)):
            asyncio.run(_offer(url, token, fast, rate, WARM_UP_S))
        direct: list[dict[str, Any]] = []
        proxied: list[dict[str, Any]] = []
        through: list[dict[str, Any]] = []
        env = Env.from_environ({**os.environ, **stack.env})  # what the stack's processes read
        serve_cpu_s = workers_cpu_s = proxy_cpu_s = 0.0  # while their rounds ran
        with _Heard(env.redis_url, env.key_prefix) as heard:
            for _ in range(max(1, rounds)):
                direct.append(asyncio.run(_offer(direct_url, key, fast, rate, seconds / rounds)))
                proxy_before = cpu_s([proxy.proc])
                proxied.append(asyncio.run(_offer(proxy_url, "-", fast, rate, seconds / rounds)))
                proxy_cpu_s += cpu_s([proxy.proc]) - proxy_before
                serve_before, workers_before = cpu_s(stack.services), cpu_s(stack.workers)
                through.append(asyncio.run(_offer(through_url, TOKEN, fast, rate, seconds / rounds)))
                serve_cpu_s += cpu_s(stack.services) - serve_before
                workers_cpu_s += cpu_s(stack.workers) - workers_before
            heard_during = heard.count
        overload = burst_s and asyncio.run(
            _offer(
                through_url,
                TOKEN,
                {**BODY, "model": "spillway/capped"},
                burst_rate,
                burst_s,
                probe=f"{front}/v1/models",
            )
        )
    finally:
        if proxy is not None:
            proxy.stop()
        stack.close()
    d, p, t = _merge(direct), _merge(proxied), _merge(through)
    return {
        "rate": rate,
        "rounds": len(direct),
        "direct": d,
        "proxied": p,
        "through": t,
        "added_p50_ms": t["p50_ms"] - d["p50_ms"],
        "added_p99_ms": t["p99_ms"] - d["p99_ms"],
        "proxy_p50_ms": p["p50_ms"] - d["p50_ms"],
        "proxy_p99_ms": p["p99_ms"] - d["p99_ms"],
        "proxy_cpu_ms": proxy_cpu_s * 1000 / max(1, p["completed"]),
        "added_p50_by_round_ms": [b["p50_ms"] - a["p50_ms"] for a, b in zip(direct, through, strict=True)],
        "added_p99_by_round_ms": [b["p99_ms"] - a["p99_ms"] for a, b in zip(direct, through, strict=True)],
        # every job finishing in phase 1 was a through request's, and nothing else's
        "notified": heard_during,
        "serve_cpu_ms": serve_cpu_s * 1000 / max(1, t["completed"]),
        "workers_cpu_ms": workers_cpu_s * 1000 / max(1, t["completed"]),
        "overload": overload,
        "burst_rate": burst_rate,
        "serve_processes": serve_processes,
    }


class _BareProxy:
    """`bench.bare_proxy` in a process of its own, forwarding to `upstream` with `key`."""

    def __init__(self, upstream: str, key: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_proxy", upstream, key],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,  # where `bench` is a package
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the bare proxy did not start: {line!r}")
        self.port = int(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class _Heard:
    """Counts the finished-job notifications (`workers.notify`) on this stack's Redis."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.redis_url, self.channel = redis_url, Keyspace(prefix).finished_channel()
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._listen, name="bench-heard", daemon=True)
        self.ready = threading.Event()

    def __enter__(self) -> _Heard:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # the last answers' notifications are on their way
        self.stop.set()
        self.thread.join(5)

    def _listen(self) -> None:
        client = connect(self.redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            self.ready.set()
            while not self.stop.is_set():
                message = pubsub.get_message(timeout=0.1)
                if message is not None and message["type"] == "message":
                    self.count += 1
        finally:
            self.ready.set()
            pubsub.close()
            client.close()


async def _offer(
    url: str, token: str, body: dict[str, Any], rate: float, seconds: float, probe: str | None = None
) -> dict[str, Any]:
    """Send `rate` requests/s for `seconds` without waiting for answers; their latencies, and
    with `probe`, those of a GET sent every `PROBE_EVERY_S` meanwhile."""
    count = int(rate * seconds)
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=200)
    headers = {"Authorization": f"Bearer {token}"}
    prober = _Probe(probe, token) if probe else None  # probing already when the load starts
    try:
        async with httpx.AsyncClient(timeout=ANSWER_TIMEOUT_S, limits=limits, headers=headers) as client:
            start = time.monotonic()

            async def one(i: int) -> tuple[int | str, float]:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                sent = time.monotonic()
                try:
                    status: int | str = (await client.post(url, json=body)).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                return status, (time.monotonic() - sent) * 1000

            results = await asyncio.gather(*(one(i) for i in range(count)))
            took = time.monotonic() - start
    finally:
        probes, probe_failures = prober.stop() if prober else ([], 0)
    ok = sorted(ms for status, ms in results if status == 200)
    probes.sort()
    return {
        "offered": count,
        "completed": len(ok),
        "failed": count - len(ok),
        "statuses": dict(collections.Counter(str(status) for status, _ in results)),
        "latencies_ms": ok,
        "p50_ms": _pct(ok, 0.50),
        "p95_ms": _pct(ok, 0.95),
        "p99_ms": _pct(ok, 0.99),
        "max_ms": ok[-1] if ok else float("nan"),
        "drained_s": took,
        "probes": len(probes),
        "probe_failures": probe_failures,
        "probe_p50_ms": _pct(probes, 0.50) if probes else None,
        "probe_p99_ms": _pct(probes, 0.99) if probes else None,
        "probe_max_ms": probes[-1] if probes else None,
    }


class _Probe:
    """`GET url` every `PROBE_EVERY_S` on one kept-alive connection, from a process of its own
    (this one is busy sending the load): the latencies of a caller the load is not its own."""

    def __init__(self, url: str, token: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.front_door", "--probe", url, token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,  # where `bench` is a package
        )
        # it starts probing before the load does (its first GET, connecting, is not counted)
        ready = self.proc.stdout.readline() if self.proc.stdout else ""
        if ready.strip() != "ready":
            raise RuntimeError(f"the probe of {url} did not start: {ready!r}")

    def stop(self) -> tuple[list[float], int]:
        """Its latencies (ms, sorted) and failures."""
        try:
            out, _ = self.proc.communicate("stop\n", timeout=60)
            found = json.loads(out.strip().splitlines()[-1])
            return sorted(found["ms"]), int(found["failed"])
        except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
            self.proc.kill()
            self.proc.wait(10)
            return [], 0


def _probe(url: str, token: str) -> None:
    """The probe process: until a line on stdin (or `ANSWER_TIMEOUT_S`), then one JSON line."""
    latencies: list[float] = []
    failed = 0
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        with contextlib.suppress(httpx.HTTPError):
            client.get(url)
        print("ready", flush=True)
        for _ in range(int(ANSWER_TIMEOUT_S / PROBE_EVERY_S)):
            if select.select([sys.stdin], [], [], PROBE_EVERY_S)[0]:
                break
            sent = time.monotonic()
            try:
                client.get(url).raise_for_status()
                latencies.append((time.monotonic() - sent) * 1000)
            except httpx.HTTPError:
                failed += 1
    print(json.dumps({"ms": latencies, "failed": failed}), flush=True)


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sorted(ms for part in parts for ms in part["latencies_ms"])
    statuses: collections.Counter[str] = collections.Counter()
    for part in parts:
        statuses.update(part["statuses"])
    return {
        "offered": sum(p["offered"] for p in parts),
        "completed": len(ok),
        "failed": sum(p["failed"] for p in parts),
        "statuses": dict(statuses),
        "p50_ms": _pct(ok, 0.50),
        "p95_ms": _pct(ok, 0.95),
        "p99_ms": _pct(ok, 0.99),
        "max_ms": ok[-1] if ok else float("nan"),
    }


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(r: dict[str, Any]) -> str:
    """The run as a few plain lines."""
    d, p, t, o = r["direct"], r["proxied"], r["through"], r["overload"]
    by_round = zip(r["added_p50_by_round_ms"], r["added_p99_by_round_ms"], strict=True)
    rounds = ", ".join(f"{a:+.1f}/{b:+.1f}" for a, b in by_round)
    quota_free = [
        f"quota free, {r['rate']:.0f} requests/s offered ({d['offered']} each way, "
        f"{r['rounds']} alternating rounds; serve --processes {r['serve_processes']}):",
        f"  provider direct              p50 {d['p50_ms']:6.1f} ms   p99 {d['p99_ms']:6.1f} ms",
        f"  through a bare Python proxy  p50 {p['p50_ms']:6.1f} ms   p99 {p['p99_ms']:6.1f} ms"
        f"   ({p['completed']} answered, {p['failed']} failed)",
        f"  through /v1/chat/completions p50 {t['p50_ms']:6.1f} ms   p99 {t['p99_ms']:6.1f} ms"
        f"   ({t['completed']} answered, {t['failed']} failed)",
        f"  added by the bare proxy      p50 {r['proxy_p50_ms']:+6.1f} ms   p99 {r['proxy_p99_ms']:+6.1f} ms",
        f"  added by Spillway            p50 {r['added_p50_ms']:+6.1f} ms   "
        f"p99 {r['added_p99_ms']:+6.1f} ms   (by round, p50/p99: {rounds})",
        f"  answered: {t['completed'] - r['notified']} by serve's own calls (workers.inline), "
        f"{r['notified']} announced by workers (workers.notify)",
        f"  CPU per request: serve {r['serve_cpu_ms']:.1f} ms, workers {r['workers_cpu_ms']:.1f} ms, "
        f"the bare proxy {r['proxy_cpu_ms']:.1f} ms",
    ]
    if not o:
        return "\n".join(quota_free)
    probe = (
        f"{o['probe_p50_ms']:.0f} / {o['probe_p99_ms']:.0f} / {o['probe_max_ms']:.0f} ms"
        if o["probes"]
        else "no answer"
    )
    return "\n".join(
        [
            *quota_free,
            f"overload, {r['burst_rate']:.0f} requests/s for {o['offered'] / r['burst_rate']:.0f} s "
            "to a provider allowing a burst of 1,200 then 20/s:",
            f"  completed {o['completed']:,} · failed {o['failed']:,} of {o['offered']:,} "
            f"(statuses {o['statuses']}) in {o['drained_s']:.0f} s",
            f"  answer p50 {o['p50_ms'] / 1000:.1f} s · p99 {o['p99_ms'] / 1000:.1f} s · "
            f"max {o['max_ms'] / 1000:.1f} s",
            f"  GET /v1/models meanwhile p50 / p99 / max: {probe} "
            f"({o['probes']} probes, {o['probe_failures']} failed)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.front_door")
    parser.add_argument("--quick", action="store_true", help="5 s at 100/s, a 2 s burst")
    parser.add_argument("--rate", type=float, default=100, help="requests/s while quota is free")
    parser.add_argument("--seconds", type=float, help="seconds each way while quota is free")
    parser.add_argument("--no-overload", action="store_true", help="skip the overload phase")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (64 threads each)")
    parser.add_argument(
        "--inline-calls", type=int, help="serve's calls of its own ($SPILLWAY_SERVE_INLINE_CALLS; 0: none)"
    )
    parser.add_argument("--serve-processes", type=int, default=1, help="spillway serve --processes")
    parser.add_argument("--probe", nargs=2, metavar=("URL", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        _probe(*args.probe)
        return
    sizes: dict[str, float] = {"seconds": 5, "burst_s": 2} if args.quick else {}
    sizes["rate"] = args.rate
    sizes["workers"] = args.workers
    sizes["serve_processes"] = args.serve_processes
    if args.inline_calls is not None:
        sizes["inline_calls"] = args.inline_calls
    if args.seconds:
        sizes["seconds"] = args.seconds
    if args.no_overload:
        sizes["burst_s"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        print(report(run(Path(tmp), **sizes)), flush=True)


if __name__ == "__main__":
    main()
