"""A batch's progress as `spillway batch --attach` shows it: rates count only what happened
since attaching, and the ETA is never faster than the providers' limits allow."""

from __future__ import annotations

import time

import pytest

from producer.batch import BatchHandle
from producer.client import Client
from tests.conftest import add_job
from workers.store import SUCCEEDED


def finish(rt, job_id: str, tokens: int) -> None:
    rt.store.claim(job_id, lease_s=30, max_crashes=3)
    rt.store.finish(job_id, 1, None, status=SUCCEEDED, text="ok", input_tokens=tokens, output_tokens=0)


def test_attach_rates_count_what_happened_since_and_the_eta_heeds_the_limits(make_rt) -> None:
    rt = make_rt(a_limits="rpm = 60", b_limits="rpm = 30")  # chat/free runs on a and b: 1.5 jobs/s
    rt.store.add_batch(id="b1", task_type="chat", tier="free", total=12)
    ids = [add_job(rt, batch_id="b1", seq=i) for i in range(12)]
    for job_id in ids[:6]:  # half of it done before anyone attached, with many tokens
        finish(rt, job_id, 10_000)
    handle = BatchHandle("b1", Client(runtime=rt))
    assert handle.progress().tokens_per_s == 0.0  # attaching: nothing happened since
    time.sleep(0.6)
    finish(rt, ids[6], 100)
    progress = handle.progress()
    assert progress.done == 7
    assert 0 < progress.tokens_per_s <= 100 / 0.6  # not the 60,100 tokens of the whole batch
    assert progress.limit_jobs_per_s == pytest.approx(1.5)
    # seen so far: more than 1.5 jobs/s (a full bucket's burst); the ETA uses the limit
    assert progress.jobs_per_s > 1.5 and progress.eta_s == pytest.approx(5 / 1.5)


def test_no_limit_no_bound(make_rt) -> None:
    rt = make_rt(a_limits="concurrency = 4", b_limits="rpm = 30")  # a has no per-minute limit
    rt.store.add_batch(id="b2", task_type="chat", tier="free", total=1)
    add_job(rt, batch_id="b2", seq=0)
    assert BatchHandle("b2", Client(runtime=rt)).progress().limit_jobs_per_s is None


def test_a_models_own_limit_bounds_the_eta(make_rt) -> None:
    """A per-model rpm (no provider-wide one) bounds the rate like a provider's does."""
    from dataclasses import replace

    from producer.batch import limit_rate

    rt = make_rt(a_limits="concurrency = 4", b_limits="rpm = 30")
    a = rt.settings.providers["a"]
    am = a.models["am"]
    rt.settings.providers["a"] = replace(a, models={"am": replace(am, limits=replace(am.limits, rpm=60))})
    assert limit_rate(rt, "chat", "free", None) == pytest.approx((60 + 30) / 60)
