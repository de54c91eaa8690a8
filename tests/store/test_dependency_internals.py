"""The private names of aiosmtpd, aiosmtplib and asyncio that sealrelay relies on.

They are not part of any public API, so a release may rename them without notice; the code
would then fail at run time, on a client's mail. Both libraries have an upper bound in
pyproject.toml; before raising it, this test says which name went and who used it.
"""

from __future__ import annotations

import asyncio
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Session
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"

# (owner, name, who relies on it)
CLASS_NAMES: list[tuple[type, str, str]] = [
    (SMTP, "_reset_timeout", "gateway/fronts/smtp.py: DATA restarts the silence timer per piece"),
    (SMTP, "_timeout_cb", "gateway/fronts/smtp.py: a silent client gets 421 before the close"),
    (SMTP, "_set_post_data_state", "gateway/fronts/smtp.py: our smtp_DATA resets the envelope"),
    (SMTP, "_call_handler_hook", "gateway/fronts/smtp.py: our smtp_DATA calls handle_DATA"),
    (SMTP, "smtp_DATA", "gateway/fronts/smtp.py: replaced by the chunked DATA reader"),
    (SMTP, "connection_made", "gateway/fronts/smtp.py: the connection gate"),
    (SMTP, "connection_lost", "gateway/fronts/smtp.py: the connection gate"),
    (SMTP, "eof_received", "gateway/fronts/smtp.py: refused connections"),
    (SMTP, "data_received", "gateway/fronts/smtp.py: the silence timer during DATA"),
    (SMTP, "challenge_auth", "gateway/fronts/smtp.py: AUTH PLAIN and LOGIN"),
    (SMTP, "check_helo_needed", "gateway/fronts/smtp.py: our smtp_DATA"),
    (SMTP, "_getaddr", "gateway/fronts/smtp.py: plain MAIL and RCPT paths read quickly"),
    (SMTP, "check_auth_needed", "gateway/fronts/smtp.py: our smtp_DATA"),
    (SMTP, "AuthLoginUsernameChallenge", "gateway/fronts/smtp.py: AUTH LOGIN"),
    (SMTP, "AuthLoginPasswordChallenge", "gateway/fronts/smtp.py: AUTH LOGIN"),
    (aiosmtplib.SMTP, "execute_command", "gateway/outbound/upstream.py: TLS answered or not"),
]

# names an instance has once a client is connected
SERVER_NAMES: list[tuple[str, str]] = [
    ("_reader", "gateway/fronts/smtp.py: the chunked DATA reader reads the stream itself"),
    ("_timeout_handle", "gateway/fronts/smtp.py: the timer stands still while the pipeline works"),
    ("_timeout_duration", "gateway/fronts/smtp.py: the timeout's log line"),
    ("transport", "gateway/fronts/smtp.py: TLS detection, refusals"),
    ("session", "gateway/fronts/smtp.py: the client's address and login"),
    ("envelope", "gateway/fronts/smtp.py: our smtp_DATA"),
    ("data_size_limit", "gateway/fronts/smtp.py: our smtp_DATA"),
    ("line_length_limit", "gateway/fronts/smtp.py: our smtp_DATA"),
    (
        "_auth_methods",
        "gateway/fronts/smtp.py: the handler's auth_PLAIN/auth_LOGIN replace aiosmtpd's",
    ),
]


def gone(owner: Any, name: str, user: str) -> str:
    module = getattr(owner, "__module__", type(owner).__module__)
    package = module.split(".")[0]
    what = getattr(owner, "__qualname__", type(owner).__qualname__)
    return (
        f"{module}.{what} has no `{name}` any more ({package} {version(package)} installed)."
        f" {user} relies on it: adapt that code before raising {package}'s upper bound in"
        " pyproject.toml."
    )


@pytest.mark.parametrize(
    ("owner", "name", "user"), CLASS_NAMES, ids=[f"{o.__name__}.{n}" for o, n, _ in CLASS_NAMES]
)
def test_class_names_we_rely_on_exist(owner: type, name: str, user: str) -> None:
    assert hasattr(owner, name), gone(owner, name, user)


async def test_names_a_connected_aiosmtpd_session_has() -> None:
    protocols: list[SMTP] = []

    def make() -> SMTP:
        protocol = SMTP(object(), hostname="internals.test")
        protocols.append(protocol)
        return protocol

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), 15)).startswith(b"220 ")
        [protocol] = protocols
        missing = [gone(protocol, n, user) for n, user in SERVER_NAMES if not hasattr(protocol, n)]
        assert not missing, "\n".join(missing)
        assert isinstance(protocol._timeout_handle, asyncio.TimerHandle)
        assert isinstance(protocol._reader, asyncio.StreamReader)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_names_aiosmtplib_objects_have() -> None:
    client = aiosmtplib.SMTP()
    user = "gateway/outbound/smtp_connection.py: takes the transport over after the handshake"
    for name in ("transport", "protocol", "esmtp_extensions"):
        assert hasattr(client, name), gone(client, name, user)


async def test_names_of_asyncio_and_aiosmtpd_values() -> None:
    reader = asyncio.StreamReader()
    user = "gateway/fronts/data_reader.py: widens the reader's line limit for DATA"
    assert isinstance(getattr(reader, "_limit", None), int), gone(reader, "_limit", user)
    result = AuthResult(success=False, handled=True, message="x", auth_data=None)
    for field in ("success", "handled", "auth_data", "message"):
        assert hasattr(result, field), gone(result, field, "gateway/fronts/smtp.py")
    session = Session(asyncio.get_running_loop())
    for name in ("authenticated", "peer", "host_name", "auth_data"):
        assert hasattr(session, name), gone(session, name, "gateway/fronts/smtp.py")


@pytest.mark.parametrize("package", ["aiosmtpd", "aiosmtplib"])
def test_libraries_whose_internals_we_use_have_an_upper_bound(package: str) -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [requirement] = [Requirement(d) for d in dependencies if Requirement(d).name.lower() == package]
    assert any(spec.operator in {"<", "<=", "~=", "=="} for spec in requirement.specifier), (
        f"{package} needs an upper bound in pyproject.toml: sealrelay uses its internals"
    )
    assert Version(version(package)) in requirement.specifier, (
        f"{package} {version(package)} is installed, outside {requirement.specifier}"
    )
