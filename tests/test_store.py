"""The store on SQLite and PostgreSQL: jobs, claims, idempotent results and attempts."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tests.faultkit import LEDGER, Row
from workers.errors import InputError
from workers.store import (
    FAILED,
    IN_DOUBT,
    STARTED,
    SUCCEEDED,
    Attempt,
    AttemptRecord,
    DuplicateJob,
    Job,
    Store,
    utcnow,
)
from workers.store.jobs import DIED_IN_CALL


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
    # each dead run's call is on the ledger, unpriced without an estimate: input estimate, max_tokens
    dead = [
        (a.number, a.outcome, a.provider, a.input_tokens, a.output_tokens) for a in store.attempts(job_id)
    ]
    assert dead == [(n, IN_DOUBT, "groq", 4, 8) for n in (1, 2, 3)]
    job = store.job(job_id)
    assert job.status == FAILED and job.error_kind == "poison" and "died 3 times" in job.error


def test_a_call_whose_run_died_is_on_the_ledger_in_doubt_at_its_estimate(store: Store) -> None:
    job_id = new_job(store)

    def estimate(job: Job) -> AttemptRecord:
        return attempt(SUCCEEDED, input_tokens=4, output_tokens=8, cost_usd=0.002)

    assert store.claim(job_id, lease_s=30, max_crashes=3, estimate=estimate).state == "run"
    assert store.attempts(job_id) == []  # the running job is the mark: the claim writes nothing else
    expire_lease(store, job_id)  # the worker died after the request left
    again = store.claim(job_id, lease_s=30, max_crashes=3, estimate=estimate)
    assert again.state == "run" and again.job.calls == 1  # the call it may have made
    dead = store.attempts(job_id)[0]
    assert (dead.number, dead.outcome, dead.error) == (1, IN_DOUBT, DIED_IN_CALL)
    done = attempt(input_tokens=4, output_tokens=5, cost_usd=0.001)
    assert store.finish(job_id, 2, done, status=SUCCEEDED, text="ok", input_tokens=4, output_tokens=5)
    assert store.job(job_id).calls == 2
    assert store.finish(job_id, 1, attempt(output_tokens=6), status=SUCCEEDED) is False  # the dead run, late
    assert [(a.number, a.outcome, a.output_tokens) for a in store.attempts(job_id)] == [
        (1, IN_DOUBT, 8),  # not replaced by the late answer: charged once
        (2, SUCCEEDED, 5),
    ]
    total = store.usage_report(by="provider")["total"]
    assert (total["requests"], total["in_doubt"], total["output_tokens"]) == (2, 1, 13)
    assert total["cost_usd"] == pytest.approx(0.003)


def test_a_running_job_the_reconciler_republishes_is_taken_over_as_a_crash(store: Store) -> None:
    job_id = new_job(store)
    store.claim(job_id, lease_s=30, max_crashes=3)
    assert store.take_for_republish(store.job(job_id))  # its worker is gone, its message lost
    assert store.job(job_id).status == "running"  # still the mark of its run's call
    again = store.claim(job_id, lease_s=30, max_crashes=3, estimate=lambda job: attempt(output_tokens=8))
    assert (again.state, again.job.runs, again.job.crashes, again.job.calls) == ("run", 2, 1, 1)
    assert [(a.number, a.outcome) for a in store.attempts(job_id)] == [(1, IN_DOUBT)]


def test_a_started_entry_an_earlier_version_left_falls_in_doubt(store: Store) -> None:
    """Stores written before the claim stopped writing one: a STARTED entry its dead run left."""
    job_id = new_job(store)
    store.claim(job_id, lease_s=30, max_crashes=3)
    with store.session() as s:
        s.execute(
            Attempt.__table__.insert().values(
                job_id=job_id, number=1, finished_at=utcnow(), **attempt(STARTED).__dict__
            )
        )
    expire_lease(store, job_id)
    again = store.claim(job_id, lease_s=30, max_crashes=3, estimate=lambda job: attempt(output_tokens=8))
    assert again.job.calls == 1  # once: the entry there, not a second one
    assert [(a.number, a.outcome) for a in store.attempts(job_id)] == [(1, IN_DOUBT)]


def test_a_run_that_made_no_call_leaves_no_ledger_entry(store: Store) -> None:
    job_id = new_job(store)
    entry = attempt(output_tokens=8)
    store.claim(job_id, lease_s=30, max_crashes=3, estimate=lambda job: entry)
    assert store.requeue(job_id, 1, None, provider="groq", model="m", hop=False)  # it waited
    store.claim(job_id, lease_s=30, max_crashes=3, estimate=lambda job: entry)  # no crash: no entry
    assert store.finish(job_id, 2, None, status=SUCCEEDED, text="cached", cached=True)  # a cache hit
    assert store.attempts(job_id) == [] and store.job(job_id).calls == 0


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


def test_take_for_republish_wins_once_and_only_for_an_untouched_open_job(store: Store) -> None:
    job_id = new_job(store)
    seen = store.job(job_id)
    results: list[bool] = []
    barrier = threading.Barrier(6)

    def take() -> None:
        barrier.wait()
        results.append(store.take_for_republish(seen))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    job = store.job(job_id)
    assert job.status == "queued" and job.published_at is not None
    assert store.take_for_republish(job) is True  # a fresh look may take it again
    store.claim(job_id, lease_s=30, max_crashes=3)
    store.finish(job_id, 1, None, status=SUCCEEDED)
    assert store.take_for_republish(store.job(job_id)) is False  # final: never republished


def test_unfinished_batch_ids(store: Store) -> None:
    assert store.unfinished_batch_ids() == []
    for batch_id in ("b1", "b2"):
        store.add_batch(id=batch_id, task_type="chat", tier="free", total=1, chords=1)
    job_id = new_job(store, batch_id="b1")
    store.claim(job_id, lease_s=30, max_crashes=3)
    store.finish(job_id, 1, None, status=SUCCEEDED)
    assert sorted(store.unfinished_batch_ids()) == ["b1", "b2"]
    assert store.complete_batch("b1") is not None
    assert store.unfinished_batch_ids() == ["b2"]


def test_a_taken_unique_key_raises_duplicate_job_and_stores_nothing(store: Store) -> None:
    first = new_job(store, idempotency_key="k-1")
    with pytest.raises(DuplicateJob):
        new_job(store, idempotency_key="k-1")
    assert store.by_idempotency_key("k-1").id == first
    new_job(store, batch_id="b", custom_id="c")
    with pytest.raises(DuplicateJob):
        new_job(store, batch_id="b", custom_id="c")
    with pytest.raises(DuplicateJob):
        store.add_jobs([{**_row(store.job(first)), "idempotency_key": "k-2"}])  # same id
    assert store.by_idempotency_key("k-2") is None
    assert sum(store.count_by_status().values()) == 2
    with pytest.raises(IntegrityError) as broken:  # another constraint is not a duplicate
        store.add_jobs([{"id": uuid.uuid4().hex, "tier": "free", "request": {}, "est_input_tokens": 1}])
    assert not isinstance(broken.value, DuplicateJob)


def test_many_new_jobs_are_stored_together_or_not_at_all(store: Store) -> None:
    """One row of many breaking a key stores none of them — on PostgreSQL too, where a single
    job's insert commits by itself."""
    taken = new_job(store, idempotency_key="k-taken")
    rows = [{**_row(store.job(taken)), "id": uuid.uuid4().hex, "idempotency_key": f"k-{i}"} for i in range(3)]
    rows[1]["idempotency_key"] = "k-taken"
    with pytest.raises(DuplicateJob):
        store.add_jobs(rows)
    assert sum(store.count_by_status().values()) == 1
    rows[1]["idempotency_key"] = "k-free"
    store.add_jobs(rows)
    stored = store.jobs([r["id"] for r in rows])
    assert len(stored) == 3 and {j.status for j in stored.values()} == {"queued"}
    assert stored[rows[0]["id"]].runs == 0 and stored[rows[0]["id"]].cost_usd == 0.0  # the defaults
    with pytest.raises(ValueError, match="job row 2 has columns the store does not know: colour"):
        store.add_jobs([{**rows[0], "id": "x1"}, {**rows[0], "id": "x2", "colour": "red"}])


