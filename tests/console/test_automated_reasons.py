"""Why a visit counts as automated, said in the console's language: the journal keeps the
rules' English texts (the API and webhooks give them as they are)."""

from __future__ import annotations

import pytest

from gateway.texts.catalog import shipped_catalogs
from rules.automated_visits import SHIPPED_NETWORKS, Reason
from web.console.timeline import reason_said

REASONS = [
    Reason("head"),
    Reason("no_user_agent"),
    Reason("user_agent", r"safelinks|safe ?links"),
    *(Reason("network", provider, 4) for provider in dict(SHIPPED_NETWORKS)),
    Reason("network", "configured", 4),
]


@pytest.mark.parametrize("language", ["de", "en", "es"])
@pytest.mark.parametrize("reason", REASONS, ids=str)
def test_every_reason_is_said_in_every_language(language: str, reason: Reason) -> None:
    said = reason_said(str(reason), shipped_catalogs()[language])
    assert said and "{" not in said and "}" not in said
    if language != "en":
        assert said != reason_said(str(reason), shipped_catalogs()["en"])
    if reason.kind == "network":
        assert "4 s" in said
    if reason.detail in dict(SHIPPED_NETWORKS):
        assert reason.detail not in said  # "microsoft" is written "Microsoft", "aws" "AWS"
    assert "safe ?links" not in said  # a pattern is for IT, the journal keeps it


def test_german_reasons() -> None:
    german = shipped_catalogs()["de"]
    assert reason_said("HEAD request", german) == "mit HEAD abgefragt, was Browser nicht tun"
    assert reason_said("aws address, no cookie, 12 s after delivery", german) == (
        "aus dem Netz von AWS, ohne Cookie, 12 s nach der Zustellung"
    )


def test_a_text_the_rules_never_wrote_is_shown_as_it_is() -> None:
    assert reason_said("flagged by hand", shipped_catalogs()["de"]) == "flagged by hand"
