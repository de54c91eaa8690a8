"""The admins' read-only settings pages: the effective policy per group, the consent texts per
block set and language, and the DKIM records with a DNS check against a real DNS server on
loopback. Pages are fetched over real HTTP from a running relay, on both databases."""

from __future__ import annotations

import asyncio
import html
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import users
from gateway.config import Settings
from gateway.console.api_keys import ApiKeyDesk
from gateway.console.dkim_records import (
    DkimRecord,
    DnsState,
    check_records,
    compare,
    dkim_records,
)
from gateway.console.effective_policy import policy_overview
from gateway.dns_lookup import DnsLookup, TxtAnswer
from gateway.letters.blocks import BlockSets
from gateway.letters.evidence import texts_sha256
from gateway.mail import dkim
from gateway.store.models import ApiKeyScope, Role, utcnow
from gateway.texts.files import SHIPPED_BLOCK_SET
from rules.policy import MiB
from tests.conftest import AGENT, DKIM_DOMAIN, DKIM_SELECTOR, PASSWORD, Harness, StartRelay
from tests.console.client import ConsoleClient
from tests.dns_server import silent_port, tiny_dns

ADMIN = "admin@broker.example"
AUDITOR = "auditor@broker.example"
RECORD = f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}"
EVIL = "<script>alert(1)</script>"
POLICY_SECTIONS: dict[str, Any] = {
    "policy": {"download_link_days": 60},
    "groups": [
        {"name": "video", "download_link_days": 30, "link_attachments_over": "5MiB"},
        {"name": "nord"},
    ],
    "rules": [
        {
            "name": "big-films",
            "match": {"groups": ["video"], "filenames": ["*.mp4"]},
            "set": {"always_link": ["video/*"], "download_link_days": 7},
        },
        {"name": "partners", "match": {"recipient_domains": ["partner.example"]}, "set": {}},
    ],
}


