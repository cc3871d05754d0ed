"""The `spillway` command (click, like Celery's own CLI)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import time
from typing import Any, ClassVar

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from producer.cli import batch as batchcli
from producer.cli import check as checkcli
from producer.cli import init as initcli
from producer.cli.client import check_urls, checked_client, config_option
from producer.cli.live import closed_line
from producer.jobs import MAX_TOKENS
from producer.ops.tenants import Tenants
from producer.status import fit_status, render_route, render_status, route_report, status_report
from producer.usage import parse_since, render_usage, usage_report
from workers import discovery, reconciler
from workers.celery import app as celery_app
from workers.config import MODES, load_settings
from workers.env import Env
from workers.errors import ConfigError, SpillwayError
from workers.results import JobResult
from workers.runtime import runtime as worker_runtime
from workers.supervise import supervise

console = Console()
err_console = Console(stderr=True)

#: The most seconds an option takes (ten years): more overflows a date, nan and inf never end.
MAX_SECONDS = 10 * 365 * 86400
PORT = click.IntRange(0, 65535)
RECOVER_WAIT_S = 15.0  # how long `recover` waits for another recovery's lock


class Seconds(click.ParamType):
    """A finite number of seconds from 0 to MAX_SECONDS; the error names the option."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected a number of seconds, got {value!r}", param, ctx)
        if not math.isfinite(number) or not 0 <= number <= MAX_SECONDS:
            self.fail(f"expected a number of seconds from 0 to {MAX_SECONDS:,}, got {value!r}", param, ctx)
        return number


class Duration(Seconds):
    """Seconds, or a number with a unit: 90s, 30m, 2h, 1d."""

    name = "duration"
    UNITS: ClassVar[dict[str, int]] = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:]) if text else None
        if unit is None:
            return super().convert(value, param, ctx)
        return super().convert(float(text[:-1]) * unit if _is_number(text[:-1]) else value, param, ctx)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class SpillwayGroup(click.Group):
    """Every Spillway error ends as one clear line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpillwayError as exc:
            message = as_typed(str(exc), self.get_command(ctx, ctx.invoked_subcommand or ""))
            # escaped: the message may quote input ("[/]" would be markup); soft_wrap: one line
            # however long (Rich wraps at 80 columns when not on a terminal)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2 if isinstance(exc, ValueError) else 1)
        except TimeoutError as exc:
            err_console.print(f"[bold red]timeout:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(3)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug: one line for the user, the traceback only on request
            if Env.from_environ().debug:
                raise
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
                "(set SPILLWAY_DEBUG=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            sys.exit(70)


def as_typed(message: str, command: click.Command | None) -> str:
    """An error that starts with a field's name names the option the user typed instead
    (`preferred_provider: ...` → `--provider: ...`)."""
    field, sep, rest = message.partition(": ")
    for param in command.params if command and sep else ():
        longs = [o for o in param.opts if o.startswith("--")] if isinstance(param, click.Option) else []
        if param.name == field and longs:
            return f"{longs[0]}: {rest}"
    return message


@click.group(cls=SpillwayGroup)
@click.version_option(package_name="llm-spillway")
def main() -> None:
    """Spillway: a distributed task queue for LLM calls."""


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
wait_timeout_option = click.option(
    "--timeout",
    "timeout_s",
    type=Seconds(),
    default=300.0,
    show_default=True,
    help="Seconds to wait with --wait.",
)


def note_fallback(task: str) -> None:
    """Say so when an unknown task type quietly takes the "*" route."""
    note = checked_client().runtime.settings.fallback_note(task)
    if note:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, default=str))


@main.command()
@click.option("--task", required=True, help="Task type: chooses the route (code, chat, ...).")
@click.option("--tier", required=True, help="Tier: free, pro, admin, ...")
@click.option("--prompt", required=True, help="The user prompt.")
@click.option("--system", help="A system prompt.")
@click.option("--max-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float)
@click.option("--provider", "preferred_provider", help="Prefer this provider of the chain.")
@click.option("--idempotency-key", help="A retried submit with the same key returns the same job.")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@wait_timeout_option
@json_option
def submit(
    task: str,
    tier: str,
    prompt: str,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    preferred_provider: str | None,
    idempotency_key: str | None,
    wait: bool,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Submit one job; print its id (or, with --wait, its result)."""
    handle = checked_client().submit(
        prompt,
        task=task,
        tier=tier,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        preferred_provider=preferred_provider,
        idempotency_key=idempotency_key,
    )
    note_fallback(task)
    if not wait:
        _print_json({"job_id": handle.id}) if as_json else click.echo(handle.id)
        return
    show_result(handle.wait(timeout_s), as_json)


