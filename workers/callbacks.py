"""Result callbacks for web backends: when a job with a ``callback_url`` is final, its result is
POSTed there, signed, and retried with backoff while the backend is down.

Signature (like Stripe's): header ``X-Spillway-Signature: t=<unix seconds>,v1=<hex>`` where
``hex = HMAC-SHA256(SPILLWAY_CALLBACK_SECRET, f"{t}.{body}")`` over the raw body bytes. The
receiver recomputes it, compares in constant time, and rejects old timestamps. Delivery is at
least once: ``X-Spillway-Job-Id`` lets the receiver drop a repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from workers.env import Env
from workers.errors import ConfigError

SIGNATURE_HEADER = "X-Spillway-Signature"
JOB_HEADER = "X-Spillway-Job-Id"
SECRET_ENV = "SPILLWAY_CALLBACK_SECRET"
MAX_DELIVERIES = 10  # about 34 minutes of backoff (2, 4, 8 … 512 s, capped at 300 s)


def secret(env: Env) -> bytes:
    """The signing key; ConfigError when it is not set, so a submit can fail early."""
    value = env.callback_secret or ""
    if not value:
        raise ConfigError(f"callback_url needs ${SECRET_ENV} (the HMAC key results are signed with)")
    return value.encode()


def sign(body: bytes, key: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(
    body: bytes | str,
    header: str | bytes | None,
    key: bytes | str,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """What a receiver does: recompute the HMAC, compare in constant time, refuse stale ones.
    Takes the secret as the environment gives it (str) or as bytes; any malformed header —
    missing, not ASCII, no t or v1 — is simply not valid (False), never an exception."""
    try:
        text = header.decode("ascii") if isinstance(header, bytes) else header
        if not isinstance(text, str) or not text.isascii():
            return False
        parts = dict(item.split("=", 1) for item in text.split(","))
        t, given = int(parts["t"]), parts["v1"]
        raw = body.encode() if isinstance(body, str) else body
        secret = key.encode() if isinstance(key, str) else key
    except (ValueError, KeyError, UnicodeError, AttributeError, TypeError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(raw, secret, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


def deliver(url: str, job_id: str, payload: dict[str, Any], client: httpx.Client, key: bytes) -> None:
    """One delivery attempt; raises httpx.HTTPError when the backend did not take it."""
    body = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
    headers = {"content-type": "application/json", SIGNATURE_HEADER: sign(body, key), JOB_HEADER: job_id}
    client.post(url, content=body, headers=headers, timeout=10).raise_for_status()


#: A delivery waiting for a worker with the secret looks again at least this often.
SECRET_WAIT_MAX_S = 60.0


def backoff_s(delivery: int) -> float:
    return float(min(2 ** (delivery + 1), 300))
