"""A private OpenDKIM signing filter: what a Postfix that signs its mail runs beside it.

bench/compare.py puts one in front of its Postfix (`--postfix-dkim`), so that Postfix pays for
a DKIM signature as sealrelay does; tests/bench/test_postfix_dkim.py proves that this Postfix
signs what it relays. It listens on a loopback port as a milter and signs, relaxed/relaxed,
the mail whose From is in `domain` coming from 127.0.0.1, with a 2048-bit key made here.
It runs in the foreground (`opendkim -f`), so stopping it is stopping one child process.
When OpenDKIM is not installed, OpenDkimMissing says how to install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from gateway.mail import dkim
from tests.support import free_port, wait_for_port

SELECTOR = "postfix"
STOP_TIMEOUT = 10.0


class OpenDkimMissing(AssertionError):
    """OpenDKIM is not installed: what needs it fails (never skips), naming the package."""


def opendkim_command() -> str:
    path = shutil.which("opendkim") or next(
        (str(p) for p in (Path("/usr/sbin/opendkim"),) if p.exists()), None
    )
    if path is None:
        raise OpenDkimMissing(
            "opendkim is missing: apt-get install -y opendkim"
            " (scripts/with-test-services installs it)"
        )
    return path


@dataclass
class OpenDkim:
    """One OpenDKIM milter in `directory`; `milter` is what Postfix's smtpd_milters names."""

    directory: Path
    domain: str
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def milter(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    @property
    def key_file(self) -> Path:
        return self.directory / "opendkim.pem"

    def signing_key(self) -> dkim.DkimKey:
        """The key it signs with, as sealrelay would load it (for tests' DNS answers)."""
        return dkim.DkimKey.load(self.domain, SELECTOR, self.key_file)

    def write_config(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.key_file.exists():
            dkim.write_private_key(dkim.generate_private_key(), self.key_file)
        config = self.directory / "opendkim.conf"
        config.write_text(
            "\n".join(
                [
                    "Syslog no",
                    "Background no",
                    "Mode s",
                    f"Domain {self.domain}",
                    f"Selector {SELECTOR}",
                    f"KeyFile {self.key_file}",
                    "RequireSafeKeys false",  # a throw-away key, under the world-writable /tmp
                    "Canonicalization relaxed/relaxed",
                    "OversignHeaders From",
                    f"Socket inet:{self.port}@127.0.0.1",
                    "InternalHosts 127.0.0.1",
                    f"PidFile {self.directory / 'opendkim.pid'}",
                ]
            )
            + "\n",
            encoding="utf-8",
        )
        return config

    async def start(self) -> None:
        command = opendkim_command()
        config = self.write_config()
        log = (self.directory / "opendkim.log").open("wb")
        with log:
            self.process = await asyncio.create_subprocess_exec(
                command,
                "-f",
                "-x",
                str(config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        try:
            await wait_for_port(self.port, self.process, "opendkim")
        except AssertionError as exc:
            await self.stop()
            raise AssertionError(f"{exc}:\n{self.log()}") from None
        except BaseException:
            await self.stop()
            raise

    def log(self) -> str:
        path = self.directory / "opendkim.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # it died already, unreaped
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