def show_result(result: JobResult, as_json: bool) -> None:
    """A job's result: its text (exit 0), its error (exit 1), or its state while it runs (exit 4)."""
    if as_json:
        _print_json(result.to_json())
    elif result.status == "succeeded":
        console.print(
            f"[dim]{result.provider}:{result.model} · {result.input_tokens}→"
            f"{result.output_tokens} tokens · ${result.cost_usd:.6f}[/]"
        )
        click.echo(result.text)
    elif result.status == "failed":
        err_console.print(f"[red]failed:[/] {escape(result.error or '')}", highlight=False)
    else:
        err_console.print(f"{result.status} (attempts so far: {result.attempts})", highlight=False)
    if result.status != "succeeded":
        sys.exit(1 if result.status == "failed" else 4)


@main.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait until the job is done.")
@wait_timeout_option
@json_option
def get(job_id: str, wait: bool, timeout_s: float, as_json: bool) -> None:
    """A job's result (or where it is) by the id `submit` printed."""
    client = checked_client()
    show_result(client.job(job_id).wait(timeout_s) if wait else client.get(job_id), as_json)


@main.command()
@click.argument(
    "input_path", metavar="IN.jsonl", required=False, type=click.Path(exists=True, dir_okay=False)
)
@click.option("--task", help="Task type of every line (a line may name its own).")
@click.option("--tier", help="Tier of every line (a line may name its own).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Where the results go (JSONL, input order)."
)
@click.option("--no-wait", is_flag=True, help="Print the batch id and return at once.")
@click.option("--skip-invalid", is_flag=True, help="Send the good lines; write the bad ones as failed.")
@click.option(
    "--attach", "attach_id", metavar="BATCH_ID", help="Follow a running batch (and write its output)."
)
@click.option("--status", "status_id", metavar="BATCH_ID", help="Print a batch's summary.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="sync: call now; batch: the providers' batch APIs; auto: the cheapest in time "
    "(default: the route's).",
)
@click.option(
    "--deadline", "deadline_s", type=Duration(), help="When every job must be done: 2h, 30m, 1d or seconds."
)
@json_option
def batch(
    input_path: str | None,
    task: str | None,
    tier: str | None,
    output: str | None,
    no_wait: bool,
    skip_invalid: bool,
    attach_id: str | None,
    status_id: str | None,
    mode: str | None,
    deadline_s: float | None,
    as_json: bool,
) -> None:
    """Run a JSONL file as one batch; resume it by running the same command again."""

    if status_id:
        batchcli.show_status(status_id, console, as_json=as_json)
        return
    if output:
        batchcli.check_output(output)  # now: the output is written only after the batch ran
    if attach_id:
        batchcli.follow(attach_id, output, console)
        return
    if not input_path or not task or not tier:
        raise click.UsageError("give IN.jsonl with --task and --tier (or --attach / --status BATCH_ID)")
    if not output and not no_wait:
        raise click.UsageError("give -o OUT.jsonl for the results (or --no-wait)")
    note_fallback(task)
    batchcli.run(
        input_path,
        task=task,
        tier=tier,
        output=output,
        no_wait=no_wait,
        skip_invalid=skip_invalid,
        mode=mode,
        deadline_s=deadline_s or None,
        console=console,
    )


@main.command()
@json_option
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option(
    "--every", "every_s", type=Seconds(), default=2.0, show_default=True, help="Seconds between refreshes."
)
def status(as_json: bool, watch: bool, every_s: float) -> None:
    """Per provider account: available or blocked until when, what is left, in flight, queued."""
    client = checked_client()
    rt, app = client.runtime, client.app
    if as_json:
        _print_json(status_report(rt, app))
        return
    if not watch:
        render_status(status_report(rt, app), console)
        return
    if not console.is_terminal:  # piped: each refresh appended, as a log of the states
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                render_status(status_report(rt, app), console)
                console.file.flush()
                time.sleep(every_s)
        return
    with closed_line(console), Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(Text.from_ansi(fit_status(status_report(rt, app), console)), refresh=True)
                time.sleep(every_s)
        except KeyboardInterrupt:
            pass


@main.command()
@click.option("--since", help="A date (2026-11-01), a time, or 30m / 24h / 7d / 2w back from now.")
@click.option(
    "--by",
    "by",
    default="model",
    show_default=True,
    type=click.Choice(["provider", "model", "key", "task", "tier", "day"]),
)
@json_option
def usage(since: str | None, by: str, as_json: bool) -> None:
    """Requests, tokens, cost, failures, re-routes and latency, from the store."""
    start = parse_since(since)  # a bad --since fails before the store is opened
    report = usage_report(checked_client().runtime.store, since=start, by=by)
    if as_json:
        _print_json(report)
    else:
        render_usage(report, console)


