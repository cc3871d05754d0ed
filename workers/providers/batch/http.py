"""One HTTP call to a batch endpoint, failures raised as the `ProviderError` tree.

The batch endpoints fail like the chat endpoint (401, 429 with Retry-After, 5xx, timeouts),
so a refusal is classified by the format's own `Adapter.classify` with the rate-limit signal
of the answer, exactly as `transport.complete` does for one chat call.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx

from workers.errors import ProviderError, ServerError
from workers.providers.base import ADAPTERS
from workers.providers.signals import read_signal
from workers.providers.transport import translated_errors

if TYPE_CHECKING:
    from workers.config import ProviderConfig


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as httpx sends it: what `split` measures is what goes on the wire."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def loads_or_none(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def send_json(
    client: httpx.Client, provider: ProviderConfig, method: str, url: str, **request: Any
) -> dict[str, Any]:
    """Send one call; the answer must be a JSON object (else a retryable ServerError)."""
    with translated_errors(provider):
        response = client.request(method, url, timeout=_timeout(provider), **request)
    if not response.is_success:
        raise refusal(provider, response)
    body = loads_or_none(response.content)
    if not isinstance(body, dict):
        raise ServerError(
            f"{method} {_path(url)} answered {response.status_code} without a JSON object",
            provider.name,
            response.status_code,
        )
    return body


def json_lines(
    client: httpx.Client, provider: ProviderConfig, url: str, headers: dict[str, str]
) -> Iterator[Any]:
    """A JSONL download, line by line (results files can be hundreds of MB); a line that is
    not JSON comes back as None, for the caller to skip."""
    with (
        translated_errors(provider),
        client.stream("GET", url, headers=headers, timeout=_timeout(provider)) as response,
    ):
        if not response.is_success:
            response.read()
            raise refusal(provider, response)
        for line in response.iter_lines():
            if line.strip():
                yield loads_or_none(line)


def refusal(provider: ProviderConfig, response: httpx.Response) -> ProviderError:
    """An error answer, classified like a chat call's (429 keeps its Retry-After)."""
    body = loads_or_none(response.content)
    signal = read_signal(provider.signals, response.headers, body, time.time())
    return ADAPTERS[provider.api].classify(response.status_code, body, signal, provider)


def _timeout(provider: ProviderConfig) -> httpx.Timeout:
    return httpx.Timeout(provider.timeout_s, connect=provider.connect_timeout_s)


def _path(url: str) -> str:
    """The URL's path only: a query string may carry a key."""
    return httpx.URL(url).path
