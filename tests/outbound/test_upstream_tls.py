"""The upstream's TLS context: verified when configured, and then only."""

from __future__ import annotations

import ssl

from gateway.outbound.upstream import client_tls_context


def test_a_verified_upstream_checks_the_certificate_and_its_name() -> None:
    context = client_tls_context(verify=True)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_an_unverified_upstream_still_encrypts_and_reads_no_ca_store() -> None:
    context = client_tls_context(verify=False)
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
