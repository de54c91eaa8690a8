"""`sealrelay user totp`: the secret is shown once, stored for the user, and can be turned off."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
from sqlalchemy import select

from gateway.store.db import Database
from gateway.store.models import Event, User
from tests.cli_runner import sealrelay, sqlite_url, write_config

BOSS = "boss@broker.example"


async def test_totp_on_prints_the_uri_once_and_off_removes_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='[branding]\ncompany_name = "Makler Nord"\n')
    cfg = ("-c", str(config))
    added = await sealrelay("user", "add", BOSS, "--admin", "--password-stdin", *cfg,
                            stdin="a long admin password\n")  # fmt: skip
    assert added.code == 0, added.err
    on = await sealrelay("user", "totp", BOSS, *cfg)
    assert on.code == 0, on.err
    lines = dict(line.split(": ", 1) for line in on.out.splitlines()[1:])
    uri = urlsplit(lines["uri"])
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert uri.path == "/Makler%20Nord:boss%40broker.example"
    assert parse_qs(uri.query)["secret"] == [lines["secret"]]
    db = Database.connect(sqlite_url(config))
    try:
        async with db.transaction() as session:
            user = await session.scalar(select(User).where(User.email == BOSS))
            assert user is not None and user.totp_secret == lines["secret"]
        pyotp.TOTP(lines["secret"]).now()  # a valid base32 secret
        listed = await sealrelay("user", "list", *cfg)
        assert "totp" in listed.out
        off = await sealrelay("user", "totp", BOSS, "--off", *cfg)
        assert off.code == 0, off.err
        assert lines["secret"] not in off.out
        async with db.transaction() as session:
            user = await session.scalar(select(User).where(User.email == BOSS))
            assert user is not None and user.totp_secret is None
            kinds = (await session.scalars(select(Event.type).order_by(Event.id))).all()
        assert kinds[-2:] == ["user.totp_enabled", "user.totp_disabled"]
    finally:
        await db.close()
    unknown = await sealrelay("user", "totp", "nobody@broker.example", *cfg)
    assert unknown.code == 1
    assert unknown.error_line == "Error: no user nobody@broker.example"
