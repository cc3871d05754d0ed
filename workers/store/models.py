"""The tables: batches, jobs (the claim check: the prompt lives here) and attempts (the ledger)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

QUEUED, RUNNING, PARKED, SUCCEEDED, FAILED = "queued", "running", "parked", "succeeded", "failed"
FINAL = (SUCCEEDED, FAILED)
# A run writes its attempt with the job's next state. One whose worker died wrote none: the
# claim that takes the job over records its call IN_DOUBT (charged at its estimate). STARTED:
# an attempt written at the claim, before its request left, by earlier Spillways (the
# next claim marks one left so in doubt).
STARTED, IN_DOUBT = "started", "in_doubt"
# A job handed to a provider's batch API waits there (`provider_batch_id`) until its result
# is applied; no broker message carries it meanwhile.
BATCHED = "batched"
OPEN = (QUEUED, RUNNING, PARKED, BATCHED)

Stamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "spillway_batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task_type: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(Integer, default=0)
    chords: Mapped[int] = mapped_column(Integer, default=0)
    callback_runs: Mapped[int] = mapped_column(Integer, default=0)
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)  # same input + output: resume
    created_at: Mapped[datetime] = mapped_column(Stamp)
    finished_at: Mapped[datetime | None] = mapped_column(Stamp)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # "openai" when its lines were OpenAI Batch API lines: its output is then in OpenAI's
    # batch output format (schema version 2)
    line_format: Mapped[str | None] = mapped_column(String(16))


class Job(Base):
    __tablename__ = "spillway_jobs"
    __table_args__ = (
        Index("ix_spillway_jobs_batch_seq", "batch_id", "seq"),
        Index("ix_spillway_jobs_status_updated", "status", "updated_at"),
        UniqueConstraint("batch_id", "custom_id", name="uq_spillway_job_custom_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch_id: Mapped[str | None] = mapped_column(String(32))
    seq: Mapped[int | None] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(512))
    task_type: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    est_input_tokens: Mapped[int] = mapped_column(Integer)
    preferred_provider: Mapped[str | None] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(256), unique=True)
    callback_url: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(64))
    # A batch job's place in its chord, so a republished message still counts toward it.
    chord_id: Mapped[str | None] = mapped_column(String(64))
    chord_index: Mapped[int | None] = mapped_column(Integer)
    chord_chunk: Mapped[int | None] = mapped_column(Integer)
    queue: Mapped[str | None] = mapped_column(String(80))
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(32))
    text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    cached: Mapped[bool] = mapped_column(default=False)
    runs: Mapped[int] = mapped_column(Integer, default=0)  # times a worker took the job
    calls: Mapped[int] = mapped_column(Integer, default=0)  # provider calls made
    hops: Mapped[int] = mapped_column(Integer, default=0)  # re-routes and retries after errors
    crashes: Mapped[int] = mapped_column(Integer, default=0)  # workers that died holding it
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(32))
    deadline_at: Mapped[datetime | None] = mapped_column(Stamp)
    # the `spillway serve` tenant that submitted it: its daily token budget (schema version 3)
    tenant: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(Stamp)
    # sync | batch | auto: how the job may run (None: as its route says); the provider batch
    # it is in or was answered by (schema version 4)
    mode: Mapped[str | None] = mapped_column(String(8))
    provider_batch_id: Mapped[str | None] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(Stamp)
    updated_at: Mapped[datetime] = mapped_column(Stamp)
    published_at: Mapped[datetime | None] = mapped_column(Stamp)
    started_at: Mapped[datetime | None] = mapped_column(Stamp)
    finished_at: Mapped[datetime | None] = mapped_column(Stamp)


class Attempt(Base):
    """One turn of a job on a provider: a call (with its tokens and cost) or a re-route."""

    __tablename__ = "spillway_attempts"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_spillway_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("spillway_jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(32))
    task_type: Mapped[str] = mapped_column(String(64))
    tier: Mapped[str] = mapped_column(String(64))
    # succeeded | <error kind> | rerouted | started (the call is out) | in_doubt (its run died)
    outcome: Mapped[str] = mapped_column(String(32))
    called: Mapped[bool] = mapped_column(default=True)  # False: re-routed before any HTTP call
    moved_to: Mapped[str | None] = mapped_column(String(64))  # the provider the job went to next
    error: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(Stamp, index=True)
    finished_at: Mapped[datetime] = mapped_column(Stamp)
    # answered through this provider batch, at its price: `saved_usd` less than a call now
    # would have cost (schema version 4)
    provider_batch_id: Mapped[str | None] = mapped_column(String(32))
    saved_usd: Mapped[float] = mapped_column(Float, default=0.0)


class ProviderBatch(Base):
    """Jobs sent together through one provider's batch API: collected, submitted (its `ref`,
    the provider's id, stored before anything is polled), polled, and applied once."""

    __tablename__ = "spillway_provider_batches"
    __table_args__ = (Index("ix_spillway_provider_batches_state", "state", "provider", "model"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    # collecting | submitting | submitted | applied | refused
    state: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)  # estimated: the queue it takes
    key_id: Mapped[str | None] = mapped_column(String(32))
    ref: Mapped[str | None] = mapped_column(String(128))  # the provider's batch id
    provider_status: Mapped[str | None] = mapped_column(String(32))
    done: Mapped[int] = mapped_column(Integer, default=0)
    polls: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    deadline_at: Mapped[datetime | None] = mapped_column(Stamp)  # its earliest job's
    created_at: Mapped[datetime] = mapped_column(Stamp)
    submitted_at: Mapped[datetime | None] = mapped_column(Stamp)
    expected_at: Mapped[datetime | None] = mapped_column(Stamp)
    next_poll_at: Mapped[datetime | None] = mapped_column(Stamp)
    ended_at: Mapped[datetime | None] = mapped_column(Stamp)


class ApiFile(Base):
    """A file uploaded through the OpenAI-compatible Files API (`spillway serve`), its owner's."""

    __tablename__ = "spillway_api_files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)  # the tenant's name, never its token
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(256))
    bytes: Mapped[int] = mapped_column(Integer)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(Stamp)


class ApiBatch(Base):
    """An OpenAI Batch API batch: its own id and fields over a Spillway batch (`batch_id`)."""

    __tablename__ = "spillway_api_batches"
    __table_args__ = (Index("ix_spillway_api_batches_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[str | None] = mapped_column(String(32))  # None: it failed validation
    input_file_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # OpenAI's `metadata`
    state: Mapped[str | None] = mapped_column(String(16))  # validating | failed | cancelling
    errors: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Stamp)
    cancelling_at: Mapped[datetime | None] = mapped_column(Stamp)


class Meta(Base):
    """Facts about the store itself: `schema_version` (see `engine.SCHEMA_VERSION`)."""

    __tablename__ = "spillway_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
