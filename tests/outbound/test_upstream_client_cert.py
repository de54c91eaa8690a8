"""The upstream's client certificate (`client_certificate`, `client_key`): a smart host that
asks for one, as a Microsoft 365 connector identified by certificate does, can tell the relay
by its subject name.

The upstream is a real SMTP server whose TLS REQUIRES a client certificate from a test CA.
With the configured certificate the copy arrives and the server saw its subject; without it,
or with one from another CA, the copy is deferred with the reason, nothing lost. Bad settings
stop start-up naming the key. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import ValidationError

from gateway.config import MxSettings, Settings, UpstreamSettings, validation_problems
from gateway.config_check import check_config
from gateway.outbound.mx import MxUpstream
from gateway.outbound.routes import open_upstream
from gateway.store.models import DeliveryStatus
from tests.cli_runner import sealrelay, write_config
from tests.conftest import Harness, StartRelay, make_message
from tests.dns_server import tiny_dns
from tests.outbound.test_delivery import deliveries, events, eventually, queued_id
from tests.outbound.test_mx_delivery import DATA, Net
from tests.pki import Authority, Issued
from tests.support import Sink, free_port, make_certificate

RELAY_NAME = "relay.broker.example"


@dataclass(frozen=True)
class Pki:
    """The smart host's CA, certificates it and another CA issued, the host's own."""

    ca: Authority
    relay: Issued
    stranger: Issued
    server: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory, "smart-host-ca"), Authority(directory, "other-ca")
    return Pki(
        ca=ca,
        relay=ca.issue(RELAY_NAME),
        stranger=other.issue(RELAY_NAME),
        server=make_certificate(directory, "smarthost.test"),
    )


def requiring_context(pki: Pki) -> ssl.SSLContext:
    """A smart host's TLS: its own certificate, and a client certificate of `pki.ca` required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki.server)
    context.load_verify_locations(cafile=str(pki.ca.pem))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class CertificateSink(Sink):
    """A recording sink that notes the subject of each client certificate it took mail under.

    `implicit`: TLS from the first byte (smtps://) instead of STARTTLS.
    """

    implicit: bool = False
    subjects: list[str] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert server.transport is not None
        peer = server.transport.get_extra_info("peercert") or {}
        names = [
            value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"
        ]
        self.subjects.append(",".join(names))
        return await super().handle_DATA(server, session, envelope)

    async def start(self, port: int | None = None) -> CertificateSink:
        if not self.implicit:
            await super().start(port)
            return self
        loop = asyncio.get_running_loop()
        self.port = port or self.port or free_port()
        sink = self

        def make() -> SMTP:
            return SMTP(sink, hostname="sink.test", decode_data=False, data_size_limit=None)

        self._server = await loop.create_server(make, self.host, self.port, ssl=self.tls_context)
        return self


@pytest.fixture
async def sink(pki: Pki) -> AsyncIterator[CertificateSink]:
    """The relay's `[upstream]`: a smart host that requires a certificate of the test CA."""
    server = await CertificateSink(tls_context=requiring_context(pki)).start()
    yield server
    await server.stop()


def shown(certificate: Issued) -> dict[str, str]:
    return {"client_certificate": str(certificate.cert), "client_key": str(certificate.key)}


async def deferred_copy(relay: Harness, message_id: str) -> Any:
    """The copy once its first attempt failed: still queued, the reason kept."""

    async def attempted() -> Any:
        [row] = await deliveries(relay.relay.db, message_id)
        return row if row.attempts >= 1 else None

    return await eventually(attempted)


async def assert_kept_queued(relay: Harness, message_id: str) -> str:
    """Deferred, not failed: queued with a reason, no bounce, nothing at the smart host."""
    row = await deferred_copy(relay, message_id)
    assert row.status == DeliveryStatus.QUEUED
    assert await events(relay.relay.db, "delivery.bounced") == []
    deferred = await events(relay.relay.db, "delivery.deferred")
    assert deferred and deferred[0].data["error"] == row.last_error
    assert relay.sink.messages == []
    assert f"127.0.0.1:{relay.sink.port}" in (row.last_error or "")
    return str(row.last_error)


