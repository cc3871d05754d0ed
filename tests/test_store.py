"""The store on SQLite and PostgreSQL: jobs, claims, idempotent results and attempts."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

from sqlalchemy import update

from workers.store import FAILED, SUCCEEDED, AttemptRecord, Job, Store, utcnow


def new_job(store: Store, **extra: object) -> str:
    job_id = uuid.uuid4().hex
    store.add_jobs(
        [
            {
                "id": job_id,
                "task_type": "chat",
                "tier": "free",
                "request": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                "est_input_tokens": 4,
                "provider": "groq",
                "model": "m",
                **extra,
            }
        ]
    )
    return job_id


def attempt(outcome: str = SUCCEEDED, **extra: object) -> AttemptRecord:
    return AttemptRecord(
        provider="groq", model="m", outcome=outcome, started_at=utcnow(), key_id="k0-abc123", **extra
    )


def test_job_round_trip(store: Store) -> None:
    job_id = new_job(store, custom_id="c-1", batch_id="b1", seq=3)
    job = store.job(job_id)
    assert job is not None and job.status == "queued" and job.custom_id == "c-1" and job.seq == 3
    assert job.request["messages"][0]["content"] == "hi"
    assert store.job("nope") is None


def test_result_is_written_once(store: Store) -> None:
    job_id = new_job(store)
    claim = store.claim(job_id, lease_s=30, max_crashes=3)
    assert claim.state == "run" and claim.job.runs == 1
    record = attempt(input_tokens=4, output_tokens=5, cost_usd=0.001)
    first = store.finish(
        job_id, 1, record, status=SUCCEEDED, text="one", input_tokens=4, output_tokens=5, cost_usd=0.001
    )
    again = store.finish(
        job_id, 1, record, status=SUCCEEDED, text="two", input_tokens=4, output_tokens=5, cost_usd=0.001
    )
    assert (first, again) == (True, False)
    job = store.job(job_id)
    assert job.text == "one" and job.calls == 1
    attempts = store.attempts(job_id)
    assert len(attempts) == 1 and attempts[0].output_tokens == 5  # (job, attempt) is unique
    assert store.claim(job_id, lease_s=30, max_crashes=3).state == "final"


def test_claim_is_exclusive_while_the_lease_lives(store: Store) -> None:
    job_id = new_job(store)
    assert store.claim(job_id, lease_s=30, max_crashes=3).state == "run"
    busy = store.claim(job_id, lease_s=30, max_crashes=3)
    assert busy.state == "busy" and 25 < busy.busy_for_s <= 30


def test_concurrent_claims_give_the_job_to_one(store: Store) -> None:
    job_id = new_job(store)
    states: list[str] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        states.append(store.claim(job_id, lease_s=30, max_crashes=3).state)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(states) == ["busy"] * 7 + ["run"]


def expire_lease(store: Store, job_id: str) -> None:
    with store.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1)))


def test_expired_lease_counts_a_crash_and_poison_fails_the_job(store: Store) -> None:
    job_id = new_job(store)
    assert store.claim(job_id, lease_s=30, max_crashes=3).state == "run"
    expire_lease(store, job_id)  # the worker holding it died
    again = store.claim(job_id, lease_s=30, max_crashes=3)
    assert again.state == "run" and again.job.crashes == 1 and again.job.runs == 2
    expire_lease(store, job_id)
    assert store.claim(job_id, lease_s=30, max_crashes=3).job.crashes == 2
    expire_lease(store, job_id)
    poison = store.claim(job_id, lease_s=30, max_crashes=3)
    assert poison.state == "poison"
    job = store.job(job_id)
    assert job.status == FAILED and job.error_kind == "poison" and "died 3 times" in job.error


def test_requeue_hands_the_job_on_and_records_the_hop(store: Store) -> None:
    job_id = new_job(store)
    store.claim(job_id, lease_s=30, max_crashes=3)
    moved = store.requeue(
        job_id, 1, attempt("rate_limited", error="429"), provider="gemini", model="g", hop=True
    )
    assert moved
    job = store.job(job_id)
    assert (job.status, job.provider, job.queue, job.hops, job.calls) == (
        "queued",
        "gemini",
        "llm.gemini",
        1,
        1,
    )
    assert store.requeue(job_id, 1, None, provider="x", model="y") is False  # not running any more
    assert [a.outcome for a in store.attempts(job_id)] == ["rate_limited"]


def test_open_jobs_and_counts(store: Store) -> None:
    a, b = new_job(store, batch_id="b"), new_job(store, batch_id="b")
    store.claim(a, lease_s=30, max_crashes=3)
    store.finish(a, 1, None, status=SUCCEEDED)
    assert store.count_by_status("b") == {"succeeded": 1, "queued": 1}
    assert [j.id for j in store.open_jobs(idle_for_s=-1)] == [b]
    assert store.open_jobs(idle_for_s=3600) == []


def test_batch_summary_is_written_once_when_every_job_is_final(store: Store) -> None:
    store.add_batch(id="b", task_type="chat", tier="free", total=2, chords=1)
    a, b = new_job(store, batch_id="b"), new_job(store, batch_id="b")
    store.claim(a, lease_s=30, max_crashes=3)
    store.finish(a, 1, None, status=SUCCEEDED, input_tokens=3, output_tokens=4, cost_usd=0.5)
    assert store.complete_batch("b") is None  # b is still open
    store.claim(b, lease_s=30, max_crashes=3)
    store.finish(b, 1, None, status=FAILED, error="boom")
    summary = store.complete_batch("b")
    assert summary["by_status"] == {"succeeded": 1, "failed": 1}
    assert summary["input_tokens"] == 3 and summary["cost_usd"] == 0.5
    assert store.complete_batch("b") is None  # once
    assert store.batch("b").summary["total"] == 2
