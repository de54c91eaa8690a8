"""Direct delivery (`[upstream] url = "mx:"`): each copy goes to its recipients' domains'
MX hosts, with no smart host in between (docs/direct-delivery.md).

Recipients are grouped by domain, one SMTP transaction per domain. Hosts are tried in
preference order, each address in turn, until one holds a conversation; a host that cannot
be reached, or whose greeting or EHLO refuses us, passes the copy to the next. Once MAIL is
sent, the host's answers are the outcomes (per recipient, as with a smart host).

TLS is used whenever STARTTLS is offered, without checking the certificate (RFC 7435's
opportunistic security), unless the domain's MTA-STS policy enforces it: then only hosts
the policy names are used, and only over TLS with a certificate valid for the MX name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Sequence

import aiosmtplib

from gateway.config import MxSettings, UpstreamSettings
from gateway.outbound.connection_cache import ConnectionCache
from gateway.outbound.destinations import DestinationLimits
from gateway.outbound.mta_sts import MtaSts, Policy, verified_context
from gateway.outbound.mx_lookup import DnsResolver, DnsTrouble, MxLookupError, mx_hosts
from gateway.outbound.smtp_connection import ConnectionEnded, SmtpConnection
from gateway.outbound.stored_copy import Outgoing
from gateway.outbound.upstream import (
    Destination,
    Outcome,
    client_tls_context,
    ended,
    failure_reason,
    refusal,
    show_client_certificate,
    transaction,
)
from rules.domains import ascii_domain, domain_of

log = logging.getLogger(__name__)


class HostFailed(Exception):
    """This host could not take the copy before a transaction began: try the next one."""


class _CertificateRejected(HostFailed):
    """The host's certificate failed verification (testing mode tries again without)."""


