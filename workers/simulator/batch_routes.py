"""Which batch API call a request is, and the checks every one of them shares (the key, as
the synchronous endpoints check it; Anthropic's version header). Paths are matched on their
end, below the provider's prefix, as the synchronous parsers match theirs."""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from workers.simulator import batch_anthropic, batch_gemini, batch_openai
from workers.simulator.batches import Call
from workers.simulator.formats import FORMATS
from workers.simulator.settings import SimProvider

if TYPE_CHECKING:
    from workers.simulator.server import Handler


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    run: Callable[[Call], None]


def _route(method: str, pattern: str, run: Callable[[Call], None]) -> Route:
    return Route(method, re.compile(pattern + "$"), run)


ID = r"(?P<id>[^/:]+)"
ROUTES: dict[str, tuple[Route, ...]] = {
    "openai": (
        _route("POST", r"/files", batch_openai.upload_file),
        _route("GET", rf"/files/{ID}", batch_openai.get_file),
        _route("GET", rf"/files/{ID}/content", batch_openai.file_content),
        _route("POST", r"/batches", batch_openai.create_batch),
        _route("GET", r"/batches", batch_openai.list_batches),
        _route("GET", rf"/batches/{ID}", batch_openai.get_batch),
        _route("POST", rf"/batches/{ID}/cancel", batch_openai.cancel_batch),
    ),
    "anthropic": (
        _route("POST", r"/messages/batches", batch_anthropic.create_batch),
        _route("GET", r"/messages/batches", batch_anthropic.list_batches),
        _route("GET", rf"/messages/batches/{ID}", batch_anthropic.get_batch),
        _route("POST", rf"/messages/batches/{ID}/cancel", batch_anthropic.cancel_batch),
        _route("GET", rf"/messages/batches/{ID}/results", batch_anthropic.results),
    ),
    "gemini": (
        _route("POST", r"/models/(?P<model>[^/:]+):batchGenerateContent", batch_gemini.create_batch),
        _route("GET", r"/batches", batch_gemini.list_batches),
        _route("GET", rf"/batches/{ID}", batch_gemini.get_batch),
        _route("POST", rf"/batches/{ID}:cancel", batch_gemini.cancel_batch),
    ),
}


def handle(handler: Handler, method: str) -> bool:
    """Answer the request if it is a batch API call; False leaves it to the server."""
    url = urlsplit(handler.path)
    name, _, rest = url.path.strip("/").partition("/")
    sim = handler.server.sim
    provider = sim.settings.providers.get(name)
    if provider is None:
        return False
    for route in ROUTES[provider.api]:
        match = route.pattern.search("/" + rest)
        if route.method == method and match:
            break
    else:
        return False
    length = int(handler.headers.get("content-length") or 0)
    body = handler.rfile.read(length) if length else b""  # read it all: the connection is kept alive
    query = dict(parse_qsl(url.query))
    key = request_key(provider.api, handler.headers, query)
    call = Call(handler, sim, provider, key, match.groupdict(), query, body, time.time())
    if _refused(call):
        return True
    route.run(call)
    return True


def request_key(api: str, headers: Any, query: dict[str, str]) -> str | None:
    """The API key where each format's synchronous parser finds it."""
    if api == "gemini":
        return headers.get("x-goog-api-key") or query.get("key")
    auth = headers.get("authorization") or ""
    bearer = auth[7:] if auth.lower().startswith("bearer ") else None
    return (headers.get("x-api-key") or bearer) if api == "anthropic" else bearer


def _refused(call: Call) -> bool:
    """Answer the checks the synchronous endpoint makes first; True when one failed."""
    provider: SimProvider = call.provider
    if provider.require_key and (
        not call.key or any(fnmatch.fnmatchcase(call.key, p) for p in provider.reject_keys)
    ):
        call.count("auth_error")
        status = 400 if provider.api == "gemini" else 401  # Gemini: 400 API_KEY_INVALID, as for sync
        call.send(status, FORMATS[provider.api].error(status, "auth", "Incorrect API key provided"))
        return True
    if provider.api == "anthropic" and call.handler.headers.get("anthropic-version") is None:
        call.count("bad_request")
        call.send_error(400, "bad_request", "anthropic-version header is required")
        return True
    return False
