"""Liveness: a message a live worker holds past the delivery grace (a countdown waiting for
quota) is never restored; once its worker is SIGKILLed and stops beating, it is."""

from __future__ import annotations

import time

import pytest

from tests.faultkit import wait_for
from tests.test_faults_workers import make_stack
from workers import liveness

pytestmark = pytest.mark.integration

#: 2 requests a minute: after two jobs, the third reserves the slot 30 s on and waits for it in
#: its worker.
CONFIG = """
[spillway]
max_countdown_s = 60
[providers.tight]
api = "openai"
base_url = "https://tight.example/v1"
key_env = "TIGHT_KEY"
limits = { rpm = 2 }
[providers.tight.models.t1]
[routes.work]
free = ["tight:t1"]
"""


def test_only_messages_no_live_worker_holds_are_restored(tmp_path, redis_server) -> None:
    stack = make_stack(tmp_path, redis_server.url(11), CONFIG, recovery={})
    try:
        stack.start()
        worker = stack.start_worker(concurrency=2, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            rt = client.runtime
            for text in ("one", "two"):
                assert client.submit(text, task="work", tier="free").wait(30).status == "succeeded"
            waiting = client.submit("three", task="work", tier="free")
            time.sleep(liveness.DELIVERY_GRACE_S + 2)  # held well past the grace, for its slot

            def restore() -> list[str]:
                return liveness.restore_orphans(rt.redis, rt.keys, rt.store, client.app, rt.limiter.now_s())

            assert restore() == []  # its worker beats and says it holds it
            assert rt.store.job(waiting.id).status != "succeeded"
            stack.kill_worker(worker)
            wait_for(
                lambda: waiting.id in restore(),
                timeout_s=liveness.DEAD_AFTER_S + 15,
                what="the dead worker's message to be restored",
                every_s=1.0,
            )
            assert rt.redis.hlen(rt.keys.alive()) == 0  # the dead worker's entry is gone
            stack.start_worker(concurrency=2, loglevel="WARNING")
            assert waiting.wait(60).status == "succeeded"
    finally:
        stack.close()
