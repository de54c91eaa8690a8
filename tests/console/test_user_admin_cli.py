"""`sealrelay user delete`, `user alias` and `user passwd`: the real script, each call a new
process."""

from __future__ import annotations

from pathlib import Path

from tests.cli_runner import sealrelay, write_config

ANNA = "anna@broker.example"


async def test_a_user_is_deleted_only_when_confirmed_and_aliases_come_and_go(
    tmp_path: Path,
) -> None:
    cfg = ("-c", str(write_config(tmp_path / "cli")))
    assert (await sealrelay("user", "add", ANNA, *cfg)).code == 0

    added = await sealrelay("user", "alias", "add", ANNA, "Desk@Broker.Example", *cfg)
    assert (added.code, added.out) == (0, f"{ANNA} may send from: desk@broker.example\n")
    taken = await sealrelay("user", "alias", "add", ANNA, "desk@broker.example", *cfg)
    assert taken.code == 1 and taken.error_line == "Error: desk@broker.example is already an alias"
    listed = await sealrelay("user", "list", *cfg)
    assert listed.out == f"{ANNA}  [agent]  aliases: desk@broker.example\n"
    removed = await sealrelay("user", "alias", "remove", ANNA, "desk@broker.example", *cfg)
    assert (removed.code, removed.out) == (0, f"{ANNA} may send from: no alias\n")

    reset = await sealrelay("user", "passwd", ANNA, *cfg)
    assert reset.code == 0 and "password: " in reset.out

    declined = await sealrelay("user", "delete", ANNA, *cfg, stdin="n\n")
    assert declined.code == 1 and "Aborted" in declined.err
    assert (await sealrelay("user", "list", *cfg)).out == f"{ANNA}  [agent]\n"
    deleted = await sealrelay("user", "delete", ANNA, *cfg, stdin="y\n")
    assert deleted.code == 0 and deleted.out.endswith(f"deleted {ANNA}\n")
    assert (
        await sealrelay("user", "list", *cfg)
    ).out == "no users; add one with: sealrelay user add EMAIL\n"
    again = await sealrelay("user", "delete", ANNA, "--yes", *cfg)
    assert again.code == 1 and again.error_line == f"Error: no user {ANNA}"
    readd = await sealrelay("user", "add", ANNA, *cfg)
    assert readd.code == 1 and "reserved" in readd.error_line
