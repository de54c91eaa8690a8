"""`sealrelay user notify` and `user list`: the real script, each call a new process."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.cli_runner import sealrelay, write_config

ANNA = "anna@broker.example"
BEN = "ben@broker.example"


async def test_an_admin_chooses_an_agents_notices(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cli")
    cfg = ("-c", str(config))
    added = await asyncio.gather(
        sealrelay("user", "add", ANNA, *cfg), sealrelay("user", "add", BEN, *cfg)
    )
    assert [run.code for run in added] == [0, 0], [run.err for run in added]

    shown = await sealrelay("user", "notify", ANNA, *cfg)
    assert (shown.code, shown.out) == (
        0,
        f"{ANNA}: first-download on, expiry-warning on, consent confirmation always\n",
    )
    changed = await sealrelay("user", "notify", ANNA, "--first-download", "off", *cfg)
    assert (changed.code, changed.out) == (
        0,
        f"{ANNA}: first-download off, expiry-warning on, consent confirmation always\n",
    )
    listed = await sealrelay("user", "list", *cfg)
    assert listed.out == f"{ANNA}  [agent no-first-download]\n{BEN}  [agent]\n"

    again = await sealrelay(
        "user", "notify", ANNA, "--first-download", "on", "--expiry-warning", "off", *cfg
    )
    assert again.out == (
        f"{ANNA}: first-download on, expiry-warning off, consent confirmation always\n"
    )
    listed = await sealrelay("user", "list", *cfg)
    assert listed.out == f"{ANNA}  [agent no-expiry-warning]\n{BEN}  [agent]\n"


async def test_bad_input_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cli")
    cfg = ("-c", str(config))
    assert (await sealrelay("user", "add", ANNA, *cfg)).code == 0
    unknown, bad_value = await asyncio.gather(
        sealrelay("user", "notify", "nobody@broker.example", "--first-download", "off", *cfg),
        sealrelay("user", "notify", ANNA, "--first-download", "maybe", *cfg),
    )
    assert unknown.code == 1
    assert unknown.error_line == "Error: no user nobody@broker.example"
    assert bad_value.code == 2 and "'maybe' is not one of 'on', 'off'" in bad_value.err
    listed = await sealrelay("user", "list", *cfg)
    assert listed.out == f"{ANNA}  [agent]\n"