@main.command()
@click.option("--task", required=True)
@click.option("--tier", required=True)
@click.option(
    "--max-tokens",
    type=click.IntRange(1, MAX_TOKENS),
    help="Size the yardstick job (default: the config's).",
)
@json_option
def route(task: str, tier: str, max_tokens: int | None, as_json: bool) -> None:
    """The chain for a task type and tier, and what each link has left right now."""
    report = route_report(checked_client().runtime, task, tier, max_tokens=max_tokens)
    if as_json:
        _print_json(report)
    else:
        render_route(report, console)


@main.command()
@click.option("--providers", help="Comma-separated providers to serve (default: every one with a key).")
@click.option("--concurrency", "-c", type=int, help="Threads (default: from the providers' limits).")
@click.option(
    "--loglevel",
    "-l",
    default="INFO",
    show_default=True,
    # checked here: a level Celery refuses would otherwise be a crash the supervisor restarts
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL"], case_sensitive=False),
)
@click.option("--hostname", "-n", help="Worker node name (Celery's -n).")
@click.option("--no-supervise", is_flag=True, help="Run Celery in this process (no restart if it dies).")
def worker(
    providers: str | None, concurrency: int | None, loglevel: str, hostname: str | None, no_supervise: bool
) -> None:
    """Run a Celery worker on the providers' queues (threads pool), restarted if it dies."""
    # The worker process's own runtime (the one its tasks use), built before Celery sets up
    # logging: what it says about skipped keys is echoed below, once.
    check_urls(Env.from_environ())
    rt = worker_runtime()  # fails here, clearly, on a bad config
    names = [p.strip() for p in providers.split(",")] if providers else list(rt.keyring.by_provider)
    unknown = [n for n in names if n not in rt.settings.providers]
    if unknown:
        raise click.BadParameter(f"unknown provider(s): {', '.join(unknown)}", param_hint="--providers")
    names = [n for n in names if rt.keyring.usable(n)]
    if not names:
        raise click.UsageError(f"no provider with a key to serve: {initcli.KEY_HINT}")
    threads = concurrency or min(256, sum(rt.settings.providers[n].threads() for n in names))
    if not no_supervise:
        child = [
            sys.executable,
            "-m",
            "producer.cli",
            "worker",
            "--no-supervise",
            "-c",
            str(threads),
            "-l",
            loglevel,
            "--providers",
            ",".join(names),
            *(["-n", hostname] if hostname else []),
        ]
        sys.exit(supervise(child))
    # the provider queues, and the default queue where chord callbacks (finish_batch) go
    queues = ",".join([*(rt.settings.providers[n].queue for n in names), celery_app.conf.task_default_queue])
    argv = ["worker", "-Q", queues, "-P", "threads", "-c", str(threads), "-l", loglevel]
    if hostname:
        argv += ["-n", hostname]
    click.echo(f"spillway worker: queues {queues}, {threads} threads", err=True)
    # The keyring logged these before Celery set up logging, where nobody sees them.
    for name, why in rt.keyring.skipped.items():
        click.echo(f"spillway worker: provider {name} skipped: {why}", err=True)
    if hint := initcli.no_key_hint(rt.settings, rt.keyring, names):
        click.echo(f"spillway worker: {hint}", err=True)
    # Celery's own command in standalone mode: it exits with the worker's exit code. app.start
    # and app.worker_main return None even after an "Unrecoverable error" (click returns the
    # code instead of raising), and the supervisor would take a broken worker for a stopped one.
    from celery.bin.celery import celery as celery_command  # Celery's CLI: only this command needs it

    celery_command.main(args=["-A", "workers", *argv], prog_name="celery", auto_envvar_prefix="CELERY")


