"""`spillway serve` SIGKILLed while it makes chat completions' calls itself (`workers.inline`):
no message carries those jobs, so the reconciler must find them once their leases run out.
None is lost, each is charged once (the cut call in doubt at its estimate, the next for real)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import psutil
import pytest

from producer.ops.stack import LocalStack
from tests.conftest import CONFIGS
from tests.faultkit import (
    LEDGER,
    Audit,
    Row,
    all_final,
    audit,
    ledger_calls,
    provider_calls,
    size,
    wait_for,
    wait_until,
)
from tests.test_faults_workers import DEFAULTS_CONFIG, make_stack
from workers.broker import message_task_ids
from workers.store import RUNNING, Job, Store

pytestmark = [pytest.mark.integration, pytest.mark.faults]

TOKEN = "sk-faults-serve"
#: The fault config's slow provider (2.5 s calls, 3 s timeout: a lease of 6.5 s) for chat.
CONFIG = (CONFIGS / "faults.toml").read_text() + '\n[routes.chat]\nfree = ["slow:s1"]\n'


def ask(url: str) -> list[int]:
    """A chat completion in a thread; the list gets its status (none if the connection broke)."""
    status: list[int] = []

    def post() -> None:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "spillway/chat", "messages": [{"role": "user", "content": "hold on"}]},
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=30,
            )
            status.append(response.status_code)

    threading.Thread(target=post, daemon=True).start()
    return status


def running(store: Store) -> list[str]:
    with store.session(write=False) as s:
        return [j.id for j in s.query(Job).filter(Job.status == RUNNING)]


def test_serve_stopped_by_sigterm_answers_its_calls_in_flight_first(tmp_path, redis_server) -> None:
    stack = make_stack(tmp_path, redis_server.url(9), CONFIG)
    try:
        stack.start()  # and no worker: only serve makes calls
        url = stack.start_service(["serve"], "/v1/models", extra_env={"SPILLWAY_API_TOKEN": TOKEN})
        serve = stack.services[-1]
        with stack.applied() as client:
            store = client.runtime.store
            answers = [ask(url) for _ in range(4)]
            wait_for(lambda: len(running(store)) == 4, 30, "serve running all 4 jobs itself")
            ids = running(store)
            serve.send_signal(signal.SIGTERM)  # 2.5 s calls in flight
            assert serve.wait(20) == 0
            wait_for(lambda: all(answers), 10, "every request answered")
            result = audit(store, ids)
            on_ledger, in_doubt = ledger_calls(store, ids)
            seen = provider_calls(stack.simulator_stats())
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "serve stopped by SIGTERM mid-call: its calls answered first",
            faults=1,
            submitted=4,
            lost=result.lost,
            charged_twice=result.charged_twice,
            provider_calls=seen,
            ledger_calls=on_ledger,
            in_doubt=in_doubt,
        )
    )
    assert [a[0] for a in answers] == [200] * 4
    assert result.lost == 0 and result.final == 4 and (seen, on_ledger, in_doubt) == (4, 4, 0)


def test_serve_processes_share_the_port_one_killed_comes_back_and_a_stop_answers_every_call(
    tmp_path, redis_server
) -> None:
    stack = make_stack(tmp_path, redis_server.url(9), CONFIG)
    try:
        stack.start()  # and no worker: only serve makes calls
        url = stack.start_service(
            ["serve", "--processes", "2"], "/v1/models", extra_env={"SPILLWAY_API_TOKEN": TOKEN}
        )
        parent = psutil.Process(stack.services[-1].pid)
        wait_for(lambda: len(parent.children()) == 2, 30, "two serve processes")
        first = parent.children()[0]
        first.kill()  # dies on its own: started again, the other serving meanwhile
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        wait_for(lambda: len(parent.children()) == 2 and first not in parent.children(), 30, "a new one")
        with stack.applied() as client:
            store = client.runtime.store
            answers = [ask(url) for _ in range(6)]
            wait_for(lambda: len(running(store)) == 6, 30, "serve's processes running all 6 jobs")
            ids = running(store)
            children = parent.children()
            stack.services[-1].send_signal(signal.SIGTERM)  # 2.5 s calls in flight
            assert stack.services[-1].wait(20) == 0
            assert not any(child.is_running() for child in children)
            wait_for(lambda: all(answers), 10, "every request answered")
            result = audit(store, ids)
            seen = provider_calls(stack.simulator_stats())
    finally:
        stack.close()
    assert [a[0] for a in answers] == [200] * 6
    assert result.lost == 0 and result.final == 6 and seen == 6


def test_serve_killed_mid_call_loses_no_chat_completion(tmp_path, redis_server) -> None:
    requests = size(8, 32)
    stack = make_stack(tmp_path, redis_server.url(9), CONFIG)
    outcome = kill_serve_mid_call(stack, requests, "llm.slow")
    LEDGER.add(outcome.row(f"serve SIGKILLed mid-call: its jobs done {outcome.back_after_s:.0f} s later"))
    outcome.check()


def test_a_dead_serves_jobs_run_again_within_three_minutes_with_defaults(tmp_path, redis_server) -> None:
    """Shipped defaults: a lease of the provider's 60 s timeout plus 17 s, then the reconciler,
    which runs every 60 s and counts a job lost after 30 s untouched (README, "Deploying")."""
    config = DEFAULTS_CONFIG + '\n[routes.chat]\nfree = ["steady:s1"]\n'
    stack = make_stack(tmp_path, redis_server.url(9), config, recovery={})
    outcome = kill_serve_mid_call(stack, 4, "llm.steady")
    LEDGER.add(outcome.row(f"serve SIGKILLed, defaults: its jobs done {outcome.back_after_s:.0f} s later"))
    outcome.check()
    assert outcome.back_after_s <= 180, (
        f"a dead serve's jobs were done only after {outcome.back_after_s:.0f} s"
    )


@dataclass
class Outcome:
    requests: int
    audit: Audit
    seen: int
    on_ledger: int
    in_doubt: int
    back_after_s: float

    def row(self, scenario: str) -> Row:
        return Row(
            scenario,
            faults=1,
            submitted=self.requests,
            lost=self.audit.lost,
            charged_twice=self.audit.charged_twice,
            provider_calls=self.seen,
            ledger_calls=self.on_ledger,
            in_doubt=self.in_doubt,
        )

    def check(self) -> None:
        assert self.audit.lost == 0 and self.audit.charged_twice == 0 and self.audit.ledger_mismatch == 0
        # the cut calls reached the provider and are on the ledger in doubt; the reruns are real
        assert self.on_ledger - self.in_doubt <= self.seen <= self.on_ledger, self
        assert self.in_doubt == self.requests


def kill_serve_mid_call(stack: LocalStack, requests: int, queue: str) -> Outcome:
    """`requests` chat completions that serve runs itself, serve SIGKILLed during their calls,
    and a worker (with its reconciler) left to finish them."""
    try:
        stack.start()
        stack.start_worker(concurrency=8, loglevel="WARNING")
        stack.wait_for_workers()
        url = stack.start_service(["serve"], "/v1/models", extra_env={"SPILLWAY_API_TOKEN": TOKEN})
        serve = stack.services[-1]
        with stack.applied() as client:
            store = client.runtime.store

            for _ in range(requests):
                ask(url)
            wait_for(lambda: len(running(store)) == requests, 30, f"serve running all {requests} jobs itself")
            ids = running(store)
            assert message_task_ids(client.app, [queue]) == set()  # no worker has them
            serve.kill()  # SIGKILL: every call in flight
            serve.wait(10)
            killed_at = time.monotonic()
            assert wait_until(all_final(store, ids), timeout_s=240), store.count_by_status()
            back_after_s = time.monotonic() - killed_at
            on_ledger, in_doubt = ledger_calls(store, ids)
            return Outcome(
                requests,
                audit(store, ids),
                provider_calls(stack.simulator_stats()),
                on_ledger,
                in_doubt,
                back_after_s,
            )
    finally:
        stack.close()
