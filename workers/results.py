"""A job's result as producers, the HTTP service and callbacks show it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from workers.store import FINAL, Job


@dataclass(frozen=True)
class JobResult:
    """A job as the store knows it; `spillway submit --json` prints these fields."""

    job_id: str
    status: str
    provider: str | None
    model: str | None
    text: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    attempts: int
    error: str | None
    finish_reason: str | None = None
    custom_id: str | None = None
    cached: bool = False

    @classmethod
    def from_job(cls, job: Job) -> JobResult:
        return cls(
            job_id=job.id,
            status=job.status,
            provider=job.provider,
            model=job.model,
            text=job.text,
            input_tokens=job.input_tokens or 0,
            output_tokens=job.output_tokens or 0,
            cost_usd=round(job.cost_usd or 0.0, 8),
            attempts=job.calls or 0,
            error=job.error,
            finish_reason=job.finish_reason,
            custom_id=job.custom_id,
            cached=bool(job.cached),
        )

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
