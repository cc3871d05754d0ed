"""Estimates that learn: the same token load as Chinese text, which a real tokenizer counts at
about five times Spillway's four-characters-a-token estimate, and as English, which it counts
as estimated — against a provider whose tokens per minute bind. With the ratio learned from
settled calls, both take about as long, with no 429s."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import stack_from, wait_all_final

CONFIG = """
[spillway]
default_max_tokens = 16
[providers.tok]
api = "openai"
base_url = "https://tok.example/v1"
key_env = "TOK_KEY"
limits = {{ rpm = 100000, tpm = {tpm} }}
[providers.tok.models.t1]
[routes.batch]
free = ["tok:t1"]
[simulator]
seed = 8
latency_ms = {{ median = 50, p95 = 80 }}
[simulator.providers.tok]
tokenizer = "cjk"
"""
CHINESE = "请用一句话解释令牌桶算法以及它为什么适合限制请求速率。"  # 28 characters: 35 real tokens
ENGLISH = "Explain the token bucket algorithm in one line, and why it suits rate limits. "


def run_one(workdir: Path, text: str, *, jobs: int, tpm: int) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    stack = stack_from(CONFIG.format(tpm=tpm), workdir)
    stack.start()
    try:
        stack.start_worker(concurrency=16, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            started = time.monotonic()
            for i in range(jobs):
                client.submit(f"{i}: {text}", task="batch", tier="free")
            finished = wait_all_final(client.runtime.store, jobs, timeout_s=600)
            ratio = client.runtime.limiter.snapshots(client.runtime.router.candidates("batch", "free"))
        stats = stack.simulator_stats()
    finally:
        stack.close()
    [snap] = ratio.values()
    return {
        "makespan_s": finished - started,
        "rate_limited_429s": stats["tok"].get("rate_limited", 0),
        "input_ratio": snap.accounts[0].input_ratio,
    }


def run(workdir: Path, *, jobs: int = 60, tpm: int = 12000) -> dict[str, dict[str, float]]:
    chinese = CHINESE * 7  # about 245 real tokens; 49 by the estimate
    english = ENGLISH * 13  # about the same real tokens, counted as estimated
    return {
        "chinese": run_one(workdir / "zh", chinese, jobs=jobs, tpm=tpm),
        "english": run_one(workdir / "en", english, jobs=jobs, tpm=tpm),
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(run(Path(tmp)))
