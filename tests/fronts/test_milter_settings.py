"""`[milter]` as an admin meets it: bad values stop start-up naming the key, `sealrelay serve`
opens the milter listener (and says when its address is taken)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.cli_runner import SEALRELAY, sealrelay, write_config
from tests.fronts.milter_client import MilterClient
from tests.support import free_port, wait_for_port


def config(tmp_path: Path, milter: str) -> Path:
    return write_config(
        tmp_path,
        extra=(
            f"[smtp]\nlisten = ['127.0.0.1:{free_port()}']\n"
            "allow_plaintext_auth_on_loopback = true\n"
            f"[web]\nlisten = '127.0.0.1:{free_port()}'\n"
            f"[upstream]\nurl = 'capture:{tmp_path / 'outbox'}'\n"
            f"[milter]\n{milter}"
        ),
    )


@pytest.mark.parametrize(
    ("milter", "error"),
    [
        ("listen = '8891'\n", "milter.listen: '8891' is not HOST:PORT"),
        (
            "listen = '127.0.0.1:8891'\nallow_from = []\n",
            "milter.allow_from: give at least one network (the MTA's address)",
        ),
        (
            "allow_from = ['postfix.example']\n",
            "milter.allow_from: 'postfix.example' is not an IP address or network",
        ),
        ("timeout = 0\n", "milter.timeout: Input should be greater than 0"),
    ],
    ids=["listen", "allow-from-empty", "allow-from-name", "timeout"],
)
async def test_bad_milter_settings_stop_start_up_naming_the_key(
    tmp_path: Path, milter: str, error: str
) -> None:
    run = await sealrelay("check-config", "--config", str(config(tmp_path, milter)))
    assert run.code == 1
    assert run.err.strip().splitlines()[-1] == f"Error: config error: {error}"


async def test_serve_names_a_milter_address_that_is_taken(tmp_path: Path) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        run = await sealrelay(
            "serve", "--config", str(config(tmp_path, f"listen = '127.0.0.1:{port}'\n"))
        )
    finally:
        taken.close()
        await taken.wait_closed()
    assert run.code == 1
    assert run.error_line == (
        f"Error: config error: milter.listen: 127.0.0.1:{port}: cannot listen:"
        " Address already in use"
    )


async def test_serve_opens_the_milter_listener_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    path = config(tmp_path, f"listen = '127.0.0.1:{port}'\n")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            SEALRELAY, "serve", "--config", str(path), stdout=log, stderr=log
        )
        try:
            await wait_for_port(port, process)
            client = await MilterClient.open(port)
            version, *_ = await client.negotiate()
            assert version == 6
            await client.close()
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(40):
                code = await process.wait()
    assert code == 0, log_path.read_text()
    assert f"milter front listening on 127.0.0.1:{port}" in log_path.read_text()