def visible(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


# -- the effective policy, pure


def test_each_groups_values_name_their_source_and_the_rules_that_may_change_them(
    tmp_path: Path,
) -> None:
    settings = Settings.model_validate(POLICY_SECTIONS)
    overview = policy_overview(settings.policy_config())
    assert [g.group for g in overview.groups] == [None, "video", "nord"]
    values = {g.group: {v.name: v for v in g.values} for g in overview.groups}
    assert values[None]["download_link_days"].value == 60
    assert values[None]["download_link_days"].source == "default"
    assert values["video"]["download_link_days"].value == 30
    assert values["video"]["download_link_days"].source == "group video"
    assert values["video"]["link_attachments_over"].value == 5 * MiB
    assert values["nord"]["download_link_days"].source == "default"
    # the rule for group video may change its values, never another group's
    assert values["video"]["download_link_days"].rules == ("big-films",)
    assert values["video"]["always_link"].rules == ("big-films",)
    assert values["nord"]["download_link_days"].rules == ()
    assert values[None]["always_link"].rules == ()
    [films, partners] = overview.rules
    assert films.match.filenames == ("*.mp4",)
    assert films.changes == (("always_link", frozenset({"video/*"})), ("download_link_days", 7))
    assert partners.changes == ()


# -- the DNS check


async def test_the_dns_check_tells_found_different_missing_and_remembers_answers(
    dkim_key: dkim.DkimKey,
) -> None:
    ours = DkimRecord(DKIM_DOMAIN, DKIM_SELECTOR, RECORD, dkim.public_txt_value(dkim_key), None)
    other = dkim.public_txt_value(dkim.generate_private_key(1024))
    assert all(len(part) <= 255 for part in ours.strings) and len(ours.strings) > 1
    assert "".join(ours.strings) == ours.value
    zone = {
        RECORD: [ours.strings],
        f"old._domainkey.{DKIM_DOMAIN}": [("v=DKIM1; k=rsa; ", other[len("v=DKIM1; k=rsa; ") :])],
        f"spf._domainkey.{DKIM_DOMAIN}": [("v=spf1 -all",)],
    }
    async with tiny_dns(zone) as (server, port):
        lookup = DnsLookup(("127.0.0.1", port))
        old = DkimRecord(DKIM_DOMAIN, "old", f"old._domainkey.{DKIM_DOMAIN}", ours.value, None)
        spf = DkimRecord(DKIM_DOMAIN, "spf", f"spf._domainkey.{DKIM_DOMAIN}", ours.value, None)
        gone = DkimRecord(DKIM_DOMAIN, "gone", f"gone._domainkey.{DKIM_DOMAIN}", ours.value, None)
        checked = await check_records((ours, old, spf, gone), lookup)
        assert [c.check.state for c in checked] == [
            DnsState.FOUND,
            DnsState.DIFFERENT,
            DnsState.MISSING,
            DnsState.MISSING,
        ]
        assert checked[1].check.published == (other,)
        asked = len(server.questions)
        assert asked == 4
        # asked again at once: from memory, and side by side questions for one name ask once
        await asyncio.gather(*(lookup.txt(RECORD.upper()) for _ in range(5)))
        assert len(server.questions) == asked
        fresh = DnsLookup(("127.0.0.1", port))
        await asyncio.gather(*(fresh.txt(f"new._domainkey.{DKIM_DOMAIN}") for _ in range(5)))
        assert len(server.questions) == asked + 1
    off = await check_records((ours,), DnsLookup(("127.0.0.1", 9), enabled=False))
    assert off[0].check.state is DnsState.OFF
    no_key = DkimRecord(DKIM_DOMAIN, "x", "x._domainkey.broker.example", None, "unreadable")
    assert compare(no_key, TxtAnswer(reachable=True)).state is DnsState.NO_KEY
    # a zone that spaces out p= still matches
    spaced = ours.value.replace("p=", "p= ").replace(ours.value[-20:], " " + ours.value[-20:])
    assert compare(ours, TxtAnswer(True, (spaced,))).state is DnsState.FOUND


async def test_dns_out_of_reach_is_not_checked_and_remembered_briefly(
    dkim_key: dkim.DkimKey,
) -> None:
    ours = DkimRecord(DKIM_DOMAIN, DKIM_SELECTOR, RECORD, dkim.public_txt_value(dkim_key), None)
    now = [0.0]
    async with silent_port() as port:
        lookup = DnsLookup(("127.0.0.1", port), timeout=0.3, clock=lambda: now[0])
        [checked] = await check_records((ours,), lookup)
        assert checked.check.state is DnsState.UNREACHABLE
    async with tiny_dns({RECORD: [ours.strings]}) as (server, port2):
        lookup.server = ("127.0.0.1", port2)
        [again] = await check_records((ours,), lookup)
        assert again.check.state is DnsState.UNREACHABLE and server.questions == []
        now[0] += 31  # a failure is remembered for 30 s only
        [later] = await check_records((ours,), lookup)
        assert later.check.state is DnsState.FOUND


def test_a_dns_resolver_must_be_an_address_and_port() -> None:
    for bad in ("dns.example:53", "127.0.0.1", "127.0.0.1:0", "[::1]:x"):
        with pytest.raises(ValueError, match="dns_resolver"):
            Settings.model_validate({"console": {"dns_resolver": bad}})
    assert Settings.model_validate({"console": {"dns_resolver": "[::1]:5353"}})
    assert DnsLookup.configured(True, "[::1]:5353").server == ("::1", 5353)
    assert DnsLookup.configured(False, None).server is None


def test_an_unreadable_key_file_is_named_not_fatal(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"dkim": {"Other.Example": {"selector": "s1", "key_file": str(tmp_path / "missing")}}}
    )
    [record] = dkim_records(settings)
    assert record.domain == "other.example" and record.value is None
    assert record.problem is not None and "cannot read" in record.problem
    assert record.strings == ()


# -- the pages


@pytest.fixture
def evil_block_set(tmp_path: Path) -> Path:
    """The shipped set, its English subject and a block title carrying markup."""
    directory = tmp_path / "evil-set"
    shutil.copytree(SHIPPED_BLOCK_SET, directory)
    blocks = directory / "en" / "blocks.toml"
    text = blocks.read_text(encoding="utf-8")
    text = text.replace('letter_subject = "', f'letter_subject = "{EVIL} ', 1)
    text = text.replace('title = "Privacy notice"', 'title = "Privacy <b>notice</b>"')
    blocks.write_text(text, encoding="utf-8")
    return directory


