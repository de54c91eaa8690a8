"""A private Postfix: its own directories, loopback listeners, no local delivery.

The core that both the tests (through tests/postfix_instance.py, which turns a missing Postfix
into a failed test) and bench/compare.py (Postfix beside sealrelay on the same box) use; it
needs no pytest.

    async with postfix_instance(directory, relayhost=f"[127.0.0.1]:{sink.port}") as postfix:
        ... send to 127.0.0.1:{postfix.smtpd_port} ...
        await postfix.wait_queue_empty()

The instance has its own config_directory, queue_directory and data_directory. Postfix's
daemons run as the postfix user and must reach them, which pytest's tmp_path (under a 0700
directory that other pytest runs reset) does not allow: so they live in a fresh directory in
/tmp, `directory/instance` is a symbolic link to it while the instance runs, and on the way
out the log and the configuration are copied there and the rest is removed. Its master runs
in the foreground (`postfix start-fg`) under a child process, and leaving the context (also
when the caller fails) stops it and waits until it is gone. It works as root (Postfix's own
commands accept a private `-c` directory from root without it being listed in
alternate_config_directories). When Postfix is not installed, PostfixMissing says how to
install it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port, run_process

SBIN = Path("/usr/sbin")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 30.0

# Everything but local delivery (local/virtual/lmtp): mail for nobody here, so nothing is
# delivered on this machine. chroot "n" everywhere: a chroot would need copies of /etc files.
MASTER_CF = """\
{smtpd_listener} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixMissing(AssertionError):
    """Postfix is not installed: what needs it fails (never skips), naming the package."""


def postfix_command(name: str) -> str:
    """The full path of one of Postfix's commands; PostfixMissing when it is not installed."""
    path = shutil.which(name) or (str(SBIN / name) if (SBIN / name).exists() else None)
    if path is None:
        raise PostfixMissing(
            f"Postfix is required here and {name} is missing: apt-get install -y postfix"
            " (scripts/with-test-services installs it)"
        )
    return path


