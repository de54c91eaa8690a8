"""An offer is sealed only when its From domain has a DKIM key: the same domain the
outgoing copy is signed for (gateway.mail.outgoing.author_domain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.letters import letter_keys
from tests.conftest import relay_settings


def test_an_offer_from_a_domain_without_a_key_is_refused(
    tmp_path: Path, dkim_key_file: Path
) -> None:
    settings = relay_settings(
        tmp_path, 25, dkim={"broker.example": {"selector": "s2026", "key_file": str(dkim_key_file)}}
    )
    letter_keys.require_key(settings, b"From: Anna <anna@Broker.EXAMPLE>\r\n\r\nAngebot\r\n")
    with pytest.raises(letter_keys.UnsignedLetter) as refused:
        letter_keys.require_key(settings, b"From: anna@other.example\r\n\r\nAngebot\r\n")
    assert refused.value.reply.startswith("550 5.7.1 Registered letters from other.example")
    with pytest.raises(letter_keys.UnsignedLetter, match="an address without a domain"):
        letter_keys.require_key(settings, b"Subject: no From\r\n\r\nAngebot\r\n")
