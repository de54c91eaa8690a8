"""examples/postfix-content-filter.toml as IT uses it with docs/postfix.md: with only its
ports and paths changed, `check-config` passes, `serve` starts, and Postfix's hand-over on
loopback (no AUTH, no TLS) leaves DKIM-signed through the re-injection port."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import dkim as dkimpy
import pytest

from gateway.mail.dkim import DkimKey
from tests.cli_runner import sealrelay, serving
from tests.conftest import dkim_dns
from tests.support import Sink, free_port, wait_for_port

EXAMPLE = Path(__file__).parents[2] / "examples" / "postfix-content-filter.toml"
AGENT = "anna@broker.example"


def example_config(directory: Path, smtp_port: int, web_port: int, sink_port: int) -> Path:
    text = (
        EXAMPLE.read_text()
        .replace("127.0.0.1:10025", f"127.0.0.1:{smtp_port}")
        .replace("127.0.0.1:10026", f"127.0.0.1:{sink_port}")
        .replace("127.0.0.1:8080", f"127.0.0.1:{web_port}")
        .replace('"var/', f'"{directory}/var/')
        .replace("sqlite+aiosqlite:///var/", f"sqlite+aiosqlite:///{directory}/var/")
    )
    assert text.count(str(directory)) == 3  # database, blobs, DKIM key
    config = directory / "sealrelay.toml"
    config.write_text(text + f'\n[loop]\nkey_file = "{directory}/var/loop.key"\n')
    return config


def hand_over(port: int) -> None:
    """What Postfix's `sealrelay` transport does: SMTP on loopback, no login."""
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.sendmail(
            AGENT,
            ["prospect@example.com"],
            f"From: Anna <{AGENT}>\r\nTo: prospect@example.com\r\nSubject: Expos\xe9\r\n"
            "Message-ID: <pf-1@broker.example>\r\n\r\nGuten Tag\r\n".encode(),
        )


@pytest.mark.slow
async def test_the_content_filter_example_starts_and_relays_without_logins(
    tmp_path: Path,
) -> None:
    sink = await Sink().start()
    smtp_port, web_port = free_port(), free_port()
    config = example_config(tmp_path, smtp_port, web_port, sink.port)
    key = tmp_path / "var" / "dkim" / "broker.example.s2026.pem"
    made = await sealrelay(
        "dkim", "keygen", "--domain", "broker.example", "--selector", "s2026", "--out", str(key)
    )
    assert made.code == 0, made.err
    checked = await sealrelay("check-config", "--config", str(config))
    assert checked.code == 0, checked.err
    assert "agents could not log in" not in checked.err
    log_path = tmp_path / "serve.log"
    try:
        with log_path.open("wb") as log:
            async with serving(config, log) as process:
                await wait_for_port(smtp_port, process)
                await asyncio.to_thread(hand_over, smtp_port)
                [copy] = await sink.expect(1)
        assert process.returncode == 0, log_path.read_text()
    finally:
        await sink.stop()
    assert copy.rcpt_tos == ["prospect@example.com"]
    signer = DkimKey.load("broker.example", "s2026", key)
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(signer))
    assert b"(trusted client Postfix, entry postfix)" in copy.data
