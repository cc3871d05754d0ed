"""Names and defaults shared by producers and workers: task and queue names, TTLs, limits.
(Environment variables are in `workers.env`, Redis key names in `workers.keyspace`.)"""

from __future__ import annotations

#: Celery queue of a provider: one queue per provider, ``llm.<provider>``.
QUEUE_PREFIX = "llm."

#: Celery task names, as Flower shows them.
RUN_JOB_TASK = "spillway.run_job"
FINISH_BATCH_TASK = "spillway.finish_batch"
DELIVER_CALLBACK_TASK = "spillway.deliver_callback"
SUBMIT_PROVIDER_BATCH_TASK = "spillway.submit_provider_batch"
POLL_PROVIDER_BATCH_TASK = "spillway.poll_provider_batch"

DEFAULT_CONFIG_FILE = "spillway.toml"

#: Default request size when a job names no max_tokens.
DEFAULT_MAX_TOKENS = 512

#: A job never waits inside a worker thread longer than this for its bucket to refill;
#: longer waits become a retry with a countdown (or a re-route).
INLINE_WAIT_S = 2.0
#: Longest countdown a retry may carry; longer waits park the job in Redis (visibility timeout!).
MAX_COUNTDOWN_S = 60.0
#: Slack left between a decision and the provider's own clock: a bucket that is just refilled
#: admits this much later, so a call never reaches the provider a few ms before its token.
ADMISSION_MARGIN_S = 0.05
#: A reservation redeemed later than this after its time is given back and the job admitted
#: afresh: calls delayed together must not reach the provider in a burst.
RESERVATION_STALE_S = 2.0
#: Provider hops (re-routes and retries after errors) before a job fails.
MAX_HOPS = 8
#: A job whose worker died this many times while running it is failed as a poison job.
MAX_CRASHES = 3

#: Circuit breaker: consecutive 5xx/timeouts that open it; it is probed (one call) after
#: CIRCUIT_PROBE_S, and each failed probe keeps it open 1.5 times longer, up to the cooldown.
CIRCUIT_FAILURES = 5
CIRCUIT_PROBE_S = 5.0
CIRCUIT_COOLDOWN_S = 300.0
#: A job that finds the circuit's probe in flight looks again this soon (or when it ends).
PROBE_RECHECK_S = 5.0

#: Extra time a concurrency lease lives beyond the call's timeout, so a crashed worker frees it.
LEASE_MARGIN_S = 10.0
#: A producer places a job on a view of the limiter at most this old, plus the jobs it placed
#: since: one read of Redis per route this often, not one per submit. (Placement only picks a
#: queue; the worker's acquire decides, on Redis's state of that moment.)
PLACEMENT_VIEW_S = 0.1
#: How long an idle "work queued for this provider" counter lives in Redis.
PENDING_TTL_S = 3600

DAY_MS = 86_400_000


def queue_name(provider: str) -> str:
    return f"{QUEUE_PREFIX}{provider}"
