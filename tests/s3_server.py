"""A real S3-compatible server for the tests: moto's, in a thread, on a free loopback port.

It speaks the S3 protocol over HTTP like AWS, MinIO or Garage, so S3BlobStore is tested
through aiobotocore, signing and all; nothing of the store is stubbed. One server per run,
one new bucket per test; requests reach moto one at a time (`_OneRequestAtATime` says
why). `refusing_unknown_keys` makes it check credentials as AWS does (it takes any key
otherwise), and `set_written_at` changes an object's age, which the S3 protocol cannot.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import boto3
import pytest
import yarl
from moto import settings as moto_settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.s3.models import s3_backends
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wsgi import get_input_stream

from gateway.store.s3_blobs import S3BlobStore
from tests.support import free_port

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
KEY_ID, SECRET = "testing", "testing"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self) -> Any:
        """A plain (blocking) boto3 client, to set up and look behind the store's back."""
        return _boto3_client(self.endpoint_url, "s3")

    def new_bucket(self) -> str:
        name = f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def store(self, bucket: str, prefix: str = "", **options: Any) -> S3BlobStore:
        options.setdefault("access_key_id", KEY_ID)
        options.setdefault("secret_access_key", SECRET)
        return S3BlobStore(
            bucket,
            prefix,
            endpoint_url=self.endpoint_url,
            region=REGION,
            addressing_style="path",
            max_attempts=1,
            **options,
        )

    def set_written_at(self, bucket: str, key: str, when: datetime) -> None:
        """Make an object look written at `when` (moto keeps naive UTC times)."""
        stored = s3_backends[ACCOUNT]["aws"].get_object(bucket, key)
        assert stored is not None, f"no object {key} in {bucket}"
        stored.last_modified = when.replace(tzinfo=None)

    @contextmanager
    def refusing_unknown_keys(
        self, policy: dict[str, Any] | None = None
    ) -> Iterator[tuple[str, str]]:
        """The server checks signatures and permissions against its IAM users, as AWS does,
        while the block runs; yields the key id and secret of a user with `policy` (an IAM
        policy document; by default every S3 action)."""
        iam = _boto3_client(self.endpoint_url, "iam")
        user = f"relay-{secrets.token_hex(4)}"
        iam.create_user(UserName=user)
        everything = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        iam.put_user_policy(
            UserName=user,
            PolicyName="relay",
            PolicyDocument=json.dumps(
                policy or {"Version": "2012-10-17", "Statement": [everything]}
            ),
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        previous = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = previous


@cache
def _boto3_client(endpoint_url: str, service: str) -> Any:
    return boto3.client(
        service,  # type: ignore[call-overload]
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


class _OneRequestAtATime:
    """moto's app behind a lock, as moto's S3 is not safe under concurrent requests and AWS
    is: a PutObject closes the buffer of the version it replaces while the PutObject that
    wrote that version still reads it for its ETag, and answers 500 "I/O operation on
    closed file" (a GetObject racing a put fails the same way). Each request's body is read
    before the lock and its answer made whole inside it, so sockets still run concurrently
    and only moto's work is serialized."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        environ["wsgi.input"] = io.BytesIO(get_input_stream(environ).read())
        with self._lock:
            answer = self._app(environ, start_response)
            try:
                return [b"".join(answer)]
            finally:
                getattr(answer, "close", lambda: None)()


def start_server() -> tuple[BaseWSGIServer, threading.Thread]:
    """moto's S3 on a free loopback port, served by threads, requests one at a time."""
    app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        "127.0.0.1", free_port(), app, threaded=True, request_handler=MotoRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="moto S3", daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server, thread = start_server()
    host, port = server.server_address[:2]
    try:
        yield S3Server(f"http://{host!s}:{port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


class S3Door:
    """A TCP door between a store and the S3 server that a test shuts and opens again, as an
    endpoint goes down and comes back: shut, it refuses connections and cuts those open (kept
    connections included); `answering_503` makes it answer every request with S3's
    `SlowDown` instead (a throttling or failing service). The objects stay on the server."""

    def __init__(self, server: S3Server) -> None:
        target = yarl.URL(server.endpoint_url)
        self._target = (target.host or "127.0.0.1", target.port or 80)
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._listener: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.answering_503 = False
        self._budget: int | None = None  # answer bytes still let through, then shut
        self.cut = asyncio.Event()  # set when the budget ran out and the door shut
        self._shutting: asyncio.Task[None] | None = None

    def store(self, bucket: str, **options: Any) -> S3BlobStore:
        """A store for `bucket` that reaches the server through this door."""
        return S3Server(self.endpoint_url).store(bucket, **options)

    def cut_after(self, size: int) -> None:
        """Let `size` more bytes of the server's answers through, then shut, mid-answer: a
        store failing while a blob is read."""
        self._budget = size
        self.cut.clear()

    def _spend(self, size: int) -> bool:
        """Whether `size` more bytes of an answer may pass; the door shuts when not."""
        if self._budget is None:
            return True
        self._budget -= size
        if self._budget >= 0:
            return True
        self._budget = None
        self.cut.set()
        self._shutting = asyncio.get_running_loop().create_task(self.shut())
        return False

    async def open(self) -> None:
        self._listener = await asyncio.start_server(self._pass, "127.0.0.1", self.port)

    async def shut(self) -> None:
        assert self._listener is not None
        listener, self._listener = self._listener, None
        listener.close()
        for writer in list(self._open):
            writer.transport.abort()
        await listener.wait_closed()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def __aenter__(self) -> S3Door:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._listener is not None:
            await self.shut()

    async def _pass(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ends = [writer]
        self._open.add(writer)
        try:
            if self.answering_503:
                await _answer_503(reader, writer)
                return
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            ends.append(up_writer)
            self._open.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer, self._spend))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for end in ends:
                self._open.discard(end)
                end.transport.abort()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    may_pass: Callable[[int], bool] = lambda size: True,
) -> None:
    while data := await reader.read(256 * 1024):
        if not may_pass(len(data)):
            break
        writer.write(data)
        await writer.drain()
    writer.transport.abort()


_SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


async def _answer_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """503 SlowDown to one request, then the connection closed (so the door, opened again,
    is reached on a new one); the body is read first unless it waits for 100 Continue."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    fields = dict(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    )
    if fields.get(b"expect") != b"100-continue":
        await reader.readexactly(int(fields.get(b"content-length", b"0")))
    writer.write(
        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
        + f"Content-Length: {len(_SLOW_DOWN)}\r\n\r\n".encode()
        + _SLOW_DOWN
    )
    writer.close()
    await writer.wait_closed()