# -- STARTTLS and implicit TLS to a smart host that requires a certificate


async def test_the_configured_certificate_is_shown_and_the_copy_delivered(
    relay_factory: StartRelay, sink: CertificateSink, pki: Pki
) -> None:
    relay = await relay_factory(upstream=shown(pki.relay))
    await relay.send(make_message(to="kunde@example.com"))
    [copy] = await sink.expect(1)
    assert copy.rcpt_tos == ["kunde@example.com"] and copy.tls
    assert sink.subjects == [RELAY_NAME]
    [row] = await eventually(lambda: _delivered(relay))
    assert row.status == DeliveryStatus.DELIVERED


async def _delivered(relay: Harness) -> list[Any] | None:
    rows = await deliveries(relay.relay.db)
    return rows if rows and all(r.status == DeliveryStatus.DELIVERED for r in rows) else None


async def test_it_is_read_once_at_start_not_for_each_connection(
    relay_factory: StartRelay, sink: CertificateSink, pki: Pki, tmp_path: Path
) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    cert, key = moved / "relay.crt", moved / "relay.key"
    cert.write_bytes(pki.relay.cert.read_bytes())
    key.write_bytes(pki.relay.key.read_bytes())
    relay = await relay_factory(upstream=shown(Issued(cert, key)))
    cert.unlink()
    key.unlink()  # a renewal half done, say: connections keep the one loaded at start
    await relay.send(make_message(to="a@example.com"))
    await relay.send(make_message(to="b@example.com"))
    await sink.expect(2)
    assert sink.subjects == [RELAY_NAME, RELAY_NAME]


@pytest.mark.parametrize("certificate", ["none", "another CA's"])
async def test_without_an_accepted_certificate_the_copy_is_deferred_with_the_reason(
    relay_factory: StartRelay, sink: CertificateSink, pki: Pki, certificate: str
) -> None:
    upstream = shown(pki.stranger) if certificate == "another CA's" else {}
    relay = await relay_factory(upstream=upstream)
    message_id = queued_id(await relay.send(make_message(to="kunde@example.com")))
    reason = await assert_kept_queued(relay, message_id)
    if certificate == "none":
        assert reason.endswith(
            "(the connection ended as TLS began: the upstream may require a client"
            " certificate; set client_certificate and client_key)"
        ), reason
    else:
        assert reason.endswith(
            "(the connection ended as TLS began: the upstream may not accept the client"
            f" certificate {pki.stranger.cert})"
        ), reason
    assert sink.subjects == []


@pytest.fixture
async def implicit_sink(pki: Pki) -> AsyncIterator[CertificateSink]:
    server = await CertificateSink(tls_context=requiring_context(pki), implicit=True).start()
    yield server
    await server.stop()


async def test_implicit_tls_shows_it_too(
    relay_factory: StartRelay, implicit_sink: CertificateSink, pki: Pki
) -> None:
    relay = await relay_factory(
        upstream={"url": f"smtps://127.0.0.1:{implicit_sink.port}", **shown(pki.relay)}
    )
    await relay.send(make_message(to="kunde@example.com"))
    [copy] = await implicit_sink.expect(1)
    assert copy.rcpt_tos == ["kunde@example.com"]
    assert implicit_sink.subjects == [RELAY_NAME]


async def test_implicit_tls_without_it_is_deferred(
    relay_factory: StartRelay, implicit_sink: CertificateSink
) -> None:
    relay = await relay_factory(upstream={"url": f"smtps://127.0.0.1:{implicit_sink.port}"})
    message_id = queued_id(await relay.send(make_message(to="kunde@example.com")))
    row = await deferred_copy(relay, message_id)
    assert row.status == DeliveryStatus.QUEUED
    assert (row.last_error or "").startswith(f"127.0.0.1:{implicit_sink.port}: ")
    assert "may require a client certificate" in (row.last_error or ""), row.last_error
    assert implicit_sink.messages == [] and implicit_sink.subjects == []