@main.command()
@config_option
@click.option("--port", type=PORT, help="Port (default: [simulator] port, 8900; 0 picks a free one).")
@click.option("--host", help="Address to listen on (default 127.0.0.1; 0.0.0.0 inside a container).")
def simulate(config_path: str | None, port: int | None, host: str | None) -> None:
    """Serve the configured providers from the built-in simulator on 127.0.0.1."""
    from workers.simulator import SimServer, sim_settings  # the simulator: only this command needs it

    discovery.load_dotenv()  # it may name $SPILLWAY_CONFIG
    settings = load_settings(discovery.find_config(config_path).path)
    server = SimServer(sim_settings(settings, port=port, host=host))
    click.echo(f"spillway simulator listening on {server.url}", err=False)
    sys.stdout.flush()
    for name, provider in server.sim.settings.providers.items():
        click.echo(f"  {name:<12} {provider.api:<9} {server.url}/{name}/…", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@main.command()
@click.option(
    "--idle",
    "idle_s",
    type=Seconds(),
    default=30.0,
    show_default=True,
    help="Only jobs nothing has touched for this many seconds.",
)
@json_option
def recover(idle_s: float, as_json: bool) -> None:
    """Publish again the jobs the store has but the broker lost (each once); finish their batches."""
    client = checked_client()
    deadline = time.monotonic() + RECOVER_WAIT_S
    while (result := reconciler.recover_once(client.runtime, client.app, idle_for_s=idle_s)).busy:
        if time.monotonic() > deadline:  # a worker's reconciler holds the lock for seconds at most
            raise click.ClickException(f"another recovery held the lock for {RECOVER_WAIT_S:.0f}s; try again")
        time.sleep(0.5)
    if as_json:
        _print_json(
            {
                "republished": result.republished,
                "batches_completed": result.batches_completed,
                "alive": result.skipped_live,
                "too_recent": result.too_recent,
            }
        )
        return
    console.print(
        f"republished {len(result.republished)} job(s); {result.skipped_live} open job(s) are "
        f"alive (queued, running or parked); {result.too_recent} open job(s) changed in the last "
        f"{idle_s:g}s and were not checked (--idle); {len(result.batches_completed)} batch(es) completed"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=PORT)
@click.option("--insecure-no-auth", is_flag=True, help="Serve without a token (local experiments only).")
@click.option(
    "--processes",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Server processes sharing the port (one interpreter lock each): about one per core.",
)
@click.option("--socket-fd", type=int, multiple=True, hidden=True)  # a process of several: its socket
def serve(host: str, port: int, insecure_no_auth: bool, processes: int, socket_fd: tuple[int, ...]) -> None:
    """HTTP: /metrics, /v1/status, /v1/usage, POST /v1/jobs, GET /v1/jobs/{id} (bearer token).

    Also a live page of charts, for a deployment without Grafana: open
    http://127.0.0.1:8080/dashboard#token=TOKEN (the part after # never leaves the browser; or
    paste the token into the page). It polls GET /v1/dashboard every 2 s.
    """
    from producer.ops import serve as serving  # tornado and prometheus: only this command

    client = checked_client()
    tenants = Tenants.from_settings(client.runtime.settings, client.env.environ, client.env.api_token)
    if not tenants and not insecure_no_auth:
        raise ConfigError(
            "spillway serve needs $SPILLWAY_API_TOKEN or [tenants] in the config "
            "(clients send a token as a bearer token)"
        )
    if processes == 1:
        sockets = [socket.socket(fileno=fd) for fd in socket_fd]
        serving.serve(client, host=host, port=port, tenants=tenants, sockets=sockets)
        return
    # Bound once here, shared by every process: the kernel hands each connection to one of them.
    sockets = serving.listening_sockets(host, port)
    fds = tuple(s.fileno() for s in sockets)
    child = [sys.executable, "-m", "producer.cli", "serve", "--host", host, "--port", str(port)]
    child += ["--insecure-no-auth"] * insecure_no_auth + [f"--socket-fd={fd}" for fd in fds]
    print(f"spillway serve listening on http://{host}:{port} ({processes} processes)", flush=True)
    sys.exit(supervise(child, copies=processes, name="serve", pass_fds=fds))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True, type=PORT)
@click.option("--address", default="127.0.0.1", show_default=True)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Flower on Spillway's app (basic auth from $FLOWER_BASIC_AUTH, user:password)."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        "flower",
        f"--port={port}",
        f"--address={address}",
    ]
    basic_auth = Env.from_environ().flower_basic_auth
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    os.execv(sys.executable, [*argv, *flower_args])


@main.command()
@click.option("--jobs", "job_count", type=int, default=12, show_default=True, help="Jobs to submit.")
@click.option("--hold", is_flag=True, help="Keep everything running until Ctrl-C (to look in Flower).")
def demo(job_count: int, hold: bool) -> None:
    """Run the whole system on this machine: no keys, no Docker."""
    from producer.ops.demo import run_demo  # the local stack: only this command needs it

    run_demo(job_count=job_count, hold=hold)


main.add_command(initcli.init)
main.add_command(checkcli.check)
