"""`python -m bench [--quick]`: run every benchmark and print one table.

Figures are measured side by side in one run on this machine; they are ratios and rates,
never pass/fail thresholds (these machines are shared and noisy)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workers.embedded import start_redis

BENCHMARKS = [
    "limiter",
    "submit",
    "overhead",
    "makespan",
    "waits",
    "tokens",
    "batch",
    "front",
    "provider-batches",
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--only", choices=[*BENCHMARKS], action="append")
    args = parser.parse_args()
    only = set(args.only or BENCHMARKS)
    console = Console()
    rows: list[tuple[str, str, str]] = []
    redis_server = start_redis()
    # Each benchmark module is imported when it is chosen (`--only`): the others stay unloaded.
    try:
        if "limiter" in only:
            from bench import limiter_ops

            with console.status("limiter decisions…"):
                r = limiter_ops.run(redis_server.url(0), seconds=2 if args.quick else 5)
            rows += [
                (
                    "limiter",
                    "decisions/s (acquire + settle, 8 threads, 1 Redis)",
                    f"{r['decisions_per_s']:,.0f}",
                ),
                (
                    "limiter",
                    "acquire latency p50 / p99",
                    f"{r['acquire_p50_ms']:.2f} / {r['acquire_p99_ms']:.2f} ms",
                ),
            ]
        if "submit" in only:
            from bench import submit_latency

            with console.status("submit latency…"), tempfile.TemporaryDirectory() as tmp:
                r = submit_latency.run(Path(tmp), jobs=300 if args.quick else 1000)
            rows += [
                (
                    "submit",
                    "producer.submit, stored + published: p50 / p99",
                    f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms ({r['per_s']:.0f}/s, one thread)",
                )
            ]
        if "overhead" in only:
            from bench import overhead

            with console.status("Spillway vs plain Celery…"), tempfile.TemporaryDirectory() as tmp:
                r = overhead.run(Path(tmp), jobs=300 if args.quick else 1000)
            rows += [
                (
                    "overhead",
                    "Spillway submit→result, jobs/s (50 ms calls, 32 threads)",
                    f"{r['spillway_jobs_per_s']:.0f}",
                ),
                (
                    "overhead",
                    "plain Celery task, same call/broker/pool, jobs/s",
                    f"{r['plain_jobs_per_s']:.0f}",
                ),
                ("overhead", "ratio Spillway / plain", f"{r['ratio']:.2f}"),
            ]
        if "makespan" in only:
            from bench import makespan

            sizes = {"jobs": 600, "alpha_rpm": 300, "beta_rpm": 150} if args.quick else {}
            with (
                console.status("batch makespan vs the limits' minimum…"),
                tempfile.TemporaryDirectory() as tmp,
            ):
                r = makespan.run(Path(tmp), **sizes)
            rows += [
                (
                    "makespan",
                    f"{r['jobs']} jobs over 2 providers: makespan / theoretical minimum",
                    f"{r['makespan_s']:.1f}s / {r['theoretical_min_s']:.1f}s = {r['ratio']:.3f}",
                ),
                ("makespan", "429s from the providers", str(r["rate_limited_429s"])),
                ("makespan", "share on the larger provider (2/3 ideal)", f"{r['alpha_share']:.2f}"),
                ("makespan", "submitting took", f"{r['submit_s']:.1f}s"),
                (
                    "makespan",
                    "republishes (Celery retries) per job · tasks received per job (Flower)",
                    f"{r['retries_per_job']:.2f} · {r['received_per_job']:.2f}",
                ),
            ]
        if "waits" in only:
            from bench import waits

            with (
                console.status("waiting once: one provider's rpm binds…"),
                tempfile.TemporaryDirectory() as tmp,
            ):
                r = waits.run(Path(tmp))
            rows += [
                (
                    "waits",
                    f"{r['jobs']} jobs at {r['rpm']} requests/min: share that had to wait",
                    f"{r['had_to_wait']:.2f}",
                ),
                (
                    "waits",
                    "republishes (Celery retries) per job · tasks received per job (Flower)",
                    f"{r['retries_per_job']:.2f} · {r['received_per_job']:.2f}",
                ),
                (
                    "waits",
                    "makespan / theoretical minimum · 429s",
                    f"{r['makespan_s']:.1f}s / {r['theoretical_min_s']:.1f}s · {r['rate_limited_429s']}",
                ),
            ]
        if "tokens" in only:
            from bench import tokens

            with console.status("Chinese vs English at a binding tpm…"), tempfile.TemporaryDirectory() as tmp:
                r = tokens.run(Path(tmp))
            zh, en = r["chinese"], r["english"]
            slower = zh["makespan_s"] / en["makespan_s"]
            rows += [
                (
                    "tokens",
                    "60 jobs, tokens/min binding: Chinese (5× the estimate) vs English, makespan",
                    f"{zh['makespan_s']:.1f}s vs {en['makespan_s']:.1f}s = {slower:.2f}",
                ),
                (
                    "tokens",
                    "input ratio learned · 429s (Chinese, English)",
                    f"{zh['input_ratio']:.1f} · {zh['rate_limited_429s']}, {en['rate_limited_429s']}",
                ),
            ]
        if "batch" in only:
            from bench import batch_large

            sizes = {"items": 1200, "alpha_rpm": 400, "beta_rpm": 200} if args.quick else {}
            with (
                console.status("a large batch through `spillway batch`…"),
                tempfile.TemporaryDirectory() as tmp,
            ):
                r = batch_large.run(Path(tmp), **sizes)
            rows += [
                (
                    "batch",
                    f"{r['items']:,} items: producer peak RSS",
                    f"{r['producer_peak_rss_mib']:.0f} MiB",
                ),
                ("batch", "enqueue rate (stored + published)", f"{r['enqueue_per_s']:,.0f} jobs/s"),
                (
                    "batch",
                    "end to end / theoretical minimum",
                    f"{r['end_to_end_s']:.1f}s / {r['theoretical_min_s']:.1f}s = {r['ratio']:.3f}",
                ),
                ("batch", "output lines · 429s", f"{r['output_lines']:,} · {r['rate_limited_429s']}"),
            ]
        if "front" in only:
            from bench import front_door

            sizes = {"seconds": 5, "burst_s": 2} if args.quick else {}
            with console.status("the OpenAI front door…"), tempfile.TemporaryDirectory() as tmp:
                r = front_door.run(Path(tmp), **sizes)
            d, p, t, o = r["direct"], r["proxied"], r["through"], r["overload"]
            rows += [
                (
                    "front",
                    f"chat completion at {r['rate']:.0f}/s, quota free: provider direct p50 / p99",
                    f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f} ms",
                ),
                (
                    "front",
                    "… through a bare Python proxy (bench.bare_proxy) p50 / p99 (added)",
                    f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f} ms "
                    f"({r['proxy_p50_ms']:+.1f} / {r['proxy_p99_ms']:+.1f})",
                ),
                (
                    "front",
                    "… through /v1/chat/completions p50 / p99 (added)",
                    f"{t['p50_ms']:.1f} / {t['p99_ms']:.1f} ms "
                    f"({r['added_p50_ms']:+.1f} / {r['added_p99_ms']:+.1f})",
                ),
                (
                    "front",
                    f"{r['burst_rate']:.0f}/s offered to a 20/s provider: completed · failed",
                    f"{o['completed']:,} · {o['failed']:,} of {o['offered']:,} in {o['drained_s']:.0f}s",
                ),
                (
                    "front",
                    "… answer p50 / p99 · GET /v1/models meanwhile p50 / max",
                    f"{o['p50_ms'] / 1000:.1f} / {o['p99_ms'] / 1000:.1f} s · "
                    f"{o['probe_p50_ms']:.0f} / {o['probe_max_ms']:.0f} ms",
                ),
            ]
        if "provider-batches" in only:
            from bench import provider_batches

            sizes = {"jobs": 200, "turnaround_s": 10.0} if args.quick else {}
            with (
                console.status("provider batches: all synchronous vs auto with a 2 h deadline…"),
                tempfile.TemporaryDirectory() as tmp,
            ):
                r = provider_batches.run(Path(tmp), **sizes)
            rows += provider_batches.summary_rows(r)
    finally:
        redis_server.stop()
    table = Table(title="Spillway benchmarks")
    for column in ("area", "measure", "value"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
