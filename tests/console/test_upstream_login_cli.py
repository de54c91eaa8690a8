"""`sealrelay user upstream-login`: the real script, each call a new process."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.cli_runner import sealrelay, write_config

ANNA = "anna@broker.example"
SECRET = "hoster secret 7"


def stored(config: Path) -> str:
    """Every login row and journal event as text, to look for the secret in."""
    with sqlite3.connect(config.parent / "relay.db") as db:
        rows = db.execute("SELECT url, username, ciphertext FROM agent_logins").fetchall()
        events = db.execute("SELECT type, data FROM events").fetchall()
    return repr(rows) + repr(events)


async def test_a_login_is_set_shown_and_cleared_without_the_secret_showing(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "cli")
    cfg = ("-c", str(config))
    assert (await sealrelay("user", "add", ANNA, *cfg)).code == 0
    url = ("--url", "smtp://mail.webhoster.example:587", "--username", "anna@webhoster.example")

    bad = await sealrelay(
        "user", "upstream-login", "set", ANNA, "--url", "http://x", "--username", "u",
        "--password-stdin", *cfg, stdin=f"{SECRET}\n",
    )  # fmt: skip
    assert bad.code == 1
    assert bad.error_line == "Error: the URL must be smtp://HOST[:PORT] or smtps://HOST[:PORT]"
    assert "upstream_login" not in stored(config)

    done = await sealrelay(
        "user", "upstream-login", "set", ANNA, *url, "--password-stdin", *cfg, stdin=f"{SECRET}\n"
    )
    assert done.code == 0, done.err
    assert done.out == (
        f"{ANNA} now sends through anna@webhoster.example at smtp://mail.webhoster.example:587\n"
    )
    key = tmp_path / "cli" / "agent-logins.key"
    assert key.stat().st_mode & 0o777 == 0o600
    shown = await sealrelay("user", "upstream-login", "show", ANNA, *cfg)
    assert shown.code == 0 and shown.out.startswith(
        f"{ANNA}: anna@webhoster.example at smtp://mail.webhoster.example:587, set "
    )
    text = stored(config)
    assert "user.upstream_login_set" in text and SECRET not in text
    for run in (bad, done, shown):
        assert SECRET not in run.out + run.err

    old_key = key.read_bytes()
    rotated = await sealrelay("user", "upstream-login", "rotate-key", *cfg)
    assert rotated.code == 0, rotated.err
    assert rotated.out.startswith(f"1 upstream logins sealed with the new key {key}; back it up")
    assert key.read_bytes() != old_key and (key.parent / "agent-logins.key.old").exists()
    assert (
        "anna@webhoster.example"
        in (await sealrelay("user", "upstream-login", "show", ANNA, *cfg)).out
    )

    cleared = await sealrelay("user", "upstream-login", "clear", ANNA, *cfg)
    assert cleared.out == f"{ANNA}: upstream login removed\n"
    again = await sealrelay("user", "upstream-login", "clear", ANNA, *cfg)
    assert again.out == f"{ANNA} had no upstream login\n"
    none = await sealrelay("user", "upstream-login", "show", ANNA, *cfg)
    assert none.out == f"{ANNA}: no upstream login (mail leaves the default way)\n"
    unknown = await sealrelay("user", "upstream-login", "show", "nobody@broker.example", *cfg)
    assert unknown.code == 1 and unknown.error_line == "Error: no user nobody@broker.example"


async def test_a_lost_key_is_named_and_no_new_key_replaces_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "cli", extra=f'[secrets]\nkey_file = "{tmp_path}/keys/logins.key"\n'
    )
    cfg = ("-c", str(config))
    assert (await sealrelay("user", "add", ANNA, *cfg)).code == 0
    args = ("--url", "smtps://mail.webhoster.example", "--username", "anna", "--password-stdin")
    first = await sealrelay("user", "upstream-login", "set", ANNA, *args, *cfg, stdin=f"{SECRET}\n")
    assert first.code == 0, first.err
    (tmp_path / "keys" / "logins.key").unlink()

    lost = await sealrelay("user", "upstream-login", "set", ANNA, *args, *cfg, stdin="new one 8\n")
    assert lost.code == 1
    assert f"the key file {tmp_path}/keys/logins.key ([secrets] key_file) is missing" in lost.err
    assert not (tmp_path / "keys" / "logins.key").exists()
