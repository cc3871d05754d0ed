"""The baseline: a plain Celery task making the same HTTP call to the same simulator, on the
same broker and the same threads pool — no store, no limiter, no routing."""

from __future__ import annotations

import httpx
from celery import Celery

from workers.celery import celery_settings
from workers.env import Env

app = Celery("plain")  # created after Spillway's app (imported above), so it is the current one
app.conf.update(celery_settings(Env.from_environ()))
_client = httpx.Client(limits=httpx.Limits(max_connections=512, max_keepalive_connections=128))


@app.task(name="bench.plain_call")
def plain_call(url: str, body: dict, key: str) -> dict:
    response = _client.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    response.raise_for_status()
    usage = response.json()["usage"]
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