@dataclass
class PostfixInstance:
    """One private Postfix: its directories, its smtpd port, and the commands to ask it."""

    directory: Path
    relayhost: str = ""
    main_cf: Sequence[str] = ()
    master_cf: Sequence[str] = ()
    smtpd_options: Sequence[str] = ()
    smtpd_port: int = field(default_factory=free_port)
    hostname: str = "postfix.test.example"
    logins: Mapping[str, str] = field(default_factory=dict)  # SMTP AUTH: address -> password
    _master: asyncio.subprocess.Process | None = None
    _root: Path | None = None

    @property
    def link(self) -> Path:
        """`directory/instance`: the tree while it runs, its log and configuration after."""
        return self.directory / "instance"

    @property
    def root(self) -> Path:
        """The instance's tree (in /tmp, reachable by the postfix user)."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="sealrelay-postfix-"))
            self._root.chmod(0o755)
            self.directory.mkdir(parents=True, exist_ok=True)
            self.link.symlink_to(self._root, target_is_directory=True)
        return self._root

    @property
    def config_directory(self) -> Path:
        return self.root / "etc"

    @property
    def queue_directory(self) -> Path:
        return self.root / "spool"

    @property
    def data_directory(self) -> Path:
        return self.root / "lib"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def log(self) -> str:
        """Postfix's own log so far (what a failed test shows)."""
        path = self.maillog if self._root is not None else self.link / "maillog"
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def write_config(self) -> None:
        # `postfix check` makes the queue's subdirectories and the data directory, owned right
        for path in (self.config_directory, self.queue_directory):
            path.mkdir(parents=True, exist_ok=True)
        main = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_directory}",
            f"data_directory = {self.data_directory}",
            f"maillog_file_prefixes = {self.root}",
            f"maillog_file = {self.maillog}",
            f"myhostname = {self.hostname}",
            "mydomain = test.example",
            "myorigin = $myhostname",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mydestination =",
            "mynetworks = 127.0.0.0/8",
            "local_recipient_maps =",
            "local_transport = error:5.1.1 local delivery is disabled here",
            "alias_maps =",
            "alias_database =",
            f"relayhost = {self.relayhost}",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtp_tls_security_level = none",
            "smtpd_tls_security_level = none",
            "smtp_dns_support_level = disabled",
            "biff = no",
            "append_dot_mydomain = no",
            "readme_directory = no",
            # quick retries: a test waits seconds, not Postfix's default minutes
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            *(self.sasl_logins() if self.logins else []),
            *self.main_cf,
        ]
        # a later line takes an earlier one's place: Postfix warns of each override, on the
        # output of commands whose output is read (postqueue -j)
        lines = {line.partition("=")[0].strip(): line for line in main}
        text = "\n".join(lines.values()) + "\n"
        (self.config_directory / "main.cf").write_text(text, encoding="utf-8")
        smtpd, rest = MASTER_CF.format(smtpd_listener=f"127.0.0.1:{self.smtpd_port}").split("\n", 1)
        options = "".join(f"  -o {option}\n" for option in self.smtpd_options)
        (self.config_directory / "master.cf").write_text(
            f"{smtpd}\n{options}{rest}" + "".join(f"{line}\n" for line in self.master_cf),
            encoding="utf-8",
        )

    def sasl_logins(self) -> list[str]:
        """main.cf lines for SMTP AUTH (Cyrus SASL with a sasldb of its own holding `logins`),
        so that a milter sees `{auth_authen}` as at a site whose users log in. Debian's
        Postfix reads `smtpd_sasl_path = smtpd` as config_directory/sasl/smtpd.conf."""
        saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
        if not Path(saslpasswd2).exists():
            raise AssertionError("saslpasswd2 is missing: apt-get install -y sasl2-bin")
        directory = self.config_directory / "sasl"
        directory.mkdir(parents=True, exist_ok=True)
        database = directory / "sasldb2"
        for login, password in self.logins.items():
            user, _, realm = login.partition("@")
            subprocess.run(
                [saslpasswd2, "-c", "-p", "-f", str(database), "-u", realm, user],
                input=password.encode(),
                check=True,
                timeout=COMMAND_TIMEOUT,
            )
        shutil.chown(database, user="postfix")
        (directory / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {database}\n"
            "mech_list: PLAIN LOGIN\n",
            encoding="utf-8",
        )
        return [
            "smtpd_sasl_auth_enable = yes",
            "smtpd_sasl_type = cyrus",
            "smtpd_sasl_path = smtpd",
            "smtpd_sasl_security_options = noanonymous",
        ]

    async def run(self, command: str, *args: str) -> str:
        """One of Postfix's commands against this instance; its output, or an AssertionError."""
        status, text = await run_process(
            postfix_command(command),
            "-c",
            str(self.config_directory),
            *args,
            timeout=COMMAND_TIMEOUT,
        )
        if status != 0:
            raise AssertionError(
                f"{command} {' '.join(args)} exited with {status}: {text}\n{self.log()}"
            )
        return text

    async def start(self) -> None:
        postfix = postfix_command("postfix")
        self.write_config()
        await self.run("postfix", "check")
        self._master = await asyncio.create_subprocess_exec(
            postfix,
            "-c",
            str(self.config_directory),
            "start-fg",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await self.wait_smtpd()
        except BaseException:
            await self.stop()
            raise

    async def wait_smtpd(self, timeout: float = START_TIMEOUT) -> None:
        """Until the smtpd answers with its 220 greeting; at once an error if master exited."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._master is None or self._master.returncode is not None:
                        raise AssertionError("Postfix's master exited while starting")
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", self.smtpd_port)
                    except OSError:
                        await asyncio.sleep(0.1)
                        continue
                    try:
                        greeting = await reader.readline()
                        writer.write(b"QUIT\r\n")
                        await writer.drain()
                    finally:
                        writer.close()
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
                    if greeting.startswith(b"220"):
                        return
                    raise AssertionError(f"Postfix's smtpd greeted with {greeting!r}")
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"Postfix did not start: {exc!r}\n{self.log()}") from exc

    async def reconfigure(
        self, *, main_cf: Sequence[str] | None = None, master_cf: Sequence[str] | None = None
    ) -> None:
        """Replace the extra main.cf or master.cf lines and `postfix reload` (listeners the new
        master.cf drops close, new ones open); waits until the smtpd answers again."""
        if main_cf is not None:
            self.main_cf = main_cf
        if master_cf is not None:
            self.master_cf = master_cf
        self.write_config()
        await self.run("postfix", "reload")
        await self.wait_smtpd()

    async def stop(self) -> None:
        """`postfix stop`, then wait (bounded) for the foreground master to exit.

        master makes a session of its own, so it is stopped by its pid file, not as our child's
        process group; if it does not go in time, its whole process group is killed.
        """
        master, self._master = self._master, None
        if master is None:
            return
        with contextlib.suppress(AssertionError, TimeoutError):
            await self.run("postfix", "stop")
        try:
            await asyncio.wait_for(master.wait(), STOP_TIMEOUT)
        except TimeoutError:
            self.kill_by_pid_file()
            with contextlib.suppress(ProcessLookupError):
                master.kill()
            await master.wait()

    def remove(self) -> None:
        """After stop: keep the log and the configuration in `directory`, remove the tree."""
        root, self._root = self._root, None
        if root is None:
            return
        self.link.unlink()
        self.link.mkdir()
        for kept in (root / "maillog", root / "etc" / "main.cf", root / "etc" / "master.cf"):
            if kept.exists():
                shutil.copy(kept, self.link / kept.name)
        shutil.rmtree(root, ignore_errors=True)

    def kill_by_pid_file(self) -> None:
        try:
            pid = int((self.queue_directory / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    async def queue(self) -> list[dict[str, object]]:
        """The queue as `postqueue -j` lists it: one dict per message (queue_id, recipients...).
        showq reads the queue directories one after another, so a message the queue manager
        moves from one to the next meanwhile can be listed in both: it counts once, as last
        listed."""
        out = await self.run("postqueue", "-j")
        listed: dict[object, dict[str, object]] = {}
        for line in out.splitlines():
            if line.strip():
                entry = json.loads(line)
                listed[entry["queue_id"]] = entry
        return list(listed.values())

    async def flush(self) -> None:
        """Ask Postfix to try every deferred message now (`postqueue -f`)."""
        await self.run("postqueue", "-f")

    async def wait_deferred(self, count: int = 1, timeout: float = 30) -> list[dict[str, object]]:
        """Until `count` messages wait in the queue, each recipient with the reason Postfix
        keeps for the delay (the failed attempt's error); returns the queue then."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    queued = await self.queue()
                    if len(queued) >= count and all(map(_deferred, queued)):
                        return queued
                    await asyncio.sleep(0.1)
        except TimeoutError as exc:
            raise AssertionError(
                f"{count} deferred message(s) expected after {timeout}s: {await self.queue()}"
                f"\n{self.log()}"
            ) from exc

    async def wait_queue_empty(self, timeout: float = 60) -> None:
        """Until nothing is queued any more (delivered or bounced); bounded by `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                while await self.queue():
                    await asyncio.sleep(0.2)
        except TimeoutError as exc:
            raise AssertionError(
                f"Postfix's queue is not empty after {timeout}s: {await self.queue()}\n{self.log()}"
            ) from exc


def delay_reasons(message: dict[str, object]) -> list[str]:
    """The delay reason of each recipient of one `queue()` entry ("" while none)."""
    recipients = message.get("recipients")
    assert isinstance(recipients, list)
    return [str(r.get("delay_reason", "")) for r in recipients]


def _deferred(message: dict[str, object]) -> bool:
    reasons = delay_reasons(message)
    return bool(reasons) and all(reasons)


@contextlib.asynccontextmanager
async def postfix_instance(
    directory: Path,
    *,
    relayhost: str = "",
    main_cf: Sequence[str] = (),
    master_cf: Sequence[str] = (),
    smtpd_options: Sequence[str] = (),
    smtpd_port: int | None = None,
    logins: Mapping[str, str] | None = None,
) -> AsyncIterator[PostfixInstance]:
    """A started private Postfix in `directory`, stopped on the way out.

    `relayhost` is where it sends everything (e.g. "[127.0.0.1]:2525"); `main_cf` lines are
    appended to main.cf (later lines win), `master_cf` lines to master.cf (more services),
    `smtpd_options` become `-o NAME=VALUE` lines of the smtpd listener on `smtpd_port`;
    `logins` (address -> password) turn on SMTP AUTH with those logins.
    """
    instance = PostfixInstance(
        directory,
        relayhost=relayhost,
        main_cf=main_cf,
        master_cf=master_cf,
        smtpd_options=smtpd_options,
        smtpd_port=smtpd_port or free_port(),
        logins=logins or {},
    )
    try:
        await instance.start()
        yield instance
    finally:
        await instance.stop()
        instance.remove()