async def test_each_named_upstream_shows_its_own(
    relay_factory: StartRelay, sink: CertificateSink, pki: Pki
) -> None:
    """[upstreams.m365] has the certificate, [upstream] not: only its route gets through."""
    relay = await relay_factory(
        upstreams={
            "m365": {
                "url": f"smtp://127.0.0.1:{sink.port}",
                "verify_tls": False,
                **shown(pki.relay),
            }
        },
        routes=[{"name": "to-m365", "upstream": "m365", "recipient_domains": ["m365.example"]}],
    )
    await relay.send(make_message(to="a@m365.example, b@elsewhere.example"))
    [copy] = await sink.expect(1)
    assert copy.rcpt_tos == ["a@m365.example"] and sink.subjects == [RELAY_NAME]

    async def both_attempted() -> list[Any] | None:
        rows = await deliveries(relay.relay.db)
        return rows if len(rows) == 2 and all(r.attempts >= 1 for r in rows) else None

    rows = {r.recipient: r for r in await eventually(both_attempted)}
    assert rows["b@elsewhere.example"].status == DeliveryStatus.QUEUED
    assert "may require a client certificate" in (rows["b@elsewhere.example"].last_error or "")


# -- settings that stop start-up


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (
            {"client_certificate": "/etc/relay.crt"},
            "upstream.client_key: missing: client_certificate needs its private key",
        ),
        (
            {"client_key": "/etc/relay.key"},
            "upstream.client_key: set client_certificate too",
        ),
    ],
)
def test_only_one_of_the_two_stops_start_up(values: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings.model_validate({"upstream": {"url": "smtp://m365.example", **values}})
    lines = validation_problems(raised.value, {})
    assert [line for line in lines if line.startswith(problem)], lines


def test_a_named_upstream_with_only_one_names_its_key() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings.model_validate(
            {"upstreams": {"m365": {"url": "smtp://m.example", "client_key": "/k.pem"}}}
        )
    lines = validation_problems(raised.value, {})
    assert [line for line in lines if line.startswith("upstreams.m365.client_key: ")], lines


def config_with(tmp_path: Path, table: str, cert: Path, key: Path) -> Path:
    path = tmp_path / "sealrelay.toml"
    path.write_text(
        f'[{table}]\nurl = "smtp://smtp.office365.example:25"\n'
        f'client_certificate = "{cert}"\nclient_key = "{key}"\n'
        + (
            '[[routes]]\nname = "r"\nupstream = "m365"\nrecipient_domains = ["a.example"]\n'
            if table != "upstream"
            else ""
        )
    )
    return path


@pytest.mark.parametrize("table", ["upstream", "upstreams.m365"])
def test_files_that_cannot_be_read_or_do_not_match_are_errors_naming_the_key(
    tmp_path: Path, pki: Pki, table: str
) -> None:
    missing = tmp_path / "absent.key"
    settings, problems = check_config(
        config_with(tmp_path, table, pki.relay.cert, missing), environ={}
    )
    assert settings is not None
    assert [(p.key, p.text, p.error) for p in problems if "client" in p.key] == [
        (f"{table}.client_key", f"{missing}: no such file", True)
    ]

    settings, problems = check_config(
        config_with(tmp_path, table, tmp_path, pki.relay.key), environ={}
    )
    assert [(p.key, p.error) for p in problems if "client" in p.key] == [
        (f"{table}.client_certificate", True)
    ]
    assert [p.text for p in problems if "client" in p.key] == [
        f"{tmp_path} is a directory, not a file"
    ]

    # another certificate's key: not the pair
    settings, problems = check_config(
        config_with(tmp_path, table, pki.relay.cert, pki.stranger.key), environ={}
    )
    [mismatch] = [p for p in problems if "client" in p.key]
    assert mismatch.key == f"{table}.client_certificate" and mismatch.error
    assert str(pki.relay.cert) in mismatch.text and str(pki.stranger.key) in mismatch.text
    assert "matching private key" in mismatch.text

    settings, problems = check_config(
        config_with(tmp_path, table, pki.relay.cert, pki.relay.key), environ={}
    )
    assert [p for p in problems if "client" in p.key] == []


async def test_serve_refuses_to_start_with_a_key_that_does_not_match(
    tmp_path: Path, pki: Pki
) -> None:
    config = write_config(
        tmp_path,
        extra=(
            "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
            '[upstream]\nurl = "smtp://127.0.0.1:2526"\n'
            f'client_certificate = "{pki.relay.cert}"\nclient_key = "{pki.stranger.key}"\n'
        ),
    )
    served = await sealrelay("serve", "--config", str(config))
    assert served.code == 1
    assert "upstream.client_certificate: " in served.err, served.err
    assert not (tmp_path / "relay.db").exists()  # refused before anything was opened


async def test_an_upstream_that_cannot_be_reached_gets_no_certificate_hint(
    relay_factory: StartRelay,
) -> None:
    down = free_port()  # nothing listens there
    relay = await relay_factory(upstream={"url": f"smtps://127.0.0.1:{down}"})
    message_id = queued_id(await relay.send(make_message(to="kunde@example.com")))
    row = await deferred_copy(relay, message_id)
    assert row.status == DeliveryStatus.QUEUED
    assert (row.last_error or "").startswith(f"127.0.0.1:{down}: ")
    assert "certificate" not in (row.last_error or ""), row.last_error


# -- direct delivery (url = "mx:"): the upstream's certificate, to MX hosts that ask


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    async with AsyncExitStack() as stack:
        yield Net(stack)


async def mx_upstream(net: Net, pki: Pki, **mx: Any) -> MxUpstream:
    """Direct delivery asking the test's DNS, with the relay's client certificate."""
    _, dns_port = await net.stack.enter_async_context(tiny_dns(net.zone, net.records))
    opened = open_upstream(
        UpstreamSettings(url="mx:", timeout=5, connect_timeout=2, **shown(pki.relay)),
        RELAY_NAME,
        MxSettings(resolver=[f"127.0.0.1:{dns_port}"], port=net.port, **mx),
    )
    assert isinstance(opened, MxUpstream)
    return opened


async def mx_sink(net: Net, last: int, context: ssl.SSLContext) -> CertificateSink:
    sink = await CertificateSink(host=net.address(last), port=net.port, tls_context=context).start()
    net.stack.push_async_callback(sink.stop)
    return sink


async def test_direct_delivery_shows_it_to_an_mx_host_that_asks(net: Net, pki: Pki) -> None:
    net.mx("m365.test", (10, "mx1.m365.test"))
    net.a("mx1.m365.test", 10)
    sink = await mx_sink(net, 10, requiring_context(pki))
    upstream = await mx_upstream(net, pki, mta_sts=False)
    outcome = (await upstream.send("agent@broker.example", ["p@m365.test"], DATA))["p@m365.test"]
    assert outcome.delivered, outcome
    assert sink.subjects == [RELAY_NAME] and [m.tls for m in sink.messages] == [True]


async def test_direct_delivery_under_an_enforced_mta_sts_policy_shows_it_too(
    net: Net, pki: Pki, tmp_path: Path
) -> None:
    """The checked context MTA-STS uses carries the certificate as the opportunistic one does."""
    net.mx("sts.test", (10, "mx1.sts.test"))
    net.a("mx1.sts.test", 10)
    policy = "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n"
    policy_cert = await net.policy_server("sts.test", 53, policy, tmp_path)
    mx_cert, mx_key = make_certificate(tmp_path, "mx1.sts.test")
    context = requiring_context(Pki(pki.ca, pki.relay, pki.stranger, (mx_cert, mx_key)))
    sink = await mx_sink(net, 10, context)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(policy_cert.read_bytes() + mx_cert.read_bytes())
    upstream = await mx_upstream(net, pki, mta_sts=True, ca_file=roots)
    outcome = (await upstream.send("agent@broker.example", ["p@sts.test"], DATA))["p@sts.test"]
    assert outcome.delivered and outcome.remote_mta == "mx1.sts.test", outcome
    assert sink.subjects == [RELAY_NAME]
