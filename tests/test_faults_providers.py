"""Provider outages: 500s, 503s, timeouts or reset connections for a while — the circuit
opens, jobs finish on the other providers of their chains, and the provider is used again
after the cooldown. A provider whose every key is invalid is disabled, one line per key."""

from __future__ import annotations

import time

import pytest

from tests.faultkit import FULL, LEDGER, Row, all_final, audit, size, wait_for, wait_until
from tests.test_faults_workers import make_stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]
FAULTS = ["error_500", "error_503", "timeout", "reset"] if FULL else ["error_500", "timeout"]
TICK_S = 0.5  # how often jobs arrive during an outage


@pytest.mark.parametrize("fault", FAULTS)
def test_a_provider_outage_is_routed_around_then_healed(tmp_path, redis_server, fault: str) -> None:
    outage_s = 60 if FULL else 4
    stack = make_stack(tmp_path, redis_server.url(15))
    try:
        stack.start()
        stack.start_worker(concurrency=16, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit
            from producer.client import default_client
            from producer.status import status_report

            rt = default_client().runtime
            store = rt.store
            stack.set_faults("alpha", {fault: 1.0})
            during, started = [], time.monotonic()
            for _ in range(int(outage_s / TICK_S) + 1):  # bounded in ticks and in time
                if time.monotonic() - started >= outage_s:
                    break
                during += [
                    submit(f"outage {len(during) + i}", task="work", tier="free").id for i in range(10)
                ]
                # the scenario, not a wait: traffic keeps coming, a few jobs a tick, while alpha is down
                time.sleep(TICK_S)
            failed_calls = stack.simulator_stats()["alpha"].get(f"fault_{fault}", 0)
            stack.set_faults("alpha", {})
            assert wait_until(all_final(store, during), timeout_s=120), store.count_by_status()

            def alpha_states() -> set[str]:
                report = status_report(rt)["providers"]
                return {a["state"] for p in report if p["provider"] == "alpha" for a in p["accounts"]}

            wait_for(
                lambda: (states := alpha_states()) and not states & {"circuit_open", "blocked", "disabled"},
                timeout_s=60,
                what="alpha's circuit to end its cooldown (half-open or closed)",
            )
            after = [submit(f"healed {i}", task="work", tier="free").id for i in range(20)]
            assert wait_until(all_final(store, after), timeout_s=60)
            outage, healed = audit(store, during), audit(store, after)
            jobs = store.jobs(during + after)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            f"provider outage: {fault}",
            faults=failed_calls,
            submitted=len(during) + len(after),
            lost=outage.lost + healed.lost,
            charged_twice=outage.charged_twice + healed.charged_twice,
        )
    )
    assert outage.lost == healed.lost == 0 and outage.charged_twice == healed.charged_twice == 0
    assert all(jobs[j].status == "succeeded" and jobs[j].provider == "beta" for j in during)
    # three failures in a row open the circuit: only calls already admitted fail after that
    assert 3 <= failed_calls <= 3 + 16
    assert any(jobs[j].provider == "alpha" for j in after)  # used again after the cooldown


def test_a_provider_with_every_key_invalid_is_disabled(tmp_path, redis_server) -> None:
    from tests.conftest import CONFIGS

    text = (CONFIGS / "faults.toml").read_text() + '\n[simulator.providers.alpha]\nreject_keys = ["*"]\n'
    stack = make_stack(tmp_path, redis_server.url(15), text)
    stack.keys_per_provider = {"alpha": 2}
    jobs = size(30, 100)
    try:
        stack.start()
        stack.start_worker(concurrency=8, loglevel="INFO")
        stack.wait_for_workers()
        with stack.applied():
            from producer import submit
            from producer.client import default_client
            from producer.status import status_report

            store = default_client().runtime.store
            ids = [submit(f"bad keys {i}", task="work", tier="free").id for i in range(jobs)]
            assert wait_until(all_final(store, ids), timeout_s=120)
            result = audit(store, ids)
            states = {
                a["state"]
                for p in status_report(default_client().runtime)["providers"]
                if p["provider"] == "alpha"
                for a in p["accounts"]
            }
        log = (stack.workdir / "worker0.log").read_text()
    finally:
        stack.close()
    LEDGER.add(
        Row(
            "every key of a provider invalid",
            faults=2,
            submitted=jobs,
            lost=result.lost,
            charged_twice=result.charged_twice,
        )
    )
    assert result.lost == 0 and states == {"disabled"}
    disabled = [line for line in log.splitlines() if "disabled: the provider rejected it" in line]
    assert len(disabled) == 2 and all("alpha key k" in line for line in disabled)


#: One provider, every setting the shipped default (circuit: 5 failures, a probe after 5 s,
#: growing to a 300 s cooldown); its jobs have nowhere else to go, so they wait for it.
SOLO_CONFIG = """
[providers.solo]
api = "openai"
base_url = "https://solo.example/v1"
key_env = "SOLO_KEY"
[providers.solo.models.s1]
[routes.work]
free = ["solo:s1"]
[simulator]
seed = 9
latency_ms = { median = 50, p95 = 80 }
"""


def test_a_provider_that_comes_back_runs_its_jobs_within_seconds(tmp_path, redis_server) -> None:
    outage_s = 60 if FULL else 15
    stack = make_stack(tmp_path, redis_server.url(10), SOLO_CONFIG, recovery={})  # shipped defaults
    try:
        stack.start()
        stack.start_worker(concurrency=8, loglevel="WARNING")
        stack.wait_for_workers()
        with stack.applied() as client:
            store = client.runtime.store
            stack.set_faults("solo", {"error_500": 1.0})
            started = time.monotonic()
            ids = [client.submit(f"waits for solo {i}", task="work", tier="free").id for i in range(20)]
            time.sleep(max(0.0, outage_s - (time.monotonic() - started)))  # the outage itself
            failed_calls = stack.simulator_stats()["solo"].get("fault_error_500", 0)
            stack.set_faults("solo", {})
            back = time.monotonic()
            assert wait_until(all_final(store, ids), timeout_s=120), store.count_by_status()
            back_after_s = time.monotonic() - back
            result = audit(store, ids)
            jobs = store.jobs(ids)
    finally:
        stack.close()
    LEDGER.add(
        Row(
            f"provider down {outage_s} s, defaults: its jobs done {back_after_s:.0f} s after its return",
            faults=failed_calls,
            submitted=len(ids),
            lost=result.lost,
            charged_twice=result.charged_twice,
        )
    )
    assert result.lost == 0 and result.charged_twice == 0
    assert all(j.status == "succeeded" for j in jobs.values()), {j.id: j.error for j in jobs.values()}
    # five failures open the circuit; then only its probes reach the provider
    assert failed_calls <= 5 + 8 + 4, failed_calls
    assert back_after_s <= 30, f"the provider's jobs ran only {back_after_s:.0f} s after it was back"