async def admin_console(relay: Harness, who: str = ADMIN, role: Role = Role.ADMIN) -> Any:
    await users.add_user(relay.relay.db, who, PASSWORD, role=role)
    console = ConsoleClient(relay.web_url)
    await console.__aenter__()
    answer = await console.sign_in(who, PASSWORD)
    assert answer.status == 303, answer.text
    return console


@pytest.fixture
async def consoles() -> AsyncIterator[list[ConsoleClient]]:
    opened: list[ConsoleClient] = []
    yield opened
    for console in opened:
        await console.__aexit__(None, None, None)


async def test_admin_reads_the_policy_the_texts_and_the_dkim_record(
    relay_factory: StartRelay,
    evil_block_set: Path,
    consoles: list[ConsoleClient],
    dkim_key: dkim.DkimKey,
) -> None:
    value = dkim.public_txt_value(dkim_key)
    ours = DkimRecord(DKIM_DOMAIN, DKIM_SELECTOR, RECORD, value, None)
    async with tiny_dns({RECORD: [ours.strings]}) as (server, port):
        sections = dict(POLICY_SECTIONS)
        evil_group = {"name": "evil", "letter_block_set": "evil"}
        sections["groups"] = [*POLICY_SECTIONS["groups"], evil_group]
        relay = await relay_factory(
            console={"dns_checks": True, "dns_resolver": f"127.0.0.1:{port}"},
            letter={"block_sets": {"evil": str(evil_block_set)}},
            **sections,
        )
        admin = await admin_console(relay)
        consoles.append(admin)

        index = await admin.get("/console/admin")
        for path in ("/console/admin/policy", "/console/admin/texts", "/console/admin/dkim"):
            assert f'href="{path}"' in index.text

        policy = await admin.get("/console/admin/policy")
        assert policy.status == 200
        shown = visible(policy.text)
        assert "Senders without a group" in shown and "Group video" in shown
        assert "Download links valid for download_link_days 30 days Set by: group video" in shown
        assert "60 days Set by: default" in shown
        assert "5.2 MB (5 MiB)" in shown  # in the units file managers show, and the settings
        assert "A rule may change it: big-films" in shown
        assert "File names: *.mp4" in shown and "Groups: video" in shown
        assert "Always link (types or file names) always_link : video/*" in shown
        assert "Recipient domains: partner.example" in shown

        texts = await admin.get("/console/admin/texts")
        assert texts.status == 200
        assert EVIL not in texts.text and "<b>notice</b>" not in texts.text
        assert html.escape(EVIL, quote=False) in texts.text
        sets = BlockSets(relay.settings)
        for name in ("default", "evil"):
            for language in ("de", "en", "es"):
                digest = texts_sha256(sets.get(name, language).blocks)
                assert f"sha256:{digest}" in texts.text
        assert texts_sha256(sets.get("evil", "en").blocks) != texts_sha256(
            sets.get("default", "en").blocks
        )
        shown = visible(texts.text)
        assert "Block set evil · EN" in shown
        assert "{company} from [branding] company_name" in shown
        assert "{recipient_name} filled for each letter" in shown
        assert "Privacy <b>notice</b>" in shown

        page = await admin.get("/console/admin/dkim")
        assert page.status == 200
        assert RECORD in page.text and value in page.text
        for part in ours.strings:
            assert part in page.text
        assert "Published: DNS shows this key." in visible(page.text)
        assert server.questions == [RECORD]

    # the server is gone: the answer it gave is remembered for the next visit
    again = await admin.get("/console/admin/dkim")
    assert "Published: DNS shows this key." in visible(again.text)

    auditor = await admin_console(relay, AUDITOR, Role.AUDITOR)
    consoles.append(auditor)
    for path in ("/console/admin/policy", "/console/admin/texts", "/console/admin/dkim"):
        assert (await auditor.get(path)).status == 200
    agent = ConsoleClient(relay.web_url)
    await agent.__aenter__()
    consoles.append(agent)
    assert (await agent.sign_in(AGENT, PASSWORD)).status == 303
    for path in ("/console/admin/policy", "/console/admin/texts", "/console/admin/dkim"):
        assert (await agent.get(path)).status == 403


