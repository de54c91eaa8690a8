"""A webhook receiver for tests: a real aiohttp server on a free port that records each post.

It answers what the test tells it (`answers`, then `default`), can hold every answer until a
gate opens (a receiver that hangs), and lets the test await a number of posts instead of
sleeping. Signatures are checked by the test with the `standardwebhooks` package.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from tests.support import free_port


@dataclass(frozen=True)
class Post:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body)
        return document

    @property
    def type(self) -> str:
        return str(self.json["type"])

    @property
    def seq(self) -> int:
        return int(self.json["data"]["seq"])

    @property
    def signatures(self) -> list[str]:
        return self.headers["webhook-signature"].split(" ")

    def verify(self, secret: str) -> dict[str, Any]:
        """The package's own verifier (which also wants a timestamp within 5 minutes)."""
        verified: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return verified

    def signed_by(self, secret: str) -> bool:
        """Whether one signature is the package's own for `secret`, at any timestamp (for
        tests whose clock runs ahead of the wall clock)."""
        at = datetime.fromtimestamp(int(self.headers["webhook-timestamp"]), UTC)
        expected = Webhook(secret).sign(self.id, at, self.body.decode())
        return expected in self.signatures


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Receiver:
    port: int = field(default_factory=free_port)
    posts: list[Post] = field(default_factory=list)  # accepted (2xx)
    refused: list[bytes] = field(default_factory=list)  # answered otherwise
    answers: list[Answer] = field(default_factory=list)
    default: Answer = field(default_factory=Answer)
    gate: asyncio.Event | None = None  # when set, every answer waits for it
    waiting: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self._changed:
            self.waiting += 1
            self._changed.notify_all()
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers.pop(0) if self.answers else self.default
        async with self._changed:
            self.waiting -= 1
            if 200 <= answer.status < 300:
                self.posts.append(Post({k.lower(): v for k, v in request.headers.items()}, body))
            else:
                self.refused.append(body)
            self._changed.notify_all()
        return web.Response(status=answer.status, headers=answer.headers)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        app.router.add_post("/moved", self.moved)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/hooks")

    async def stop(self) -> None:
        if self._runner is not None:
            if self.gate is not None:
                self.gate.set()
            await self._runner.cleanup()
            self._runner = None

    async def expect(self, count: int, timeout: float = 30) -> list[Post]:
        """Wait until `count` posts were accepted (bounded), then return them all."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.posts) >= count)
        return list(self.posts)

    async def until_waiting(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.waiting >= count)


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))
