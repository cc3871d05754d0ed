"""`spillway batch`: submit, follow with a live progress bar, write the output, re-attach."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from producer.batch import BatchHandle
from producer.batch import Progress as BatchProgress
from producer.cli.client import checked_client
from producer.cli.live import closed_line
from workers.errors import InputError
from workers.store import Store


def check_output(path: str) -> None:
    """Fail before anything is sent when the output cannot be written there: it is written (a
    temporary file beside it, then a rename) only once the batch has run."""
    target = Path(path)
    hint = "'-o' / '--output'"
    if target.is_dir():
        raise click.BadParameter(f"{path} is a directory", param_hint=hint)
    folder = target.parent
    if not folder.is_dir():
        raise click.BadParameter(f"{path}: the folder {folder} does not exist", param_hint=hint)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".check"):
            pass
    except OSError as exc:
        why = f"{path}: cannot write in {folder} ({exc.strerror})"
        raise click.BadParameter(why, param_hint=hint) from None


def run(
    input_path: str,
    *,
    task: str,
    tier: str,
    output: str | None,
    no_wait: bool,
    skip_invalid: bool,
    console: Console,
    mode: str | None = None,
    deadline_s: float | None = None,
) -> None:
    with console.status(f"checking {input_path} and enqueueing…"):
        handle = checked_client().submit_file(
            input_path,
            task=task,
            tier=tier,
            output=output,
            skip_invalid=skip_invalid,
            mode=mode,
            deadline_s=deadline_s,
        )
    first = handle.progress()
    console.print(f"batch [bold]{handle.id}[/]: {first.total} jobs", highlight=False)
    if no_wait:
        print(handle.id)
        return
    follow(handle.id, output, console, handle=handle)


def follow(batch_id: str, output: str | None, console: Console, handle: BatchHandle | None = None) -> None:
    client = checked_client()
    batch_id = _spillway_batch_id(client.runtime.store, batch_id)
    handle = handle or client.batch(batch_id)
    try:
        final = _watch(handle, console)
    except KeyboardInterrupt:
        target = f" -o {output}" if output else " -o OUT.jsonl"
        console.print(
            f"\nbatch {batch_id} keeps running. Re-attach with:\n"
            f"  spillway batch --attach {batch_id}{target}",
            highlight=False,
        )
        sys.exit(130)
    client.runtime.store.complete_batch(batch_id)  # the summary, even if a chord callback was lost
    if output:
        lines = handle.write(output)
        console.print(f"wrote {lines} lines to {output}", highlight=False, soft_wrap=True)
    _print_summary(final, console)


def _watch(handle: BatchHandle, console: Console) -> BatchProgress:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with closed_line(console), Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("batch", total=None, detail="")
        while True:
            p = handle.progress()
            eta = f"ETA {p.eta_s:.0f}s" if p.eta_s is not None else "ETA -"
            split = " ".join(f"{name} {n}" for name, n in sorted(p.by_provider.items()))
            detail = (
                f"[red]{p.failed} failed[/] · {p.in_flight} in flight · {p.jobs_per_s:.1f} jobs/s · "
                f"{p.tokens_per_s:,.0f} tok/s · {eta} · {split}"
            )
            bar.update(task, total=p.total, completed=p.done, detail=detail)
            if p.finished:
                return p
            time.sleep(0.5)


def _print_summary(p: BatchProgress, console: Console) -> None:
    console.print(
        f"{p.succeeded} succeeded, {p.failed} failed · {p.input_tokens:,} tokens in, {p.output_tokens:,} out "
        f"· ${p.cost_usd:.6f}",
        highlight=False,
    )


def _spillway_batch_id(store: Store, batch_id: str) -> str:
    """`batch_id`, or the Spillway batch under the front-door batch it names (`batch_…`)."""
    if store.batch(batch_id) is not None:
        return batch_id
    underneath = store.batch_of_api_batch(batch_id)
    if underneath is not None and store.batch(underneath) is not None:
        return underneath
    raise InputError(f"no batch with id {batch_id!r}")


def show_status(batch_id: str, console: Console, *, as_json: bool) -> None:
    store = checked_client().runtime.store
    batch_id = _spillway_batch_id(store, batch_id)
    batch = store.batch(batch_id)
    totals = batch.summary or store.batch_totals(batch_id)
    report = {
        "batch_id": batch_id,
        "task": batch.task_type,
        "tier": batch.tier,
        "finished": batch.finished_at is not None,
        "chords": batch.chords,
        "callback_runs": batch.callback_runs,
        **totals,
    }
    if as_json:
        print(json.dumps(report, default=str))
        return
    state = "finished" if report["finished"] else "running"
    console.print(f"batch {batch_id} ({batch.task_type}/{batch.tier}) — {state}", highlight=False)
    console.print(
        f"  jobs: {totals['total']}  " + "  ".join(f"{k} {v}" for k, v in sorted(totals["by_status"].items()))
    )
    wall = f" · wall {totals['wall_s']:.1f}s" if totals.get("wall_s") else ""
    tokens = f"{totals['input_tokens']:,} in, {totals['output_tokens']:,} out"
    console.print(f"  tokens: {tokens} · ${totals['cost_usd']:.6f}{wall}")
    console.print(
        "  by provider: " + (", ".join(f"{k} {v}" for k, v in sorted(totals["providers"].items())) or "-")
    )