class MxUpstream:
    def __init__(self, settings: UpstreamSettings, mx: MxSettings, local_hostname: str) -> None:
        self.dns = DnsResolver(mx.resolver, mx.dns_timeout)
        self.port = mx.port
        self.ca_file = mx.ca_file
        self.timeout = settings.timeout
        self.connect_timeout = settings.connect_timeout
        self.session_timeout = settings.session_timeout
        self.min_transfer_rate = settings.min_transfer_rate
        self.local_hostname = local_hostname
        self.pipelining = settings.pipelining
        self.chunking = settings.chunking
        # per domain and MTA-STS mode: a connection opened under one mode serves no other
        self.connections = ConnectionCache(settings)
        self.settings = settings
        self.opportunistic = client_tls_context(verify=False, upstream=settings)
        self.limits = DestinationLimits(mx.connections_per_destination, mx.failure_backoff)
        self.mta_sts = MtaSts(self.dns, mx.ca_file, self.connect_timeout) if mx.mta_sts else None

    @functools.cached_property
    def verified(self) -> ssl.SSLContext:
        """Read on first use: loading the system's trust roots costs tens of milliseconds."""
        context = verified_context(self.ca_file)
        show_client_certificate(context, self.settings)
        return context

    def deadline(self, size: int) -> float:
        return self.session_timeout + size / self.min_transfer_rate

    async def close(self) -> None:
        """QUIT on the kept connections."""
        await self.connections.close()

    def destination(self, recipient: str) -> Destination:
        """The recipient's domain, at most `[mx] connections_per_destination` at a time:
        the worker then never waits inside `send` for this upstream's own per-domain slot."""
        return Destination(("mx", domain_of(recipient)), self.limits.per_destination)

    async def send(
        self, mail_from: str, recipients: Sequence[str], data: Outgoing
    ) -> dict[str, Outcome]:
        """One transaction per recipient domain, the domains at the same time."""
        by_domain: dict[str, list[str]] = {}
        for recipient in recipients:
            by_domain.setdefault(domain_of(recipient), []).append(recipient)
        results = await asyncio.gather(
            *(self._to_domain(d, group, mail_from, data) for d, group in by_domain.items())
        )
        return {recipient: outcome for result in results for recipient, outcome in result.items()}

    async def _to_domain(
        self, domain: str, recipients: list[str], mail_from: str, data: Outgoing
    ) -> dict[str, Outcome]:
        def every(error: str, permanent: bool = False) -> dict[str, Outcome]:
            return dict.fromkeys(recipients, Outcome(error, permanent))

        try:
            name = ascii_domain(domain.rstrip("."))
        except ValueError:
            return every(f"5.1.2 {domain!r} is not a domain name", permanent=True)
        if not name or name.startswith("["):
            return every(f"5.1.2 {domain!r}: direct delivery needs a domain name", True)
        if (why := self.limits.resting(name)) is not None:
            return every(f"4.4.1 {domain}: {why}")
        try:
            found = await mx_hosts(self.dns, name)
        except MxLookupError as exc:
            return every(str(exc), exc.permanent)
        policy = await self.mta_sts.policy(name) if self.mta_sts is not None else None
        mode = policy.mode if policy is not None else "none"
        hosts = list(found.hosts)
        if policy is not None and mode != "none":
            outside = [host for host in hosts if not policy.allows(host)]
            if outside:
                log.warning(
                    "MTA-STS policy of %s (%s) does not name its MX host(s) %s; %s",
                    name,
                    mode,
                    ", ".join(outside),
                    "they are not used" if mode == "enforce" else "delivering anyway",
                )
            if mode == "enforce":
                hosts = [host for host in hosts if policy.allows(host)]
                if not hosts:
                    return every(
                        f"4.7.5 MTA-STS policy of {name} (enforce) names none of its MX hosts"
                        f" ({', '.join(found.hosts)}); not sent"
                    )
        reasons: list[str] = []
        connected = False  # a host was reached, or DNS failed: not a verdict on the domain
        async with self.limits.slot(name):
            if (why := self.limits.resting(name)) is not None:  # failed while we waited
                return every(f"4.4.1 {domain}: {why}")
            kept = await self._over_kept(name, mode, policy, mail_from, recipients, data)
            if kept is not None:
                return kept
            for host in hosts:
                try:
                    addresses = await self.dns.addresses(host)
                except DnsTrouble as exc:
                    reasons.append(f"{host}: address lookup failed: {exc}")
                    connected = True
                    continue
                if not addresses:
                    reasons.append(f"{host}: no address")
                for address in addresses:
                    try:
                        outcomes = await self._conversation(
                            name, host, address, mode, mail_from, recipients, data, mode
                        )
                    except HostFailed as exc:
                        reasons.append(str(exc))
                        connected = True
                        continue
                    self.limits.reached(name)
                    return outcomes
        why = "; ".join(reasons)
        if found.implicit and not connected:
            return every(f"5.1.2 {name} has no MX record and no address", permanent=True)
        self.limits.failed(name, why)
        status = "4.4.1" if connected else "4.4.4"
        return every(f"{status} no MX host of {name} took the copy: {why}")

    async def _over_kept(
        self,
        domain: str,
        mode: str,
        policy: Policy | None,
        mail_from: str,
        recipients: list[str],
        data: Outgoing,
    ) -> dict[str, Outcome] | None:
        """The copy over a kept connection to `domain`; None when there is none, or when it
        ended before the data began (then the hosts are tried on new connections)."""
        while (connection := self.connections.take((domain, mode))) is not None:
            if mode == "enforce" and policy is not None and not policy.allows(connection.remote):
                connection.close()  # the policy changed since: its hosts only
                continue
            try:
                async with asyncio.timeout(self.deadline(len(data))):
                    outcomes = await transaction(
                        connection, mail_from, recipients, data, self.timeout
                    )
            except ConnectionEnded as exc:
                if not exc.before_data:
                    return dict.fromkeys(recipients, ended(exc, connection.remote))
                log.info("%s: a kept connection ended (%s); opening a new one", domain, exc)
                return None
            except (aiosmtplib.SMTPException, TimeoutError) as exc:
                where = connection.where
                error = failure_reason(exc, where, self.deadline(len(data)))
                return dict.fromkeys(recipients, Outcome(error, remote_mta=connection.remote))
            finally:
                self.connections.keep((domain, mode), connection)  # or closed, when unfit
            return outcomes
        return None

    async def _conversation(
        self,
        domain: str,
        host: str,
        address: str,
        mode: str,
        mail_from: str,
        recipients: list[str],
        data: Outgoing,
        kept_as: str,
    ) -> dict[str, Outcome]:
        """One connection to one address of `host`; HostFailed before a transaction began.

        `kept_as`: the MTA-STS mode the connection is kept under afterwards (the policy's,
        also when testing mode went on without a checked certificate)."""
        where = f"{host}[{address}]:{self.port}"
        client = aiosmtplib.SMTP(
            hostname=address,
            port=self.port,
            start_tls=False,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
        )
        total = self.deadline(len(data))
        adopted = False
        try:
            async with asyncio.timeout(total):
                try:
                    await client.connect(timeout=self.connect_timeout)
                    await self._secure(client, domain, host, where, mode)
                    connection = await SmtpConnection.adopt(
                        client,
                        remote=host,
                        where=where,
                        pipelining=self.pipelining,
                        chunking=self.chunking,
                    )
                    adopted = True
                except HostFailed:
                    raise
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    raise HostFailed(failure_reason(exc, where, total)) from exc
                try:
                    return await transaction(connection, mail_from, recipients, data, self.timeout)
                finally:
                    self.connections.keep((domain, kept_as), connection)
        except _CertificateRejected as exc:
            if mode != "testing":
                raise
            log.warning(
                "MTA-STS policy of %s (testing): %s; delivering without checking it", domain, exc
            )
        except HostFailed:
            raise
        except ConnectionEnded as exc:
            return dict.fromkeys(recipients, ended(exc, host))
        except aiosmtplib.SMTPResponseException as exc:
            return dict.fromkeys(recipients, refusal(exc.code, exc.message, host))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            error = failure_reason(exc, where, total)
            return dict.fromkeys(recipients, Outcome(error, remote_mta=host))
        finally:
            if not adopted:
                client.close()
        return await self._conversation(
            domain, host, address, "none", mail_from, recipients, data, kept_as
        )

    async def _secure(
        self, client: aiosmtplib.SMTP, domain: str, host: str, where: str, mode: str
    ) -> None:
        """STARTTLS when offered: checked against `host` under an MTA-STS policy
        (enforce or testing), else only encrypted."""
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()  # a server from before ESMTP: no STARTTLS either
        checked = mode in {"enforce", "testing"}
        if not client.supports_extension("starttls"):
            if mode == "enforce":
                raise HostFailed(
                    f"{where} offers no STARTTLS, and the MTA-STS policy of {domain}"
                    " (enforce) requires TLS"
                )
            if mode == "testing":
                log.warning(
                    "MTA-STS policy of %s (testing): %s offers no STARTTLS; delivering anyway",
                    domain,
                    where,
                )
            return
        context = self.verified if checked else self.opportunistic
        try:
            await client.starttls(server_hostname=host, tls_context=context)
        except ssl.SSLCertVerificationError as exc:
            raise _CertificateRejected(
                f"{where}: certificate not valid for {host} (MTA-STS policy of {domain},"
                f" {mode}): {exc.verify_message or exc}"
            ) from exc
