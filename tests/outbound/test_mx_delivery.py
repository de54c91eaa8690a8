"""Direct delivery (`url = "mx:"`): real DNS over UDP to a loopback server, real SMTP sinks
as MX hosts on loopback addresses of their own, a real HTTPS server for MTA-STS policies.

Every MX host of a test listens on the same port (`[mx] port`) at its own address in a
127.x.y.0/24 block drawn per test; the policy server listens on port 443 of its own
address, as `mta-sts.<domain>` must.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import select

from gateway.config import MxSettings, Settings, UpstreamSettings
from gateway.config_check import settings_problems
from gateway.outbound.mta_sts import Policy, parse_policy, txt_id
from gateway.outbound.mx import MxUpstream
from gateway.outbound.routes import open_upstream
from gateway.outbound.upstream import Outcome
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus, Event
from tests.conftest import AGENT, StartRelay, dkim_dns, make_message
from tests.dns_server import tiny_dns
from tests.outbound.test_connection_cache import RecordingSink
from tests.queue_wait import queue_idle
from tests.support import Sink, free_port, make_certificate

MAIL_FROM = "agent@broker.example"
DATA = b"From: agent@broker.example\r\nSubject: hi\r\n\r\nHello.\r\n"


@dataclass
class Net:
    """A loopback block of this test's own, its DNS records, and the port MX hosts use."""

    stack: AsyncExitStack
    block: str = field(
        default_factory=lambda: f"127.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
    )
    port: int = field(default_factory=free_port)
    records: dict[tuple[str, str], Sequence[str]] = field(default_factory=dict)
    zone: dict[str, Sequence[Sequence[str]]] = field(default_factory=dict)  # TXT records
    failing: frozenset[str] = frozenset()
    dns_port: int = 0
    policy_fetches: int = 0

    def address(self, last: int) -> str:
        return f"{self.block}.{last}"

    def mx(self, domain: str, *hosts: tuple[int, str]) -> None:
        self.records[domain, "MX"] = [f"{pref} {host}." for pref, host in hosts]

    def a(self, name: str, last: int) -> str:
        self.records[name, "A"] = [self.address(last)]
        return self.address(last)

    async def sink(self, last: int, **kwargs: Any) -> Sink:
        sink = await Sink(host=self.address(last), port=self.port, **kwargs).start()
        self.stack.push_async_callback(sink.stop)
        return sink

    async def upstream(self, **mx: Any) -> MxUpstream:
        """The DNS server with the records given so far, and an upstream asking it."""
        if not self.dns_port:
            _, self.dns_port = await self.stack.enter_async_context(
                tiny_dns(self.zone, self.records, self.failing)
            )
        mx.setdefault("mta_sts", False)
        opened = open_upstream(
            UpstreamSettings(url="mx:", timeout=5, connect_timeout=2),
            "relay.broker.example",
            MxSettings(resolver=[f"127.0.0.1:{self.dns_port}"], port=self.port, **mx),
        )
        assert isinstance(opened, MxUpstream)
        return opened

    async def policy_server(
        self,
        domain: str,
        last: int,
        policy: str,
        directory: Path,
        content_type: str = "text/plain",
    ) -> Path:
        """`https://mta-sts.<domain>/.well-known/mta-sts.txt` on port 443 of its own
        address, its certificate self-signed; returns the certificate (a trust root)."""
        name = f"mta-sts.{domain}"
        self.a(name, last)
        self.zone[f"_mta-sts.{domain}"] = [["v=STSv1; id=20261202T1;"]]
        cert, key = make_certificate(directory, name)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        async def serve_policy(request: web.Request) -> web.Response:
            self.policy_fetches += 1
            return web.Response(text=policy, content_type=content_type)

        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", serve_policy)
        runner = web.AppRunner(app)
        await runner.setup()
        self.stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, self.address(last), 443, ssl_context=context).start()
        return cert


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    async with AsyncExitStack() as stack:
        yield Net(stack)


