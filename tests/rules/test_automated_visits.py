"""Scanner or person: the pure classifier, table-driven and with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.automated_visits import (
    SHIPPED_NETWORKS,
    SHIPPED_USER_AGENTS,
    Reason,
    ScannerRules,
    VisitFacts,
    classify,
)

RULES = ScannerRules()
BROWSER = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
HOME = "91.64.12.7"  # a German cable customer: no shipped range holds it
DEFENDER = "40.92.20.3"  # Exchange Online Protection
AWS = "3.120.5.9"


def visit(
    method: str = "GET",
    agent: str = BROWSER,
    cookie: bool = False,
    ip: str = HOME,
    seconds: float = 5,
) -> VisitFacts:
    return VisitFacts(method, agent, cookie, ip, seconds)


@pytest.mark.parametrize(
    ("facts", "automated", "reason"),
    [
        (visit(), False, None),
        (visit(agent=DESKTOP, seconds=3600), False, None),
        (visit(method="HEAD"), True, "HEAD request"),
        (visit(method="head", agent=DESKTOP), True, "HEAD request"),
        (visit(agent=""), True, "no user agent"),
        (visit(agent="Mozilla/5.0 (compatible; Googlebot/2.1)"), True, "scanner user agent"),
        (visit(agent="python-requests/2.32.3"), True, "scanner user agent"),
        (visit(agent="Microsoft Office/16.0 (Windows NT 10.0)"), True, "scanner user agent"),
        (visit(agent="Proofpoint URL Defense"), True, "scanner user agent"),
        (visit(agent="curl/8.5.0"), True, "scanner user agent"),
        (visit(agent="facebookexternalhit/1.1"), True, "scanner user agent"),
        (visit(ip=DEFENDER, seconds=4), True, "microsoft address"),
        (visit(ip=AWS, seconds=119), True, "aws address"),
        (visit(ip="::ffff:40.92.20.3", seconds=1), True, "microsoft address"),
        (visit(ip="2a01:111:f400:7e1c::5", seconds=1), True, "microsoft address"),
        # a person on a data-centre VPN: after the window, or with a cookie, still a person
        (visit(ip=DEFENDER, seconds=121), False, None),
        (visit(ip=AWS, seconds=30, cookie=True), False, None),
        (visit(ip="not an address", seconds=1), False, None),
        (visit(ip="", seconds=1), False, None),
    ],
)
def test_table(facts: VisitFacts, automated: bool, reason: str | None) -> None:
    verdict = classify(facts, RULES)
    assert verdict.automated is automated
    if reason is None:
        assert verdict.reasons == ()
    else:
        assert any(reason in r for r in verdict.reasons), verdict.reasons


def test_reasons_accumulate() -> None:
    verdict = classify(visit("HEAD", "Mimecast", False, DEFENDER, 2), RULES)
    assert len(verdict.reasons) == 3


def test_configured_networks_and_agents() -> None:
    rules = ScannerRules.configured(
        window_seconds=10,
        extra_user_agents=[r"^AcmeGuard/"],
        extra_networks=["192.0.2.0/24"],
        shipped_networks=False,
    )
    assert classify(visit(agent="AcmeGuard/2 (mail check)"), rules).automated
    assert classify(visit(ip="192.0.2.9", seconds=10), rules).reasons == (
        "configured address, no cookie, 10 s after delivery",
    )
    assert not classify(visit(ip="192.0.2.9", seconds=11), rules).automated
    assert not classify(visit(ip=DEFENDER, seconds=1), rules).automated  # shipped ones off
    assert not classify(visit(agent=BROWSER), rules).automated


def test_shipped_networks_parse() -> None:
    assert len(RULES.parsed_networks) == len(SHIPPED_NETWORKS)


@given(
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    agent=st.text(max_size=80),
    cookie=st.booleans(),
    ip=st.one_of(st.ip_addresses().map(str), st.text(max_size=20)),
    seconds=st.floats(min_value=-1e6, max_value=1e9, allow_nan=False),
)
def test_properties(method: str, agent: str, cookie: bool, ip: str, seconds: float) -> None:
    verdict = classify(visit(method, agent, cookie, ip, seconds), RULES)
    assert verdict.automated == bool(verdict.reasons)
    if method == "HEAD":
        assert verdict.automated
    # never the address alone once the window is over, nor with a cookie
    late = classify(
        visit(method, BROWSER, cookie, ip, RULES.window_seconds + 1 + abs(seconds)), RULES
    )
    assert late.automated == (method == "HEAD")
    with_cookie = classify(visit("GET", BROWSER, True, ip, seconds), RULES)
    assert not with_cookie.automated


@pytest.mark.parametrize(
    "reason",
    [
        Reason("head"),
        Reason("no_user_agent"),
        *(Reason("user_agent", pattern) for pattern in SHIPPED_USER_AGENTS),
        Reason("user_agent", r"^Acme \(Guard\) scan(ner)?"),
        *(Reason("network", provider, 7) for provider, _ in SHIPPED_NETWORKS),
        Reason("network", "configured", 0),
    ],
)
def test_a_reason_reads_back_from_its_journaled_text(reason: Reason) -> None:
    assert Reason.read(str(reason)) == reason


def test_classify_writes_reasons_that_read_back() -> None:
    verdict = classify(visit("HEAD", "", False, DEFENDER, 2.7), RULES)
    assert [Reason.read(text) for text in verdict.reasons] == [
        Reason("head"),
        Reason("no_user_agent"),
        Reason("network", "microsoft", 2),
    ]


@pytest.mark.parametrize("text", ["", "HEAD", "a person", "scanner user agent", "x address"])
def test_other_texts_are_no_reason(text: str) -> None:
    assert Reason.read(text) is None
