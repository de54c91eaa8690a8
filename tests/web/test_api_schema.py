"""schemathesis against the OpenAPI document a running relay serves, with a write key.

Every operation is called with generated valid and invalid input; the answers must match the
document (status codes, media types, schemas) and never be a server error.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from gateway.console.api_keys import ApiKeyDesk
from gateway.store.models import ApiKeyScope, utcnow
from tests.conftest import Harness, make_message

SCHEMATHESIS = Path(sys.executable).with_name("st")


async def test_the_api_keeps_its_openapi_document(relay: Harness, tmp_path: Path) -> None:
    await relay.send(make_message())  # a message and events to list
    key = await ApiKeyDesk(relay.relay.db, utcnow).create("schemathesis", ApiKeyScope.WRITE, "t")
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
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # where it keeps its cache
    )
    async with asyncio.timeout(600):
        out, _ = await process.communicate()
    report = out.decode(errors="replace")
    assert process.returncode == 0, report[-20000:]
    assert "Authentication failed" not in report, report[-5000:]