def _row(job: Job) -> dict[str, object]:
    return {c: getattr(job, c) for c in ("id", "task_type", "tier", "request", "est_input_tokens")}


def test_usage_report_and_created_span_through_the_store(store: Store) -> None:
    assert store.created_span() == (None, None)
    a, b = new_job(store), new_job(store)
    store.claim(a, lease_s=30, max_crashes=3)
    store.finish(
        a, 1, attempt(input_tokens=3, output_tokens=4, cost_usd=0.25, latency_ms=12.0), status=SUCCEEDED
    )
    store.claim(b, lease_s=30, max_crashes=3)
    store.requeue(b, 1, attempt("rate_limited", moved_to="gemini"), provider="gemini", model="g")
    report = store.usage_report(by="provider")
    assert report["by"] == "provider" and report["since"] is None
    (groq,) = report["groups"]
    assert groq["provider"] == "groq"
    assert (groq["requests"], groq["failures"], groq["reroutes"]) == (2, 1, 1)
    assert (groq["input_tokens"], groq["output_tokens"], groq["cost_usd"]) == (3, 4, 0.25)
    assert groq["latency_p50_ms"] == 12.0
    assert report["total"]["requests"] == 2 and report["total"]["cost_usd"] == 0.25
    assert store.usage_report(since=utcnow() + timedelta(hours=1))["groups"] == []
    with pytest.raises(InputError, match="--by: expected one of"):
        store.usage_report(by="colour")
    first, last = store.created_span()
    assert first is not None and last is not None and first <= last and first.tzinfo is not None


