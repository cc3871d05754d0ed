"""One HTTP call to a provider: the shared client, and httpx errors translated in one place."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from workers.errors import ProviderConnectionError, ProviderTimeout, ServerError
from workers.messages import ChatRequest, Completion
from workers.providers.base import ADAPTERS
from workers.providers.signals import read_signal

if TYPE_CHECKING:
    from workers.config import ProviderConfig

_client: httpx.Client | None = None
_client_pid = 0
_lock = threading.Lock()


def shared_client() -> httpx.Client:
    """One client (one connection pool) per process, made again after a fork."""
    global _client, _client_pid
    with _lock:
        if _client is None or _client_pid != os.getpid():
            _client = httpx.Client(
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
                headers={"user-agent": "spillway/0.1"},
            )
            _client_pid = os.getpid()
        return _client


def complete(
    client: httpx.Client,
    provider: ProviderConfig,
    model: str,
    request: ChatRequest,
    api_key: str | None,
    clock: Callable[[], float] = time.time,
) -> Completion:
    """Send one chat request; return the completion or raise a `ProviderError`.

    The rate-limit signal of the response (2xx or error) rides on the completion or on
    the exception, so the limiter learns from both.
    """
    adapter = ADAPTERS[provider.api]
    timeout = httpx.Timeout(provider.timeout_s, connect=provider.connect_timeout_s)
    with translated_errors(provider):
        response = client.post(
            adapter.url(provider, model),
            json=adapter.body(provider, model, request),
            headers=adapter.headers(provider, api_key),
            timeout=timeout,
        )
    body = _json_or_none(response)
    signal = read_signal(provider.signals, response.headers, body, clock())
    if not response.is_success:
        raise adapter.classify(response.status_code, body, signal, provider)
    if body is None:
        raise ServerError("malformed JSON in a success response", provider.name, response.status_code, signal)
    try:
        text, finish, input_tokens, output_tokens = adapter.parse(body, request)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ServerError(
            f"response does not have the {provider.api} shape ({exc!r})",
            provider.name,
            response.status_code,
            signal,
        ) from exc
    return Completion(text, finish, input_tokens, output_tokens, signal)


@contextmanager
def translated_errors(provider: ProviderConfig) -> Iterator[None]:
    """httpx's timeouts and connection failures as the provider's errors (retryable)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(
            f"no answer within {provider.timeout_s:g}s ({type(exc).__name__})", provider.name
        ) from exc
    except httpx.TransportError as exc:
        raise ProviderConnectionError(f"connection failed ({type(exc).__name__})", provider.name) from exc


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