def tls_context_for(directory: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server context with a self-signed certificate for `name`, and that certificate."""
    cert, key = make_certificate(directory, name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


def bundle(directory: Path, *certs: Path) -> Path:
    path = directory / "roots.pem"
    path.write_bytes(b"".join(cert.read_bytes() for cert in certs))
    return path


async def send(upstream: MxUpstream, *recipients: str) -> dict[str, Outcome]:
    return await upstream.send(MAIL_FROM, list(recipients), DATA)


# -- routing -------------------------------------------------------------------------------


async def test_the_most_preferred_mx_gets_the_copy(net: Net) -> None:
    net.mx("a.test", (20, "mx2.a.test"), (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)
    net.a("mx2.a.test", 11)
    first, second = await net.sink(10), await net.sink(11)
    outcomes = await send(await net.upstream(), "p@a.test")
    assert outcomes["p@a.test"].delivered
    assert outcomes["p@a.test"].remote_mta == "mx1.a.test"
    assert [m.rcpt_tos for m in first.messages] == [["p@a.test"]]
    assert first.messages[0].data == DATA and first.messages[0].mail_from == MAIL_FROM
    assert second.messages == []


async def test_an_international_domain_is_looked_up_by_its_idna_2008_a_labels(net: Net) -> None:
    """`straße.test` is `xn--strae-oqa.test`; Python's IDNA 2003 codec would have asked for
    `strasse.test`, another domain. An MX without SMTPUTF8 gets the address in A-labels, and
    a mailbox that needs SMTPUTF8 bounces at once rather than wait for an MX that has it."""
    net.mx("xn--strae-oqa.test", (10, "mx.xn--strae-oqa.test"))
    net.a("mx.xn--strae-oqa.test", 10)
    net.mx("strasse.test", (10, "mx.strasse.test"))
    net.a("mx.strasse.test", 11)
    right, wrong = await net.sink(10), await net.sink(11)
    outcomes = await send(await net.upstream(), "p@straße.test", "jörg@straße.test")
    assert outcomes["p@straße.test"].delivered
    failed = outcomes["jörg@straße.test"]
    assert failed.permanent and failed.remote_mta == "mx.xn--strae-oqa.test"
    assert failed.error == (
        "550 5.6.7 mx.xn--strae-oqa.test does not offer SMTPUTF8, which this recipient's"
        " address needs"
    )
    assert [m.rcpt_tos for m in right.messages] == [["p@xn--strae-oqa.test"]]
    assert wrong.messages == []


async def test_a_down_mx_passes_the_copy_to_the_next(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"), (20, "mx2.a.test"))
    net.a("mx1.a.test", 10)  # nothing listens there
    net.a("mx2.a.test", 11)
    second = await net.sink(11)
    outcomes = await send(await net.upstream(), "p@a.test")
    assert outcomes["p@a.test"] == Outcome(reply="250 OK stored", remote_mta="mx2.a.test")
    assert len(second.messages) == 1


async def test_no_mx_falls_back_to_the_domains_own_address(net: Net) -> None:
    net.a("a.test", 12)
    sink = await net.sink(12)
    outcomes = await send(await net.upstream(), "p@a.test")
    assert outcomes["p@a.test"].delivered and outcomes["p@a.test"].remote_mta == "a.test"
    assert len(sink.messages) == 1


async def test_a_domain_with_neither_mx_nor_address_bounces(net: Net) -> None:
    net.records["a.test", "TXT"] = ['"exists"']
    outcomes = await send(await net.upstream(), "p@a.test")
    assert outcomes["p@a.test"].permanent
    assert outcomes["p@a.test"].error == "5.1.2 a.test has no MX record and no address"


async def test_null_mx_bounces_at_once(net: Net) -> None:
    net.records["a.test", "MX"] = ["0 ."]
    net.a("a.test", 13)
    sink = await net.sink(13)
    outcome = (await send(await net.upstream(), "p@a.test"))["p@a.test"]
    assert outcome.permanent and outcome.error is not None
    assert outcome.error.startswith("5.1.10 a.test accepts no mail")
    assert sink.messages == [] and sink.most_connections == 0


async def test_a_domain_that_does_not_exist_bounces(net: Net) -> None:
    outcome = (await send(await net.upstream(), "p@nowhere.test"))["p@nowhere.test"]
    assert outcome == Outcome("5.1.2 nowhere.test: the domain does not exist", permanent=True)


async def test_a_failing_resolver_defers(net: Net) -> None:
    net.failing = frozenset({"a.test"})
    outcome = (await send(await net.upstream(), "p@a.test"))["p@a.test"]
    assert not outcome.permanent and outcome.error is not None
    assert outcome.error.startswith("4.4.3 MX lookup failed: a.test MX")


async def test_an_mx_without_address_is_skipped(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"), (20, "mx2.a.test"))
    net.a("mx2.a.test", 11)  # mx1.a.test has no record at all
    sink = await net.sink(11)
    outcome = (await send(await net.upstream(), "p@a.test"))["p@a.test"]
    assert outcome.delivered and outcome.remote_mta == "mx2.a.test"
    assert len(sink.messages) == 1


async def test_no_mx_with_an_address_defers_saying_why(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"), (20, "mx2.a.test"))
    outcome = (await send(await net.upstream(), "p@a.test"))["p@a.test"]
    assert outcome == Outcome(
        "4.4.4 no MX host of a.test took the copy: mx1.a.test: no address; mx2.a.test: no address"
    )


async def test_a_5xx_for_one_recipient_bounces_only_that_one(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)
    sink = await net.sink(10, refuse={"gone@a.test": "550 5.1.1 no such user"})
    outcomes = await send(await net.upstream(), "p@a.test", "gone@a.test")
    assert outcomes["gone@a.test"] == Outcome(
        "550 5.1.1 no such user", permanent=True, remote_mta="mx1.a.test"
    )
    assert outcomes["p@a.test"].delivered
    assert [m.rcpt_tos for m in sink.messages] == [["p@a.test"]]


async def test_recipients_of_two_domains_go_to_each_domains_mx(net: Net) -> None:
    net.mx("a.test", (10, "mx.a.test"))
    net.mx("b.test", (10, "mx.b.test"))
    net.a("mx.a.test", 10)
    net.a("mx.b.test", 20)
    a, b = await net.sink(10), await net.sink(20)
    outcomes = await send(await net.upstream(), "p@a.test", "q@b.test", "r@a.test")
    assert {r: o.remote_mta for r, o in outcomes.items() if o.delivered} == {
        "p@a.test": "mx.a.test",
        "q@b.test": "mx.b.test",
        "r@a.test": "mx.a.test",
    }
    assert [m.rcpt_tos for m in a.messages] == [["p@a.test", "r@a.test"]]
    assert [m.rcpt_tos for m in b.messages] == [["q@b.test"]]


async def test_a_utf8_subject_goes_with_smtputf8_to_an_mx_that_offers_it(net: Net) -> None:
    """RFC 6532 mail to ASCII addresses: SMTPUTF8 where the MX offers it, 8-bit data where it
    does not, the bytes as they are either way."""
    data = "From: agent@broker.example\r\nSubject: Exposé für Jörg\r\n\r\nHallo.\r\n".encode()
    net.mx("a.test", (10, "mx.a.test"))
    net.mx("b.test", (10, "mx.b.test"))
    net.a("mx.a.test", 10)
    net.a("mx.b.test", 20)
    offering, plain = await net.sink(10), await net.sink(20)
    offering.smtputf8 = True
    upstream = await net.upstream()
    outcomes = await upstream.send(MAIL_FROM, ["p@a.test", "q@b.test"], data)
    assert all(outcome.delivered for outcome in outcomes.values())
    assert [(m.smtputf8, m.data.endswith(data)) for m in offering.messages] == [(True, True)]
    assert [(m.smtputf8, m.data.endswith(data)) for m in plain.messages] == [(False, True)]


async def test_a_domain_in_either_form_is_one_transaction(net: Net) -> None:
    """`straße.test`, `Straße.TEST` and `xn--strae-oqa.test` are one domain: one lookup,
    one transaction with every recipient, not one for each way of writing it."""
    net.mx("xn--strae-oqa.test", (10, "mx.xn--strae-oqa.test"))
    net.a("mx.xn--strae-oqa.test", 10)
    sink = await net.sink(10)
    recipients = ["p@straße.test", "q@Straße.TEST", "r@xn--strae-oqa.test"]
    outcomes = await send(await net.upstream(), *recipients)
    assert all(outcome.delivered for outcome in outcomes.values()) and set(outcomes) == set(
        recipients
    )
    assert [m.rcpt_tos for m in sink.messages] == [
        ["p@xn--strae-oqa.test", "q@xn--strae-oqa.test", "r@xn--strae-oqa.test"]
    ]


async def test_starttls_is_used_whenever_offered_unverified(net: Net, tmp_path: Path) -> None:
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)
    context, _ = tls_context_for(tmp_path, "someone-else.test")  # trusted by nobody
    sink = await net.sink(10, tls_context=context)
    outcome = (await send(await net.upstream(), "p@a.test"))["p@a.test"]
    assert outcome.delivered
    assert [m.tls for m in sink.messages] == [True]


# -- MTA-STS -------------------------------------------------------------------------------

POLICY = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


async def sts_world(
    net: Net, tmp_path: Path, *, mode: str, mx_pattern: str = "*.sts.test", tls: str = "valid"
) -> tuple[MxUpstream, Sink]:
    """sts.test: one MX host, mx1.sts.test, and a policy of `mode` naming `mx_pattern`.
    `tls`: "valid" (a certificate for mx1.sts.test the relay trusts), "untrusted" (one it
    does not), or "none" (no STARTTLS)."""
    net.mx("sts.test", (10, "mx1.sts.test"))
    net.a("mx1.sts.test", 10)
    policy_cert = await net.policy_server(
        "sts.test", 53, POLICY.format(mode=mode, mx=mx_pattern), tmp_path
    )
    roots = [policy_cert]
    context = None
    if tls != "none":
        context, cert = tls_context_for(tmp_path / "mx", "mx1.sts.test")
        if tls == "valid":
            roots.append(cert)
    sink = await net.sink(10, tls_context=context)
    upstream = await net.upstream(mta_sts=True, ca_file=bundle(tmp_path, *roots))
    return upstream, sink


@pytest.fixture
def mx_dir(tmp_path: Path) -> Path:
    (tmp_path / "mx").mkdir()
    return tmp_path


async def test_enforce_with_a_valid_certificate_delivers_over_tls(net: Net, mx_dir: Path) -> None:
    upstream, sink = await sts_world(net, mx_dir, mode="enforce")
    outcome = (await send(upstream, "p@sts.test"))["p@sts.test"]
    assert outcome.delivered and outcome.remote_mta == "mx1.sts.test"
    assert [m.tls for m in sink.messages] == [True]


@pytest.mark.parametrize(
    ("tls", "pattern", "says"),
    [
        ("valid", "mail.other.test", "4.7.5 MTA-STS policy of sts.test (enforce) names none"),
        ("none", "*.sts.test", "offers no STARTTLS, and the MTA-STS policy of sts.test"),
        ("untrusted", "*.sts.test", "certificate not valid for mx1.sts.test (MTA-STS policy"),
    ],
    ids=["mx-not-in-policy", "no-tls", "bad-certificate"],
)
async def test_enforce_defers_and_sends_nothing_when_the_policy_is_not_met(
    net: Net, mx_dir: Path, tls: str, pattern: str, says: str
) -> None:
    upstream, sink = await sts_world(net, mx_dir, mode="enforce", mx_pattern=pattern, tls=tls)
    outcome = (await send(upstream, "p@sts.test"))["p@sts.test"]
    assert not outcome.delivered and not outcome.permanent
    assert outcome.error is not None and says in outcome.error
    assert sink.messages == []


@pytest.mark.parametrize("tls", ["untrusted", "none"])
async def test_testing_mode_delivers_and_logs_what_enforce_would_refuse(
    net: Net, mx_dir: Path, tls: str, caplog: pytest.LogCaptureFixture
) -> None:
    upstream, sink = await sts_world(
        net, mx_dir, mode="testing", mx_pattern="mail.other.test", tls=tls
    )
    with caplog.at_level(logging.WARNING, logger="gateway.outbound.mx"):
        outcome = (await send(upstream, "p@sts.test"))["p@sts.test"]
    assert outcome.delivered
    assert [m.tls for m in sink.messages] == [tls != "none"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("does not name its MX host(s) mx1.sts.test; delivering anyway" in m for m in logged)
    problem = "certificate not valid" if tls == "untrusted" else "offers no STARTTLS"
    assert any("MTA-STS policy of sts.test (testing)" in m and problem in m for m in logged)


async def test_a_policy_that_cannot_be_fetched_counts_as_none(net: Net, tmp_path: Path) -> None:
    net.mx("sts.test", (10, "mx1.sts.test"))
    net.a("mx1.sts.test", 10)
    net.a("mta-sts.sts.test", 53)  # nothing listens on its port 443
    net.zone["_mta-sts.sts.test"] = [["v=STSv1; id=1;"]]
    sink = await net.sink(10)  # no TLS at all: enforce would refuse it
    upstream = await net.upstream(mta_sts=True)
    outcome = (await send(upstream, "p@sts.test"))["p@sts.test"]
    assert outcome.delivered and len(sink.messages) == 1


@pytest.mark.parametrize(
    ("policy", "content_type", "logged"),
    [
        (POLICY.format(mode="enforce", mx="*.sts.test"), "text/html", "is text/html"),
        ("version: STSv1\nmode: enforce\nmax_age: 600\n", "text/plain", "names no mx"),
        ("x" * 70000, "text/plain", "larger than 65536 bytes"),
    ],
    ids=["wrong-type", "no-mx", "too-large"],
)
async def test_an_unusable_policy_counts_as_none_and_is_logged(
    net: Net,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    content_type: str,
    logged: str,
) -> None:
    net.mx("sts.test", (10, "mx1.sts.test"))
    net.a("mx1.sts.test", 10)
    cert = await net.policy_server("sts.test", 53, policy, tmp_path, content_type)
    sink = await net.sink(10)  # no TLS: an enforced policy would refuse it
    upstream = await net.upstream(mta_sts=True, ca_file=bundle(tmp_path, cert))
    with caplog.at_level(logging.WARNING, logger="gateway.outbound.mta_sts"):
        outcome = (await send(upstream, "p@sts.test"))["p@sts.test"]
    assert outcome.delivered and len(sink.messages) == 1
    assert upstream.mta_sts is not None and upstream.mta_sts.cached("sts.test") is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("MTA-STS policy of sts.test (id 20261202T1) could not be used")
    assert logged in warning and warning.endswith("delivering as if it had none")


async def test_a_fetched_policy_is_cached_until_its_id_changes(net: Net, mx_dir: Path) -> None:
    upstream, sink = await sts_world(net, mx_dir, mode="enforce")
    assert upstream.mta_sts is not None
    await send(upstream, "p@sts.test")
    first = upstream.mta_sts.cached("sts.test")
    await send(upstream, "q@sts.test")
    assert first is not None and upstream.mta_sts.cached("sts.test") is first
    assert net.policy_fetches == 1
    assert len(sink.messages) == 2


async def test_copies_for_one_domain_at_once_fetch_its_policy_once(net: Net, mx_dir: Path) -> None:
    upstream, sink = await sts_world(net, mx_dir, mode="enforce")
    results = await asyncio.gather(*(send(upstream, f"p{n}@sts.test") for n in range(3)))
    assert all(r[f"p{n}@sts.test"].delivered for n, r in enumerate(results))
    assert net.policy_fetches == 1 and len(sink.messages) == 3


def test_policy_texts_are_read_as_rfc_8461_says() -> None:
    assert txt_id(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert txt_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: none
    assert txt_id(["v=STSv1; id=not-alnum"]) is None
    assert txt_id(["v=spf1 -all"]) is None
    policy = parse_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: mail.a.test\r\nmx: *.b.test\r\nmax_age: 604800\r\n",
        "x1",
    )
    assert policy == Policy("x1", "enforce", ("mail.a.test", "*.b.test"), 604800)
    assert policy.allows("MAIL.a.test.") and policy.allows("mx1.b.test")
    assert not policy.allows("b.test") and not policy.allows("a.mx1.b.test")
    for text, problem in [
        ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode 'strict'"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "names no mx"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999\n", "max_age"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_policy(text, "x")


# -- limits --------------------------------------------------------------------------------


async def test_at_most_n_connections_per_destination(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)
    sink = await net.sink(10, hold=asyncio.Event())
    upstream = await net.upstream(connections_per_destination=2)
    sending = asyncio.gather(*(send(upstream, f"p{n}@a.test") for n in range(5)))
    await sink.wait_held(2)
    async with asyncio.timeout(10):  # the other three wait for a slot, not a connection
        while upstream.limits.waiting("a.test") < 3:
            await asyncio.sleep(0.01)
    assert sink.open_connections == 2
    assert sink.hold is not None
    sink.hold.set()
    results = await sending
    assert all(outcome.delivered for result in results for outcome in result.values())
    assert len(sink.messages) == 5 and sink.most_connections == 2


async def test_a_domain_that_could_not_be_reached_rests_before_the_next_try(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)  # nothing listens yet
    upstream = await net.upstream(failure_backoff=300)
    first = (await send(upstream, "p@a.test"))["p@a.test"]
    assert first.error is not None and first.error.startswith("4.4.1 no MX host of a.test")
    sink = await net.sink(10)
    second = (await send(upstream, "q@a.test"))["q@a.test"]
    assert second.error is not None and not second.permanent
    assert second.error.startswith("4.4.1 a.test: not tried for another")
    assert "mx1.a.test" in second.error  # why: the last failure
    assert sink.most_connections == 0
    other = await send(await net.upstream(failure_backoff=0), "q@a.test")  # no rest
    assert other["q@a.test"].delivered


async def test_copies_that_waited_for_a_slot_rest_too_when_the_first_failed(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)  # nothing listens
    upstream = await net.upstream(connections_per_destination=1, failure_backoff=300)
    results = await asyncio.gather(*(send(upstream, f"p{n}@a.test") for n in range(3)))
    errors = sorted(str(r[f"p{n}@a.test"].error) for n, r in enumerate(results))
    assert [e.startswith("4.4.1 a.test: not tried for another 300 s") for e in errors] == [
        True,
        True,
        False,
    ]
    assert errors[2].startswith("4.4.1 no MX host of a.test took the copy: mx1.a.test[")


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "values", "problem"),
    [
        ("upstream", {"url": "mx:example.com"}, "capture:DIR or mx:"),
        ("mx", {"resolver": ["dns.example:53"]}, "a resolver must be an IP address and port"),
        ("mx", {"resolver": ["127.0.0.1"]}, "is not HOST:PORT"),
        ("mx", {"port": 0}, "greater than 0"),
        ("mx", {"connections_per_destination": 0}, "greater than or equal to 1"),
        ("mx", {"ca_file": "/nonexistent/roots.pem"}, "no such file"),
    ],
)
def test_bad_settings_name_the_key(section: str, values: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({section: values})
    [error] = caught.value.errors()
    assert error["loc"][0] == section and problem in str(error["msg"])


def test_check_config_warns_of_a_private_ehlo_name_and_refuses_a_bad_ca_file(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "roots.pem"
    bad.write_text("not a certificate\n")
    settings = Settings.model_validate(
        {
            "server": {"hostname": "relay.local"},
            "upstream": {"url": "mx:"},
            "mx": {"ca_file": str(bad)},
        }
    )
    found = {p.key: p for p in settings_problems(settings)}
    assert not found["server.hostname"].error
    assert "relay.local: direct delivery greets MX hosts" in found["server.hostname"].text
    assert found["mx.ca_file"].error and "not PEM certificates" in found["mx.ca_file"].text
    public = settings.model_copy(
        update={"server": settings.server.model_copy(update={"hostname": "mail.broker.de"})}
    )
    assert "server.hostname" not in {p.key for p in settings_problems(public)}


# -- through the relay ---------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
async def test_a_relayed_message_arrives_signed_at_the_mx(
    relay_factory: StartRelay, database: Database, net: Net
) -> None:
    net.mx("example.com", (10, "mx1.example.com"))
    net.a("mx1.example.com", 10)
    mx_sink = await net.sink(10)
    await net.upstream()  # starts the DNS server
    harness = await relay_factory(
        upstream={"url": "mx:"},
        mx={"resolver": [f"127.0.0.1:{net.dns_port}"], "port": net.port, "mta_sts": False},
    )
    await harness.send(make_message(to="prospect@example.com"))
    [copy] = await mx_sink.expect(1)
    assert copy.rcpt_tos == ["prospect@example.com"]
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dns(harness.dkim_key))
    await queue_idle(database)
    async with database.transaction() as session:
        [row] = (await session.scalars(select(Delivery))).all()
        [event] = (
            await session.scalars(select(Event).where(Event.type == "delivery.delivered"))
        ).all()
    assert row.status == DeliveryStatus.DELIVERED
    assert event.data["remote"] == "mx1.example.com"
    assert harness.sink.messages == []  # the smart host of the other tests saw nothing


async def test_a_message_for_two_domains_leaves_per_domain_and_a_slow_one_holds_no_other(
    relay_factory: StartRelay, database: Database, net: Net
) -> None:
    """Each recipient domain is a destination of its own: the copy for the domain whose MX
    is slow waits for it alone; the other domain's copy is delivered and recorded."""
    net.mx("slow.example.com", (10, "mx.slow.example.com"))
    net.a("mx.slow.example.com", 10)
    net.mx("fast.example.com", (10, "mx.fast.example.com"))
    net.a("mx.fast.example.com", 11)
    release = asyncio.Event()
    slow, fast = await net.sink(10, hold=release), await net.sink(11)
    await net.upstream()  # starts the DNS server
    harness = await relay_factory(
        upstream={"url": "mx:"},
        mx={"resolver": [f"127.0.0.1:{net.dns_port}"], "port": net.port, "mta_sts": False},
        worker={"concurrency": 2, "destination_concurrency": 1},
    )
    await harness.send(make_message(to="a@slow.example.com, b@fast.example.com"))
    await slow.wait_held(1)
    [copy] = await fast.expect(1)
    assert copy.rcpt_tos == ["b@fast.example.com"]

    async def fast_recorded() -> bool:
        async with database.transaction() as session:
            rows = (await session.scalars(select(Delivery))).all()
        return {d.recipient: d.status for d in rows} == {
            "a@slow.example.com": DeliveryStatus.QUEUED,
            "b@fast.example.com": DeliveryStatus.DELIVERED,
        }

    async with asyncio.timeout(20):
        while not await fast_recorded():
            await asyncio.sleep(0.05)
    assert harness.relay.worker.destinations.running(("mx", "slow.example.com")) == 1
    release.set()
    [held] = await slow.expect(1)
    assert held.rcpt_tos == ["a@slow.example.com"]
    await queue_idle(database)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # no database question
async def test_a_null_mx_recipient_bounces_to_the_agent_through_the_agents_mx(
    relay_factory: StartRelay, database: Database, net: Net, caplog: pytest.LogCaptureFixture
) -> None:
    net.records["nomail.example", "MX"] = ["0 ."]
    net.mx("broker.example", (10, "mx.broker.example"))
    net.a("mx.broker.example", 10)
    agents_mx = await net.sink(10)
    await net.upstream()
    harness = await relay_factory(
        upstream={"url": "mx:"},
        mx={"resolver": [f"127.0.0.1:{net.dns_port}"], "port": net.port, "mta_sts": False},
    )
    with caplog.at_level(logging.INFO, logger="gateway.outbound.delivery"):
        await harness.send(make_message(to="someone@nomail.example"))
        [report] = await agents_mx.expect(1)
        await queue_idle(database)
    assert report.mail_from == "<>" and report.rcpt_tos == [AGENT]
    dsn = report.data.decode()
    assert "Status: 5.1.10" in dsn and "publishes a null MX" in dsn
    async with database.transaction() as session:
        rows = {d.recipient: d for d in (await session.scalars(select(Delivery))).all()}
    assert rows["someone@nomail.example"].status == DeliveryStatus.BOUNCED
    assert rows["someone@nomail.example"].attempts == 1
    assert rows[AGENT].status == DeliveryStatus.DELIVERED
    logged = [r.getMessage() for r in caplog.records]
    assert any("to=<someone@nomail.example>, relay=mx:," in m and "dsn=5.1.10" in m for m in logged)
    assert any(f"to=<{AGENT}>, relay=mx.broker.example," in m for m in logged)


# -- kept connections ----------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
async def test_a_kept_mx_connection_cut_before_the_upstream_answered_is_replaced_once(
    net: Net, chunking: bool
) -> None:
    """The MX host drops a kept connection at MAIL, before any reply: with BDAT the copy's
    chunk had gone with it, yet nothing was taken, so it goes again on a new connection."""
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)
    sink = await RecordingSink(host=net.address(10), port=net.port, chunking=chunking).start()
    net.stack.push_async_callback(sink.stop)
    sink.cut_at_mail = {2}
    upstream = await net.upstream()
    for number in range(2):
        [outcome] = (await send(upstream, f"p{number}@a.test")).values()
        assert outcome.delivered and outcome.remote_mta == "mx1.a.test"
    assert sink.connections == 2 and sink.pipelined == [True] * 3
    assert [m.rcpt_tos for m in sink.messages] == [["p0@a.test"], ["p1@a.test"]]
    assert [m.chunks for m in sink.messages] == [int(chunking)] * 2
    await upstream.close()


async def test_copies_to_one_domain_share_a_kept_connection(net: Net) -> None:
    net.mx("a.test", (10, "mx1.a.test"))
    net.a("mx1.a.test", 10)
    sink = await RecordingSink(host=net.address(10), port=net.port).start()
    net.stack.push_async_callback(sink.stop)
    upstream = await net.upstream()
    for number in range(3):
        [outcome] = (await send(upstream, f"p{number}@a.test")).values()
        assert outcome.delivered and outcome.remote_mta == "mx1.a.test"
    other = (await send(upstream, "q@b.test"))["q@b.test"]  # another domain: not that one
    assert not other.delivered
    assert sink.connections == 1 and sink.pipelined == [True] * 3
    assert sink.sessions[0][0] == "EHLO relay.broker.example"
    assert upstream.connections.idle(("a.test", "none")) == 1
    await upstream.close()
    assert sink.quits == 1
