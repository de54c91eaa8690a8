"""`sealrelay apikey create|list|revoke`: the real script, and the keys it makes work."""

from __future__ import annotations

from pathlib import Path

from gateway.console.api_keys import ApiKeyDesk
from gateway.store.db import Database
from gateway.store.models import ApiKeyScope, utcnow
from tests.cli_runner import sealrelay, sqlite_url, write_config


async def test_create_list_revoke(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cli")
    assert (await sealrelay("db", "upgrade", "-c", str(config))).code == 0
    made = await sealrelay("apikey", "create", "CRM Nord", "--scope", "read", "-c", str(config))
    assert made.code == 0, made.err
    key = made.out.strip()
    assert key.startswith("sr_") and len(key) == 46 and "\n" not in key
    assert "shown once" in made.err
    db = Database.connect(sqlite_url(config))
    try:
        desk = ApiKeyDesk(db, utcnow)
        found = await desk.authenticate(key)
        assert found is not None and found.scope == ApiKeyScope.READ and found.name == "CRM Nord"
        listed = await sealrelay("apikey", "list", "-c", str(config))
        assert listed.code == 0
        [line] = listed.out.splitlines()
        assert found.id in line and key[:10] in line and "CRM Nord" in line and "read" in line
        assert key not in listed.out and "REVOKED" not in line
        revoked = await sealrelay("apikey", "revoke", found.id, "-c", str(config))
        assert revoked.code == 0 and found.id in revoked.out
        assert await desk.authenticate(key) is None
        assert "REVOKED" in (await sealrelay("apikey", "list", "-c", str(config))).out
        again = await sealrelay("apikey", "revoke", found.id, "-c", str(config))
        assert again.code == 1 and "already revoked" in again.error_line
    finally:
        await db.close()


async def test_bad_input(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cli")
    nowhere = await sealrelay("apikey", "list", "-c", str(config))
    assert nowhere.code == 1 and "no database" in nowhere.error_line
    assert (await sealrelay("db", "upgrade", "-c", str(config))).code == 0
    scope = await sealrelay("apikey", "create", "x", "--scope", "admin", "-c", str(config))
    assert scope.code == 2 and "admin" in scope.err
    missing = await sealrelay("apikey", "create", "x", "-c", str(config))
    assert missing.code == 2 and "--scope" in missing.err
    blank = await sealrelay("apikey", "create", "  ", "--scope", "read", "-c", str(config))
    assert blank.code == 1 and "name" in blank.error_line
    unknown = await sealrelay("apikey", "revoke", "nosuchkey", "-c", str(config))
    assert unknown.code == 1 and "no API key nosuchkey" in unknown.error_line
    assert (await sealrelay("apikey", "list", "-c", str(config))).out.strip() == "no API keys"
