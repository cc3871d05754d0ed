"""`spillway status` and `spillway route` explain every decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from producer.status import route_report, status_report
from tests.conftest import A, add_job
from workers.execution import run_job


def test_status_shows_blocks_and_remaining(make_rt) -> None:
    rt = make_rt(a_limits="rpm = 30, rpd = 100, concurrency = 4")
    rt.sim.sim.settings.providers["a"].faults = {"rate_limit": 1.0}
    run_job(rt, add_job(rt), A)
    report = status_report(rt)
    [a] = next(p for p in report["providers"] if p["provider"] == "a")["accounts"]
    assert a["state"] == "blocked" and a["until"] and a["why"].startswith("429 (per-minute quota)")
    assert a["remaining"]["rpm"]["limit"] == 30 and a["remaining"]["rpm"]["remaining"] == 29
    assert a["remaining"]["rpd"] == {"remaining": 99, "limit": 100}
    assert a["keys"] == [a["account"]] and a["in_flight"] == 0
    assert json.dumps(report)  # the --json output


def test_status_shows_a_concurrency_limit_as_a_limit(make_rt) -> None:
    rt = make_rt(a_limits="concurrency = 4", b_limits="rpm = 10")
    report = status_report(rt)
    [a] = next(p for p in report["providers"] if p["provider"] == "a")["accounts"]
    [b] = next(p for p in report["providers"] if p["provider"] == "b")["accounts"]
    assert a["remaining"] == {"concurrency": {"remaining": 4, "limit": 4}}  # not "no limits"
    assert "concurrency" not in b["remaining"]


def test_status_names_skipped_providers(make_rt) -> None:
    rt = make_rt()
    rt.keyring.by_provider.pop("b")
    rt.keyring.skipped["b"] = "no key in $B_KEY (nor $B_KEY_1, _2, …)"
    report = status_report(rt)
    b = next(p for p in report["providers"] if p["provider"] == "b")
    assert b["skipped"].startswith("no key in $B_KEY") and b["accounts"] == []


def test_route_explains_where_the_next_job_goes(make_rt) -> None:
    rt = make_rt(a_limits="rpm = 1")
    assert route_report(rt, "chat", "free")["next_job_goes_to"] == "a:am"
    run_job(rt, add_job(rt), A)  # a's one request a minute is spent
    report = route_report(rt, "chat", "free")
    a, b = report["chain"]
    assert report["strategy"] == "ordered" and report["next_job_goes_to"] == "b:bm"
    assert not a["has_room"] and a["why"] == "rpm busy" and 50 < a["wait_s"] <= 60
    assert b["has_room"] and b["wait_s"] == 0


@pytest.mark.integration
def test_status_and_route_commands(e2e_stack) -> None:
    env = {**os.environ, **e2e_stack.env}

    def cli(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "producer.cli", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    status = cli("status")
    assert {p["provider"] for p in status["providers"]} == {"groq", "openai", "anthropic", "gemini"}
    assert all(isinstance(p["queue_length"], int) for p in status["providers"])
    route = cli("route", "--task", "chat", "--tier", "free")
    assert [link["candidate"] for link in route["chain"]] == [
        "groq:llama-3.3-70b-versatile",
        "gemini:gemini-2.0-flash",
    ]


@pytest.mark.integration
def test_status_watch_refreshes_until_interrupted(e2e_stack) -> None:
    import signal
    import threading

    from tests.faultkit import wait_for

    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "status", "--watch", "--every", "0.2"],
        # TTY_COMPATIBLE: Rich draws every refresh into the pipe too, so each one can be seen
        env={**os.environ, **e2e_stack.env, "COLUMNS": "160", "TTY_COMPATIBLE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    streams: dict[str, list[bytes]] = {"out": [], "err": []}

    def drain(stream, into: list[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):  # ends when the process closes it
            into.append(chunk)

    readers = [
        threading.Thread(target=drain, args=(proc.stdout, streams["out"]), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, streams["err"]), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        wait_for(
            lambda: b"".join(streams["out"]).count(b"spillway status") >= 2,
            timeout_s=90,
            what="the status table drawn twice (it refreshes)",
        )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for reader in readers:
            reader.join(timeout=10)
    out, err = (b"".join(streams[k]).decode(errors="replace") for k in ("out", "err"))
    assert proc.returncode == 0, err
    assert "spillway status" in out and "groq" in out and "Traceback" not in err


def _report(providers: int, accounts: int) -> dict:
    account = {
        "model": "m",
        "account": "k0",
        "keys": ["k0"],
        "state": "available",
        "until": None,
        "why": None,
        "remaining": {"rpm": {"remaining": 20, "limit": 30}, "tpm": {"remaining": 900, "limit": 6000}},
        "input_ratio": 1.0,
        "in_flight": 1,
    }
    return {
        "now": "2026-12-02T19:00:00Z",
        "providers": [
            {
                "provider": f"provider{i}",
                "skipped": None,
                "queue_length": 3,
                "accounts": [
                    {
                        **account,
                        "account": f"k{j}",
                        "keys": [f"k{j}"],
                        "state": "blocked" if j == 1 else "available",
                    }
                    for j in range(accounts)
                ],
            }
            for i in range(providers)
        ],
    }


@pytest.mark.parametrize(("width", "height"), [(100, 24), (150, 40), (80, 12)])
def test_status_watch_fits_the_terminal(width: int, height: int) -> None:
    from rich.console import Console

    from producer.status import fit_status

    console = Console(width=width, height=height, force_terminal=False, color_system=None)
    small = fit_status(_report(1, 2), console)  # fits: the full table, one row per account
    assert "k1" in small and "blocked" in small
    big = fit_status(_report(10, 3), console)  # 30 accounts: one line per provider, or cut
    lines = big.splitlines()
    assert len(lines) <= height - 1 and all(len(line) <= width for line in lines)
    shown = [f"provider{i}" for i in range(10) if f"provider{i}" in big]
    if len(shown) < 10:
        assert f"… {10 - len(shown)} more provider(s)" in lines[-1]
    elif "one line per provider" in big:
        assert "2/3" in big and "tpm 900/6000" in big  # available accounts and the scarcest limit
    else:
        assert big.count("blocked") == 10  # the full table fits: every account has its row


def test_status_watch_never_says_zero_providers_did_not_fit() -> None:
    from rich.console import Console

    from producer.status import fit_status

    for height in range(8, 30):
        console = Console(width=100, height=height, force_terminal=False, color_system=None)
        text = fit_status(_report(10, 3), console)
        assert "… 0 more" not in text and len(text.splitlines()) <= height - 1, height