async def test_the_dkim_page_without_dns(
    relay_factory: StartRelay, consoles: list[ConsoleClient]
) -> None:
    relay = await relay_factory()  # the tests' settings: dns_checks = false
    admin = await admin_console(relay)
    consoles.append(admin)
    page = visible((await admin.get("/console/admin/dkim")).text)
    assert "Not checked (DNS checks are off: [console] dns_checks)." in page
    assert RECORD in page


async def test_the_dkim_page_when_dns_does_not_answer(
    relay_factory: StartRelay, consoles: list[ConsoleClient]
) -> None:
    async with silent_port() as port:
        relay = await relay_factory(
            console={"dns_checks": True, "dns_resolver": f"127.0.0.1:{port}"}
        )
        admin = await admin_console(relay)
        consoles.append(admin)
        answer = await admin.get("/console/admin/dkim")
    assert answer.status == 200
    assert "Not checked (DNS unreachable)." in visible(answer.text)
    german = ConsoleClient(relay.web_url, language="de")
    await german.__aenter__()
    consoles.append(german)
    assert (await german.sign_in(ADMIN, PASSWORD)).status == 303
    assert "Nicht geprüft (DNS nicht erreichbar)." in visible(
        (await german.get("/console/admin/dkim")).text
    )


# -- the same through the API


async def test_the_api_gives_the_same_three_as_data(
    relay_factory: StartRelay, dkim_key: dkim.DkimKey
) -> None:
    ours = DkimRecord(DKIM_DOMAIN, DKIM_SELECTOR, RECORD, dkim.public_txt_value(dkim_key), None)
    async with tiny_dns({RECORD: [ours.strings]}) as (server, port):
        relay = await relay_factory(
            console={"dns_checks": True, "dns_resolver": f"127.0.0.1:{port}"}, **POLICY_SECTIONS
        )
        desk = ApiKeyDesk(relay.relay.db, utcnow)
        key = (await desk.create("audit", ApiKeyScope.READ, "test")).key
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> Any:
                async with http.get(relay.web_url + path, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    return await response.json()

            policy = await get("/api/v1/settings/policy")
            texts = await get("/api/v1/settings/consent-texts")
            records = await get("/api/v1/settings/dkim")
            async with http.get(relay.web_url + "/api/v1/settings/dkim") as response:
                assert response.status == 401
            document = await get("/api/v1/openapi.json")
    assert {"/api/v1/settings/policy", "/api/v1/settings/dkim"} <= set(document["paths"])
    video = next(g for g in policy["groups"] if g["group"] == "video")
    values = {v["name"]: v for v in video["values"]}
    assert values["download_link_days"] == {
        "name": "download_link_days",
        "value": 30,
        "source": "group video",
        "rules": ["big-films"],
    }
    assert values["link_attachments_over"]["value"] == 5 * MiB
    assert values["registered_letter"]["value"] is False
    assert values["keep_attached"]["value"] == ["text/calendar", "text/vcard", "text/x-vcard"]
    assert policy["groups"][0]["group"] is None
    assert policy["rules"][0]["sets"] == {"always_link": ["video/*"], "download_link_days": 7}
    assert policy["rules"][0]["match"]["filenames"] == ["*.mp4"]
    sets = BlockSets(relay.settings)
    by_language = {s["language"]: s for s in texts["items"] if s["name"] == "default"}
    assert sorted(by_language) == ["de", "en", "es"]
    for language, shown in by_language.items():
        assert shown["texts_sha256"] == texts_sha256(sets.get("default", language).blocks)
    intro = next(t for t in by_language["en"]["letter"] if t["place"] == "intro")
    assert {"name": "company", "origin": "setting", "setting": "[branding] company_name"} in intro[
        "placeholders"
    ]
    [record] = records["items"]
    assert record["name"] == RECORD and record["value"] == ours.value
    assert record["strings"] == list(ours.strings)
    assert record["dns"] == "found" and record["published"] == [ours.value]
    assert server.questions == [RECORD]
