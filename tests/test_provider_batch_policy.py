"""Provider batches without workers: which jobs go (sync, batch, auto and the deadline), the
config that says so, and results applied once however often a poll fetches them — against
real Redis, a real store and the simulator's batch endpoints."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis

from producer.jobs import job_row
from tests.conftest import CONFIGS
from workers import provider_batch
from workers.config import Candidate, parse_settings
from workers.env import Env
from workers.errors import ConfigError
from workers.limiter import Clock
from workers.messages import build_request
from workers.runtime import Runtime
from workers.simulator.server import start_in_thread
from workers.simulator.settings import sim_settings
from workers.store import BATCHED, SUCCEEDED, Attempt, Store

OA = Candidate("oa", "o1")


class Published:
    """A Celery app stand-in that keeps what would be published (tasks by name, with options)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def signature(self, name: str, **options: Any) -> Any:
        app = self

        class _Sig:
            def apply_async(self, **more: Any) -> None:
                app.sent.append((name, {**options, **more}))

        return _Sig()


@pytest.fixture
def make_rt(redis_client: redis.Redis, tmp_path):
    servers = []

    def build(replace: tuple[str, str] = ("", "")) -> Runtime:
        text = (CONFIGS / "provider_batches.toml").read_text().replace(*replace)
        server = start_in_thread(sim_settings(parse_settings(text, "pb.toml"), port=0))
        servers.append(server)
        runtime = Runtime(
            parse_settings(text, "pb.toml", simulator_url=server.url),
            env=Env.from_environ({k: f"sk-{k.lower()}" for k in ("OA_KEY", "AN_KEY", "GE_KEY", "EX_KEY")}),
            store=Store(f"sqlite:///{tmp_path}/s{len(servers)}.db"),
            redis_client=redis_client,
            clock=Clock(),
            http=httpx.Client(),
            quiet=True,
        )
        runtime.sim = server  # type: ignore[attr-defined]
        return runtime

    yield build
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def rt(make_rt) -> Runtime:
    return make_rt()


def hand_all(rt: Runtime, jobs: list) -> str:
    """Every job into the batch being collected (one, while it has room): its id."""
    handed = {provider_batch.hand_over(rt, job, OA)[0] for job in jobs}
    assert len(handed) == 1
    return handed.pop()


def poll_until_applied(rt: Runtime, app: Published, batch_id: str) -> None:
    deadline = time.monotonic() + 15
    while rt.store.provider_batch(batch_id).state != "applied" and time.monotonic() < deadline:
        provider_batch.poll(rt, app, batch_id)
        time.sleep(0.2)
    assert rt.store.provider_batch(batch_id).state == "applied"


def claimed(
    rt: Runtime, *, mode: str | None = None, deadline_s: float | None = None, task: str = "analysis", **extra
):
    job_id = uuid.uuid4().hex
    row = job_row(
        job_id, task, "free", build_request("hello"), target=OA, mode=mode, deadline_s=deadline_s, **extra
    )
    rt.store.add_jobs([row])
    claim = rt.store.claim(job_id, lease_s=30, max_crashes=3)
    assert claim.state == "run"
    return claim.job


def test_the_mode_and_the_deadline_decide(rt: Runtime) -> None:
    chain = rt.settings.chain("analysis", "free")  # the route says auto
    assert not provider_batch.goes_to_batch(rt, claimed(rt), OA, chain)  # auto, no deadline: now
    assert provider_batch.goes_to_batch(rt, claimed(rt, deadline_s=7200), OA, chain)
    # the turnaround (2 s configured, 1.5x for safety) plus collecting no longer fits: now
    assert not provider_batch.goes_to_batch(rt, claimed(rt, deadline_s=3), OA, chain)
    assert provider_batch.goes_to_batch(rt, claimed(rt, mode="batch"), OA, chain)
    assert not provider_batch.goes_to_batch(rt, claimed(rt, mode="sync", deadline_s=7200), OA, chain)


def test_batch_settings_and_modes_are_checked_by_name() -> None:
    base = (CONFIGS / "provider_batches.toml").read_text()
    with pytest.raises(ConfigError, match=r"routes\.analysis\.mode.*sync, batch, auto"):
        parse_settings(base.replace('mode = "auto"', 'mode = "later"'), "pb.toml")
    with pytest.raises(ConfigError, match=r"providers\.oa\.batch\.discout"):
        parse_settings(
            base.replace(
                "discount = 0.5, turnaround_s = 2, collect_s = 0.5, poll_s = 0.3 }\n[providers.oa",
                "discout = 0.5 }\n[providers.oa",
                1,
            ),
            "pb.toml",
        )


