"""schemathesis against the OpenAPI document a running relay serves, with a write key.

Every operation is called with generated valid and invalid input; the answers must match the
document (status codes, media types, schemas) and never be a server error.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
from sqlalchemy import select

from gateway.access import MessageScope
from gateway.console.api_keys import ApiKeyDesk
from gateway.console.timeline import MessageFilter, Timeline
from gateway.store.models import ApiKeyScope, Event, utcnow
from tests.conftest import make_message
from tests.letter_site import PROSPECT, LetterSite, offer

SCHEMATHESIS = Path(sys.executable).with_name("st")


async def test_the_api_keeps_its_openapi_document(site: LetterSite, tmp_path: Path) -> None:
    relay = site.harness
    await site.send_offer(offer(big=False))  # a letter and a link to act on
    await relay.send(make_message())  # a message and events to list
    db = relay.relay.db
    listed = (
        await Timeline(db).messages(MessageScope(everything=True), MessageFilter("Villa"))
    ).items
    [summary] = listed
    story = await Timeline(db).message(MessageScope(everything=True), summary.id)
    assert story is not None
    [letter] = [ref for r in story.recipients for ref in r.letters]
    endpoints = [
        await relay.relay.webhooks.create("http://127.0.0.1:9/", allow_private=True, by="test")
        for _ in range(2)
    ]
    env = {
        **os.environ,
        "SEALRELAY_MESSAGE": summary.id,
        "SEALRELAY_RECIPIENT": PROSPECT,
        "SEALRELAY_LETTER": letter.id,
        "SEALRELAY_ENDPOINT": endpoints[0].endpoint.id,
        "SEALRELAY_ENDPOINT_TO_DELETE": endpoints[1].endpoint.id,
    }
    key = await ApiKeyDesk(db, utcnow).create("schemathesis", ApiKeyScope.WRITE, "t")
    url = f"{relay.web_url}/api/v1/openapi.json"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        document = await response.json()
    assert document["openapi"] == "3.1.0"
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        url,
        "--url",
        relay.web_url,
        "--header",
        f"Authorization: Bearer {key.key}",
        # revoking keys is left out: the run would find its own key's id in GET /api-keys
        # and lock itself out (tests/web/test_api.py revokes keys)
        "--exclude-operation-id",
        "revoke_api_key",
        "--checks",
        "all",
        "--exclude-checks",
        "ignored_auth",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "30",
        "--workers",
        "1",
        "--seed",
        "1",
        "--no-color",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # where it keeps its cache
    )
    async with asyncio.timeout(600):
        out, _ = await process.communicate()
    report = out.decode(errors="replace")
    assert process.returncode == 0, report[-20000:]
    assert "Authentication failed" not in report, report[-5000:]
    operations = sum(len(methods) for methods in document["paths"].values())
    assert f"Tested: {operations - 1}" in report, report[-5000:]  # all but revoke_api_key
    # the run reached the desks: the letter was acted on, through the API
    async with db.snapshot() as session:
        types = set(await session.scalars(select(Event.type).where(Event.message_id == summary.id)))
    assert {"letter.released_by_agent", "link.revoked"} <= types, types
