"""Quota alerts: an account passing 90% of a daily quota gets one warning line and, when a
webhook is configured (``$SPILLWAY_ALERT_WEBHOOK_URL``), one JSON POST there (in the
background, a few tries)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import httpx

from workers.limiter import Lease

log = logging.getLogger("spillway.alerts")


def quota_crossed(lease: Lease, webhook_url: str | None) -> None:
    """Report each daily quota the lease's debit took past 90% (the limiter says which, once)."""
    for entry in lease.crossed:
        field, used, limit = entry.split(":")
        log.warning(
            "account %s/%s passed 90%% of its daily quota %s (model %s): %s of %s used",
            lease.provider,
            lease.key.account,
            field,
            lease.model,
            used,
            limit,
        )
        if webhook_url:
            payload = {
                "event": "quota_90_percent",
                "provider": lease.provider,
                "account": lease.key.account,
                "model": lease.model,
                "quota": field,
                "used": float(used),
                "limit": float(limit),
                "at": datetime.now(UTC).isoformat(),
            }
            threading.Thread(
                target=_post, args=(webhook_url, payload), name="spillway-alert", daemon=True
            ).start()


def _post(url: str, payload: dict) -> None:
    for attempt in range(3):
        try:
            httpx.post(url, json=payload, timeout=5).raise_for_status()
            return
        except httpx.HTTPError as exc:
            if attempt == 2:
                log.warning("quota alert webhook failed: %s", type(exc).__name__)
            time.sleep(2**attempt)