def test_a_postgres_connection_killed_while_idle_is_replaced_not_failed(pg_schema, monkeypatch) -> None:
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_URL
    from workers.store import engine

    store = Store(PG_URL, schema=pg_schema)
    admin = create_engine(PG_URL)
    try:
        with store.engine.connect() as conn:  # the pool's one connection, idle after this
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with admin.begin() as conn:  # as a server restart would
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        monkeypatch.setattr(engine, "PING_IDLE_S", 0.0)  # every checkout counts as idle
        assert isinstance(store.count_by_status(), dict)  # pinged, found dead, replaced: no error
    finally:
        admin.dispose()
        store.close()


def test_the_postgres_hot_path_loses_a_killed_connection_to_one_error(pg_schema, monkeypatch) -> None:
    """The claim and finish run on psycopg directly (`Database.statements`): a connection the
    server dropped mid-use is one SQLAlchemy error, then gone from the pool; idle, it is pinged."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from tests.conftest import PG_URL
    from workers.store import engine

    store = Store(PG_URL, schema=pg_schema)
    admin = create_engine(PG_URL)

    def kill_the_hot_connection() -> None:
        with store.statements() as execute:  # the pool's one connection, idle after this
            pid = execute(text("SELECT pg_backend_pid()"), {}).fetchone()[0]
        with admin.begin() as conn:  # as a server restart would
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    try:
        first, second = new_job(store), new_job(store)
        monkeypatch.setattr(engine, "PING_IDLE_S", 3600.0)  # used at once: not pinged
        kill_the_hot_connection()
        with pytest.raises(OperationalError):
            store.claim(first, lease_s=60, max_crashes=3)
        assert store.claim(first, lease_s=60, max_crashes=3).state == "run"  # a fresh connection
        monkeypatch.setattr(engine, "PING_IDLE_S", 0.0)  # every checkout counts as idle
        kill_the_hot_connection()
        assert store.claim(second, lease_s=60, max_crashes=3).state == "run"  # pinged, replaced
        assert store.finish(second, 1, None, status=SUCCEEDED, text="ok")
        assert store.job(second).status == SUCCEEDED
    finally:
        admin.dispose()
        store.close()


def test_sqlite_writers_in_several_processes_queue_on_a_file_lock(tmp_path) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Store(url).close()
    code = (
        "import sys, uuid\n"
        "from tests.test_store import new_job\n"
        "from workers.store import Store\n"
        "s = Store(sys.argv[1])\n"
        "for _ in range(100): new_job(s)\n"
    )
    root = str(Path(__file__).parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=root) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]  # no "database is locked"
    store = Store(url)
    try:
        assert sum(store.count_by_status().values()) == 300
        assert (tmp_path / "shared.db.lock").exists()
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_starting_together_on_a_fresh_store_never_race(backend, tmp_path, request) -> None:
    import subprocess
    import sys

    from tests.conftest import PG_URL

    root = str(Path(__file__).parent.parent)
    failures = []
    rounds, together = 4, 10  # 40 starts: each round a fresh store, ten processes creating it at once
    for attempt in range(rounds):
        if backend == "sqlite":
            url, schema = f"sqlite:///{tmp_path / f'cold{attempt}.db'}", ""
        else:
            request.getfixturevalue("pg_schema")  # PostgreSQL answers (else skipped / failed in CI)
            url, schema = PG_URL, f"spillway_cold_{uuid.uuid4().hex[:8]}"
        code = "import sys; from workers.store import Store; Store(sys.argv[1], schema=sys.argv[2] or None).close()"
        procs = [
            subprocess.Popen([sys.executable, "-c", code, url, schema], cwd=root, stderr=subprocess.PIPE)
            for _ in range(together)
        ]
        failures += [p.stderr.read().decode()[-300:] for p in procs if p.wait(120) != 0]
        if schema:
            from sqlalchemy import create_engine, text

            admin = create_engine(PG_URL)
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()
    starts = rounds * together
    LEDGER.add(Row(f"cold starts together, {backend}: {len(failures)} of {starts} failed", faults=starts))
    assert failures == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_store_has_a_schema_version_and_migrates_it_once(backend, tmp_path, request, monkeypatch) -> None:
    from sqlalchemy import select

    from tests.conftest import PG_URL
    from workers.errors import ConfigError
    from workers.store import engine
    from workers.store.models import Meta

    if backend == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'versions.db'}", None
    else:  # a schema of its own: it ends "newer than this Spillway", which no other test wants
        request.getfixturevalue("pg_schema")  # PostgreSQL answers (else skipped / failed in CI)
        url, schema = PG_URL, f"spillway_versions_{uuid.uuid4().hex[:8]}"

    def version(store: Store) -> str:
        with store.session(write=False) as s:
            return s.scalar(select(Meta.value).where(Meta.key == "schema_version"))

    first = Store(url, schema=schema)
    assert version(first) == str(engine.SCHEMA_VERSION)
    job_id = new_job(first)
    first.close()
    steps: list[int] = []  # a next version: its step runs once, in the first process that opens it
    monkeypatch.setattr(engine, "SCHEMA_VERSION", engine.SCHEMA_VERSION + 1)
    monkeypatch.setitem(engine.MIGRATIONS, engine.SCHEMA_VERSION - 1, lambda conn: steps.append(1))
    for _ in range(2):
        upgraded = Store(url, schema=schema)
        assert version(upgraded) == str(engine.SCHEMA_VERSION) and upgraded.job(job_id) is not None
        upgraded.close()
    assert steps == [1]
    monkeypatch.setattr(engine, "SCHEMA_VERSION", engine.SCHEMA_VERSION - 1)  # an older Spillway
    with pytest.raises(ConfigError, match="newer than this Spillway"):
        Store(url, schema=schema)
    if schema:
        from sqlalchemy import create_engine, text

        admin = create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_version_1_store_gets_every_later_column(backend, tmp_path, request) -> None:
    from sqlalchemy import text

    from tests.conftest import PG_URL
    from workers.store.models import Batch, Meta

    if backend == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'v1.db'}", None
    else:  # a schema of its own: the module's pg_schema holds other tests' versions
        request.getfixturevalue("pg_schema")  # PostgreSQL answers (else skipped / failed in CI)
        url, schema = PG_URL, f"spillway_v1_{uuid.uuid4().hex[:8]}"
    store = Store(url, schema=schema)

    def name(table: str) -> str:
        return f'"{schema}".{table}' if schema else table

    batches, jobs, attempts = name("spillway_batches"), name("spillway_jobs"), name("spillway_attempts")
    with store.engine.begin() as conn:  # the layout of version 1, as a store made before it
        conn.execute(text(f"ALTER TABLE {batches} DROP COLUMN line_format"))  # version 2
        conn.execute(text(f"ALTER TABLE {jobs} DROP COLUMN tenant"))  # version 3
        conn.execute(text(f"DROP INDEX {name('ix_spillway_jobs_provider_batch_id')}"))  # version 4
        for table, column in ((jobs, "mode"), (jobs, "provider_batch_id"), (attempts, "provider_batch_id")):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(text(f"ALTER TABLE {attempts} DROP COLUMN saved_usd"))
        conn.execute(update(Meta).where(Meta.key == "schema_version").values(value="1"))
    store.close()
    upgraded = Store(url, schema=schema)
    try:
        upgraded.add_batch(id="b1", task_type="chat", tier="free", line_format="openai")
        assert upgraded.batch("b1").line_format == "openai"
        assert upgraded.job(new_job(upgraded, tenant="team-a")).tenant == "team-a"
        assert upgraded.job(new_job(upgraded, mode="batch", provider_batch_id="pb1")).mode == "batch"
        assert [j.mode for j in upgraded.provider_batch_jobs("pb1")] == ["batch"]
        with upgraded.session(write=False) as s:
            assert s.scalar(select(Meta.value).where(Meta.key == "schema_version")) == "4"
        with upgraded.engine.connect() as conn:
            indexes = sqlalchemy.inspect(conn).get_indexes("spillway_jobs", schema=schema)
        assert "ix_spillway_jobs_provider_batch_id" in {i["name"] for i in indexes}
        assert isinstance(upgraded.batch("b1"), Batch)
    finally:
        if schema:
            with upgraded.engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        upgraded.close()
