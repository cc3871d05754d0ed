"""One producer process of the scaling benchmark: says `ready`, waits for `go` on stdin, then
submits its jobs — through Spillway (`submit`), or as plain Celery tasks whose results it
waits for (`--plain URL KEY`). Everything else comes from the environment, as for a user."""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--name", default="p")
    parser.add_argument("--plain", nargs=2, metavar=("URL", "KEY"))
    args = parser.parse_args()
    if args.plain:
        from bench.plain_app import app, plain_call  # the baseline's own app: only here

        app.connection_for_write().ensure_connection(max_retries=3)
    else:
        from producer import default_client

        client = default_client()
        client.runtime  # noqa: B018 - connect before the clock starts
    print("ready", flush=True)
    sys.stdin.readline()
    cpu_s = time.process_time()
    if args.plain:
        url, key = args.plain
        body = {"model": "f1", "max_tokens": 32}
        results = [
            plain_call.apply_async(
                args=[url, {**body, "messages": [{"role": "user", "content": f"{args.name} {i}"}]}, key],
                queue="plain",
            )
            for i in range(args.jobs)
        ]
        for result in results:
            result.get(timeout=600)
    else:
        for i in range(args.jobs):
            client.submit(f"{args.name} job {i}", task="bench", tier="free", max_tokens=32)
    print(f"done {time.process_time() - cpu_s:.4f}", flush=True)  # its CPU seconds since `go`


if __name__ == "__main__":
    main()