def test_results_are_applied_once_however_often_they_are_fetched(rt: Runtime) -> None:
    app = Published()
    jobs = [claimed(rt, mode="batch") for _ in range(3)]
    jobs.append(claimed(rt, mode="batch", callback_url="http://127.0.0.1:9/done"))
    handed = [provider_batch.hand_over(rt, job, OA) for job in jobs]
    batch_id = handed[0][0]
    assert [h[1] for h in handed] == [True, False, False, False]  # one collecting batch for all
    assert {j.status for j in rt.store.provider_batch_jobs(batch_id)} == {BATCHED}
    # the estimate the claim put on the ledger is gone: no call was made
    with rt.store.session(write=False) as s:
        assert s.query(Attempt).filter(Attempt.job_id.in_([j.id for j in jobs])).count() == 0
    provider_batch.submit(rt, app, batch_id)
    provider_batch.submit(rt, app, batch_id)  # a second delivery of the submit task: nothing
    stats = httpx.get(f"{rt.sim.url}/_sim/stats", timeout=5).json()  # type: ignore[attr-defined]
    assert stats["oa"]["batches_created"] == 1
    batch = rt.store.provider_batch(batch_id)
    assert batch.state == "submitted" and batch.ref  # its id stored before any poll
    poll_until_applied(rt, app, batch_id)
    # a late duplicate poll applies the same results again: nothing changes
    provider_batch.apply(rt, app, batch, rt.settings.providers["oa"], [])
    jobs_after = rt.store.provider_batch_jobs(batch_id)
    assert {j.status for j in jobs_after} == {SUCCEEDED}
    with rt.store.session(write=False) as s:
        attempts = s.query(Attempt).filter(Attempt.job_id.in_([j.id for j in jobs])).all()
    assert len(attempts) == 4 and all(a.provider_batch_id == batch_id for a in attempts)
    assert all(a.saved_usd == pytest.approx(a.cost_usd) and a.cost_usd > 0 for a in attempts)
    republished = [options["task_id"] for name, options in app.sent if name == "spillway.run_job"]
    assert sorted(republished) == sorted(j.id for j in jobs)  # each job's task again, once
    callbacks = [o["args"] for n, o in app.sent if n == "spillway.deliver_callback"]
    assert callbacks == [[jobs[-1].id]]  # the job that asked for one, once


def test_a_full_batch_queue_sends_the_rest_later_not_never(make_rt) -> None:
    rt = make_rt(
        ("batch = { discount = 0.5, turnaround_s = 2,", "batch = { queue_tokens = 10, turnaround_s = 2,")
    )
    app = Published()
    jobs = [claimed(rt, mode="batch") for _ in range(4)]
    assert {j.est_input_tokens for j in jobs} == {5}  # two of them fill the queue
    batch_id = hand_all(rt, jobs)
    provider_batch.submit(rt, app, batch_id)
    first = rt.store.provider_batch(batch_id)
    assert first.state == "submitted" and first.size == 2 and first.input_tokens == 10
    [options] = [o for n, o in app.sent if n == "spillway.submit_provider_batch"]
    waiting = options["kwargs"]["batch_id"]
    assert options["countdown"] == provider_batch.POLL_MAX_S  # looked at again later
    provider_batch.submit(rt, app, waiting)  # too early: the queue is still full, it waits on
    assert (
        rt.store.provider_batch(waiting).state == "collecting" and rt.store.provider_batch(waiting).size == 2
    )
    poll_until_applied(rt, app, batch_id)  # the first batch ends: the queue is free again
    provider_batch.submit(rt, app, waiting)
    poll_until_applied(rt, app, waiting)
    assert {
        j.status for j in rt.store.provider_batch_jobs(batch_id) + rt.store.provider_batch_jobs(waiting)
    } == {SUCCEEDED}


