"""One domain in its forms: rules/domains.py, and every place that compares domains with it
(rules, routes, a trusted client's domains, the DKIM key of a From)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.config import Settings
from gateway.fronts.trusted import sends_for
from gateway.letters import letter_keys
from gateway.mail.outgoing import Signer
from gateway.outbound.local_mail import own_sender
from gateway.outbound.routes import RouteTable
from rules import internal_recipient
from rules.actions import KeepOriginal
from rules.domains import ascii_domain, domain_key
from rules.matching import Match
from rules.policy import Policy
from tests.rules.test_rules import facts as rule_facts

BUECHER = "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("domain", "a_labels"),
    [
        ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008: not strasse.de, another domain
        ("Müller.DE", "xn--mller-kva.de"),
        ("例子.广告", "xn--fsqu00a.xn--4rr70v"),
        ("xn--mller-kva.de", "xn--mller-kva.de"),
        ("Example.COM", "Example.COM"),  # ASCII as it is; domain_key lowers it
    ],
)
def test_a_domain_in_a_labels(domain: str, a_labels: str) -> None:
    assert ascii_domain(domain) == a_labels


@pytest.mark.parametrize("domain", ["ü..de", "-bad-ü.de", "ü" * 64 + ".de"])
def test_what_is_no_domain_has_no_a_labels_and_equals_only_itself(domain: str) -> None:
    with pytest.raises(ValueError):
        ascii_domain(domain)
    assert domain_key(domain) == domain.lower()


@pytest.mark.parametrize("form", ["bücher.example", "Bücher.Example.", BUECHER, " BÜCHER.example"])
def test_every_form_of_a_domain_has_one_key(form: str) -> None:
    assert domain_key(form) == BUECHER


def test_rules_match_a_recipient_or_sender_domain_in_either_form() -> None:
    facts = rule_facts(recipients=("jörg@bücher.example",), sender="anna@Müller-Immobilien.de")
    assert Match(recipient_domains=(BUECHER,)).matches(facts, "jörg@bücher.example")
    assert Match(recipient_domains=("Bücher.example",)).matches(facts, f"p@{BUECHER}")
    assert not Match(recipient_domains=("bucher.example",)).matches(facts, "p@bücher.example")
    assert Match(senders=("@xn--mller-immobilien-jzb.de",)).matches(facts, "p@example.com")
    assert Match(senders=("@müller-immobilien.de",)).matches(facts, "p@example.com")
    assert Match(senders=("Anna@xn--mller-immobilien-jzb.de",)).matches(facts, "p@example.com")
    assert Match(senders=("anna@MÜLLER-immobilien.de",)).matches(facts, "p@example.com")
    assert not Match(senders=("ann@müller-immobilien.de",)).matches(facts, "p@example.com")


def test_a_route_for_a_domain_takes_it_in_either_form() -> None:
    settings = Settings.model_validate(
        {
            "upstream": {"url": "smtp://default.example"},
            "upstreams": {"a": {"url": "smtp://a.example"}},
            "routes": [{"name": "books", "upstream": "a", "recipient_domains": ["Bücher.example"]}],
        }
    )
    assert settings.routes[0].recipient_domains == [BUECHER]
    routes = RouteTable.open(settings)
    agent = SimpleNamespace(sender="agent@broker.example", trusted_entry=None)
    assert routes.route_for(agent, "jörg@bücher.example").name == "books"
    assert routes.route_for(agent, f"p@{BUECHER}").name == "books"
    assert routes.route_for(agent, "p@bucher.example").name == "default"


def test_a_trusted_client_sends_for_a_domain_in_either_form() -> None:
    assert sends_for(frozenset({BUECHER}), "office@Bücher.example")
    assert sends_for(frozenset({domain_key("bücher.example")}), f"office@{BUECHER}")
    assert not sends_for(frozenset({BUECHER}), "office@bucher.example")


def test_the_dkim_key_of_a_from_domain_in_either_form() -> None:
    key = SimpleNamespace(domain=BUECHER)
    signer = Signer({BUECHER: key})  # type: ignore[dict-item]
    assert signer.key_for("bücher.example") is key
    assert signer.key_for("BÜCHER.example") is key
    assert signer.key_for(BUECHER) is key
    assert signer.key_for("bucher.example") is None


def test_the_dkim_table_names_a_domain_by_its_key_for_every_reader(tmp_path: Path) -> None:
    """`[dkim."Bücher.example"]` is the key DNS publishes under `xn--bcher-kva.example`: an
    offer from either form has its key, the relay's own mail to an agent there comes from
    that domain, and no rule or internal domain in either form is reported unsigned."""
    settings = Settings.model_validate(
        {
            "dkim": {"Bücher.example": {"selector": "s1", "key_file": str(tmp_path / "k.pem")}},
            "policy": {"internal_domains": [BUECHER]},
            "rules": [
                {
                    "name": "offers",
                    "match": {"senders": ["anna@bücher.example"]},
                    "set": {"registered_letter": True},
                }
            ],
        }
    )
    assert list(settings.dkim) == [BUECHER]
    for author in ("anna@bücher.example", f"anna@{BUECHER}"):
        letter_keys.require_key(settings, f"From: {author}\r\n\r\nx\r\n".encode())
    with pytest.raises(letter_keys.UnsignedLetter):
        letter_keys.require_key(settings, b"From: anna@bucher.example\r\n\r\nx\r\n")
    assert own_sender(settings, "anna@bücher.example") == f"postmaster@{BUECHER}"
    assert letter_keys.problems(settings) == []


def test_an_internal_domain_in_either_form_keeps_the_original() -> None:
    facts = rule_facts(recipients=("kollege@bücher.example",))
    for internal in (BUECHER, "Bücher.example"):
        policy = Policy(internal_domains=frozenset({internal}))
        for recipient in ("kollege@bücher.example", f"kollege@{BUECHER}"):
            assert isinstance(internal_recipient.decide(facts, recipient, policy), KeepOriginal)
    assert internal_recipient.decide(facts, "p@bucher.example", Policy()) is None


def test_the_milters_domains_in_either_form() -> None:
    settings = Settings.model_validate(
        {"milter": {"listen": "127.0.0.1:8891", "domains": ["Bücher.example."]}}
    )
    assert settings.milter.domains == [BUECHER]
    assert sends_for(frozenset(settings.milter.domains), "office@bücher.example")
