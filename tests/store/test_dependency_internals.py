"""The private names and behaviours of aiosmtpd, aiosmtplib and asyncio that sealrelay relies on.

They are not part of any public API, so a release may rename them without notice; the code
would then fail at run time, on a client's mail. Both libraries have an upper bound in
pyproject.toml; before raising it, this test says which name went and who used it.
"""

from __future__ import annotations

import asyncio
import ssl
import tomllib
from asyncio import sslproto
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd import proxy_protocol
from packaging.requirements import Requirement
from packaging.version import Version

from gateway.fronts.proxy_header import parse_header

PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"

# (owner, name, who relies on it)
CLASS_NAMES: list[tuple[Any, str, str]] = [
    (proxy_protocol, "get_proxy", "gateway/fronts/proxy_header.py: reads the PROXY header"),
    (proxy_protocol, "V2_SIGNATURE", "gateway/fronts/proxy_header.py: frames a v2 header"),
    (proxy_protocol, "ProxyData", "gateway/fronts/proxy_header.py: the header read"),
    (proxy_protocol.ProxyData, "valid", "gateway/fronts/proxy_header.py: proxied_client"),
    (proxy_protocol.ProxyData, "with_error", "gateway/fronts/proxy_header.py: parse_header"),
    (sslproto.SSLProtocol, "get_buffer", "gateway/fronts/tls_layer.py: implicit TLS"),
    (sslproto.SSLProtocol, "buffer_updated", "gateway/fronts/tls_layer.py: implicit TLS"),
    (aiosmtplib.SMTP, "execute_command", "gateway/outbound/upstream.py: TLS answered or not"),
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
    ("owner", "name", "user"),
    CLASS_NAMES,
    ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in CLASS_NAMES],
)
def test_class_names_we_rely_on_exist(owner: Any, name: str, user: str) -> None:
    assert hasattr(owner, name), gone(owner, name, user)


def test_the_proxy_parser_reads_a_header_it_is_given_whole_without_waiting() -> None:
    """gateway/fronts/proxy_header.py drives aiosmtpd's parser to its end in one step over
    the header's octets: it must read them with read/readexactly/readuntil alone."""
    v1 = parse_header(b"PROXY TCP4 192.0.2.7 192.0.2.1 40001 25\r\n")
    assert v1.valid and str(v1.src_addr) == "192.0.2.7" and v1.src_port == 40001
    v2 = parse_header(
        proxy_protocol.V2_SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 7, 192, 0, 2, 1])
        + (40001).to_bytes(2, "big")
        + (25).to_bytes(2, "big")
    )
    assert v2.valid and str(v2.src_addr) == "192.0.2.7" and v2.src_port == 40001
    assert not parse_header(b"PROXY nonsense\r\n").valid


async def test_names_of_an_ssl_protocol_made_without_connection_made() -> None:
    """gateway/fronts/tls_layer.py puts a TLS layer under a session after the PROXY
    header itself, handing it the octets that came with the header."""
    loop = asyncio.get_running_loop()
    layer = sslproto.SSLProtocol(
        loop,
        asyncio.Protocol(),
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        loop.create_future(),
        server_side=True,
        call_connection_made=False,
    )
    user = "gateway/fronts/tls_layer.py: the session writes through the layer"
    assert isinstance(layer._app_transport, asyncio.Transport), gone(layer, "_app_transport", user)


async def test_names_aiosmtplib_objects_have() -> None:
    client = aiosmtplib.SMTP()
    user = "gateway/outbound/smtp_connection.py: takes the transport over after the handshake"
    for name in ("transport", "protocol", "esmtp_extensions"):
        assert hasattr(client, name), gone(client, name, user)


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
