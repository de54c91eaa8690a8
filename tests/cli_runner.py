"""The installed `sealrelay` script run as an admin runs it, with a config written for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tests.support import BRANDING_TOML, LETTER_VALUES_TOML

SEALRELAY = Path(sys.executable).with_name("sealrelay")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one line an admin sees when a command fails."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        return lines[0]


async def sealrelay(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Run:
    """Run the installed console script; the environment carries no SEALRELAY_ settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEALRELAY_")}
    environ.update(env or {})
    process = await asyncio.create_subprocess_exec(
        str(SEALRELAY),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
        cwd=cwd,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def serving(config: Path, log: BinaryIO) -> AsyncIterator[asyncio.subprocess.Process]:
    """`sealrelay serve` as a process writing to `log`; on the way out SIGTERM, and its exit
    awaited (its code is then the process's returncode)."""
    process = await asyncio.create_subprocess_exec(
        SEALRELAY, "serve", "--config", str(config), stdout=log, stderr=log
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.wait()


def write_config(
    directory: Path, name: str = "sealrelay.toml", extra: str = "", *, letter: bool = True
) -> Path:
    """A config in `directory`; the letter values `serve` needs unless `extra` sets
    [branding] or [letter] itself (that section is then its own) or `letter` is False."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    letter_values = "".join(
        toml
        for section, toml in (("[branding]", BRANDING_TOML), ("[letter]", LETTER_VALUES_TOML))
        if letter and section not in extra
    )
    path.write_text(
        "[server]\n"
        'hostname = "relay.broker.example"\n'
        "[database]\n"
        f'url = "sqlite+aiosqlite:///{directory}/relay.db"\n'
        "[storage]\n"
        f'path = "{directory}/blobs"\n' + extra + letter_values,
        encoding="utf-8",
    )
    return path


def sqlite_url(config: Path) -> str:
    return f"sqlite+aiosqlite:///{config.parent}/relay.db"
