"""A bare Python proxy: the yardstick for what `spillway serve` adds (`bench.front_door`).

`POST /v1/chat/completions` is forwarded to one upstream URL with one key, and the upstream's
answer is returned as it came: no queue, no store, no limiter. It runs on what serve runs on
(Tornado, httpx), so the difference between the two is what Spillway's queue costs, not what
Python's HTTP stack costs.

    python -m bench.bare_proxy UPSTREAM_URL KEY   # prints its port, then serves until killed
"""

from __future__ import annotations

import asyncio
import sys

import httpx
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler


class Forward(RequestHandler):
    def initialize(self, client: httpx.AsyncClient, upstream: str, key: str) -> None:
        self.client, self.upstream, self.key = client, upstream, key

    async def post(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        answer = await self.client.post(self.upstream, content=self.request.body, headers=headers)
        self.set_status(answer.status_code)
        self.set_header("Content-Type", "application/json")
        self.finish(answer.content)


async def serve(upstream: str, key: str) -> None:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        forward = {"client": client, "upstream": upstream, "key": key}
        app = Application([(r"/v1/chat/completions", Forward, forward)])
        sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(app).add_sockets(sockets)
        print(sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