def test_a_batch_still_running_near_the_deadline_is_cancelled_and_the_rest_called_now(make_rt) -> None:
    # a simulated turnaround far longer than the deadline leaves: auto would not send these, so
    # the route's own mode does ("batch"), with a deadline inside the cancel margin
    rt = make_rt(("batch = { turnaround_s = 1.0 }", "batch = { turnaround_s = 30.0 }"))
    app = Published()
    jobs = [claimed(rt, mode="batch", deadline_s=120) for _ in range(3)]
    batch_id = hand_all(rt, jobs)
    provider_batch.submit(rt, app, batch_id)
    poll_until_applied(rt, app, batch_id)  # cancelled at the first poll, ended soon after
    after = {j.id: j for j in rt.store.provider_batch_jobs(batch_id)}
    assert {j.status for j in after.values()} == {"queued"} and {j.mode for j in after.values()} == {"sync"}
    republished = [o["kwargs"]["job_id"] for n, o in app.sent if n == "spillway.run_job"]
    assert sorted(republished) == sorted(after)  # each sent again, to be called now


def test_a_batch_over_the_apis_size_limit_is_sent_in_parts(rt: Runtime, monkeypatch) -> None:
    from workers.providers.batch import BATCH_ADAPTERS
    from workers.providers.batch.base import ENVELOPE_BYTES

    adapter = BATCH_ADAPTERS["openai"]
    one_line = len(
        adapter.item_line(rt.settings.providers["oa"], "o1", provider_batch._items([claimed(rt)])[0])
    )
    monkeypatch.setattr(
        type(adapter), "max_bytes", ENVELOPE_BYTES + int(one_line * 1.5)
    )  # one request per provider batch
    app = Published()
    jobs = [claimed(rt, mode="batch") for _ in range(3)]
    batch_id = hand_all(rt, jobs)
    provider_batch.submit(rt, app, batch_id)
    assert rt.store.provider_batch(batch_id).size == 1
    parts = [o["kwargs"]["batch_id"] for n, o in app.sent if n == "spillway.submit_provider_batch"]
    assert len(parts) == 1  # the rest, in a batch of its own, sent at once (and split again there)
    provider_batch.submit(rt, app, parts[0])
    parts += [
        o["kwargs"]["batch_id"] for n, o in app.sent[len(parts) :] if n == "spillway.submit_provider_batch"
    ]
    for part in {batch_id, *parts}:
        provider_batch.submit(rt, app, part)
        poll_until_applied(rt, app, part)
    answered = {j.id: j.status for part in {batch_id, *parts} for j in rt.store.provider_batch_jobs(part)}
    assert answered == {j.id: SUCCEEDED for j in jobs}


@pytest.mark.parametrize("candidate", [OA, Candidate("ge", "g1")])
def test_a_batch_its_worker_sent_but_never_recorded_is_found_not_sent_twice(rt: Runtime, candidate) -> None:
    """The worker died after the provider took the batch and before the store had its id."""
    from sqlalchemy import update

    from workers.providers.batch import batch_adapter
    from workers.store import ProviderBatch, utcnow

    app = Published()
    jobs = [claimed(rt, mode="batch") for _ in range(2)]
    batch_id = {provider_batch.hand_over(rt, job, candidate)[0] for job in jobs}.pop()
    _, taken = rt.store.take_for_submit(batch_id)
    provider = rt.settings.providers[candidate.provider]
    key = provider_batch._key(rt, candidate.provider, batch_id)
    items = provider_batch._items(taken)
    batch_adapter(provider).submit(
        rt.http, provider, key.secret, candidate.model, items, metadata={"spillway": batch_id}
    )
    with rt.store.session() as s:  # ... and ten minutes and more have passed since
        s.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == batch_id)
            .values(created_at=utcnow() - timedelta(seconds=provider_batch.RESUBMIT_STUCK_S + 60))
        )
    assert provider_batch.resume_overdue(rt, app) == 1
    found = rt.store.provider_batch(batch_id)
    assert found.state == "submitted" and found.ref
    assert [n for n, _ in app.sent] == ["spillway.poll_provider_batch"]  # polled, not sent again
    poll_until_applied(rt, app, batch_id)
    stats = httpx.get(f"{rt.sim.url}/_sim/stats", timeout=5).json()  # type: ignore[attr-defined]
    assert stats[candidate.provider]["batches_created"] == 1
    assert {j.status for j in rt.store.provider_batch_jobs(batch_id)} == {SUCCEEDED}
