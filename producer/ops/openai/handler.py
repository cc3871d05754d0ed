"""The handlers' base: a tenant per bearer token, blocking work in a pool, OpenAI's errors."""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tornado.web import HTTPError, RequestHandler

from producer.client import Client
from producer.ops.openai.errors import ApiError, api_error
from producer.ops.tenants import Tenant, Tenants
from workers.errors import SpillwayError

if TYPE_CHECKING:  # the handlers are handed these; only their types are needed here
    from producer.ops.openai.chat import Submitter, Waiters

log = logging.getLogger("spillway.openai")

ANONYMOUS = Tenant("anonymous", "free", (), "chat", "")  # `spillway serve --insecure-no-auth`


class ApiHandler(RequestHandler):
    def initialize(
        self,
        client: Client,
        tenants: Tenants,
        pool: ThreadPoolExecutor,
        waiters: Waiters,
        submitter: Submitter,
    ) -> None:
        self.client, self.tenants, self.pool, self.waiters = client, tenants, pool, waiters
        self.submitter = submitter
        self.rt = client.runtime

    def prepare(self) -> None:
        if not self.tenants:
            self.tenant = ANONYMOUS
            return
        tenant = self.tenants.authenticate(self.request.headers.get("Authorization", ""))
        if tenant is None:
            raise ApiError(
                401,
                "Incorrect API key provided. Use a token of `spillway serve` as the API key.",
                code="invalid_api_key",
            )
        self.tenant = tenant

    async def blocking(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        except SpillwayError as exc:
            raise api_error(exc) from exc

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str, ensure_ascii=False))

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"null")
        except (ValueError, RecursionError):
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body of your request must be a JSON object.")
        return body

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = exc.body
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, HTTPError):
            message = exc.reason or self._reason
            body = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
            }
        else:
            body = {
                "error": {"message": "internal error", "type": "server_error", "param": None, "code": None}
            }
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, HTTPError):
            return  # answered; bodies (prompts) are never logged
        log.error("request failed: %s: %s", typ.__name__, value)
