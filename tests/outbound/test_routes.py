"""Routes (`[[routes]]`, gateway/outbound/routes.py): each copy leaves through the upstream
its first matching route names, else `[upstream]`; every attempt records the route it took.

Every relay here runs against real SMTP sinks, one per upstream, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from gateway import users
from gateway.config import ConfigError, Settings, load_settings, validation_problems
from gateway.config_check import check_config
from gateway.console.api_keys import ApiKeyDesk
from gateway.outbound.routes import RouteTable, describe_routes
from gateway.store.models import ApiKeyScope, DeliveryStatus, Role, utcnow
from tests.browser import CHROMIUM, CHROMIUM_ARGS, PHONE, playwright_api
from tests.cli_runner import sealrelay, write_config
from tests.conftest import AGENT, PASSWORD, StartRelay, make_message
from tests.console.browser_sign_in import sign_in
from tests.fronts.test_trusted_front import INSIDE, PROSPECT, SERVED, Client, message
from tests.outbound.test_delivery import deliveries, events, eventually, queued_id
from tests.support import Sink, free_port


@pytest.fixture
async def other_sink() -> AsyncIterator[Sink]:
    server = await Sink().start()
    yield server
    await server.stop()


def upstream_at(port: int) -> dict[str, Any]:
    return {"url": f"smtp://127.0.0.1:{port}", "verify_tls": False, "timeout": 10}


async def settled(harness: Any, count: int) -> list[Any]:
    """The message's deliveries once `count` of them have been attempted at least once."""

    async def attempted() -> list[Any] | None:
        rows = await deliveries(harness.relay.db)
        return rows if sum(d.attempts >= 1 for d in rows) >= count else None

    return await eventually(attempted)


# -- through a running relay


async def test_per_recipient_domain_one_message_leaves_as_two_transactions(
    relay_factory: StartRelay, other_sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.outbound.delivery")
    relay = await relay_factory(
        upstreams={"partner": upstream_at(other_sink.port)},
        routes=[
            {"name": "to-partner", "upstream": "partner", "recipient_domains": ["Two.Example"]}
        ],
    )
    to = ["a@one.example", "b@two.example", "c@TWO.example"]
    message_id = queued_id(await relay.send(make_message(to=", ".join(to))))

    [default_copy] = await relay.sink.expect(1)
    [partner_copy] = await other_sink.expect(1)
    assert default_copy.rcpt_tos == ["a@one.example"]
    # the two copies for two.example share a blob and a route: one transaction
    assert sorted(partner_copy.rcpt_tos) == ["b@two.example", "c@TWO.example"]

    rows = await eventually(lambda: _all_delivered(relay.relay.db, message_id, 3))
    assert {d.recipient: d.route for d in rows} == {
        "a@one.example": "default",
        "b@two.example": "to-partner",
        "c@TWO.example": "to-partner",
    }
    delivered = {e.delivery_id: e.data for e in await events(relay.relay.db, "delivery.delivered")}
    assert {delivered[d.id]["route"] for d in rows} == {"default", "to-partner"}
    assert all(delivered[d.id]["route"] == d.route for d in rows)
    lines = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert any("to=<a@one.example>" in line and f":{relay.sink.port}," in line for line in lines)
    assert any("to=<b@two.example>" in line and f":{other_sink.port}," in line for line in lines)


async def _all_delivered(db: Any, message_id: str, count: int) -> list[Any] | None:
    rows = await deliveries(db, message_id)
    done = len(rows) == count and all(d.status == DeliveryStatus.DELIVERED for d in rows)
    return rows if done else None


async def test_per_sender_domain_and_the_fallback(
    relay_factory: StartRelay, other_sink: Sink
) -> None:
    relay = await relay_factory(
        upstreams={"branch": upstream_at(other_sink.port)},
        routes=[
            # both conditions must hold: this one never matches the agent's mail
            {
                "name": "never",
                "upstream": "branch",
                "sender_domains": ["broker.example"],
                "recipient_domains": ["nowhere.example"],
            },
            {"name": "broker", "upstream": "branch", "sender_domains": ["broker.example"]},
        ],
    )
    first = queued_id(await relay.send(make_message(to="p@example.com")))
    [copy] = await other_sink.expect(1)
    assert copy.mail_from == AGENT and copy.rcpt_tos == ["p@example.com"]
    [row] = await eventually(lambda: _all_delivered(relay.relay.db, first, 1))
    assert row.route == "broker"
    assert relay.sink.messages == []

    # the null sender has no domain: no sender route takes it, the fallback does
    table = RouteTable.open(relay.settings)
    bounce = SimpleNamespace(sender="", trusted_entry=None)
    assert table.route_for(bounce, "p@example.com").name == "default"
    other = SimpleNamespace(sender="someone@elsewhere.example", trusted_entry=None)
    assert table.route_for(other, "p@example.com").upstream_name == "default"


async def test_per_trusted_entry_back_to_m365(relay_factory: StartRelay, other_sink: Sink) -> None:
    relay = await relay_factory(
        smtp={
            "trusted": [{"name": "m365", "service": "Microsoft 365", "networks": [f"{INSIDE}/32"]}]
        },
        upstreams={"m365": upstream_at(other_sink.port)},
        routes=[{"name": "back-to-m365", "upstream": "m365", "trusted": ["m365"]}],
    )
    client = await Client.open(relay.smtp_port, INSIDE)
    try:
        assert (await client.command("EHLO connector.example")).startswith("250")
        assert (await client.command(f"MAIL FROM:<{SERVED}>")).startswith("250")
        assert (await client.command(f"RCPT TO:<{PROSPECT}>")).startswith("250")
        assert (await client.command("DATA")).startswith("354")
        client.writer.write(message(SERVED) + b".\r\n")
        assert (await client.reply()).startswith("250 2.0.0 Ok: queued as")
    finally:
        await client.close()
    [through_m365] = await other_sink.expect(1)
    assert through_m365.mail_from == SERVED
    # the same sender's domain, logged in as an agent: not through the entry, so the default
    await relay.send(make_message(to=PROSPECT))
    [by_login] = await relay.sink.expect(1)
    assert by_login.mail_from == AGENT
    rows = await settled(relay, 2)
    assert sorted(d.route or "" for d in rows) == ["back-to-m365", "default"]
    assert len(other_sink.messages) == 1


async def test_a_route_whose_upstream_is_down_defers_only_its_copies(
    relay_factory: StartRelay,
) -> None:
    down = free_port()  # nothing listens there
    relay = await relay_factory(
        upstreams={"down": upstream_at(down)},
        routes=[{"name": "via-down", "upstream": "down", "recipient_domains": ["two.example"]}],
    )
    message_id = queued_id(await relay.send(make_message(to="a@one.example, b@two.example")))
    [copy] = await relay.sink.expect(1)
    assert copy.rcpt_tos == ["a@one.example"]
    rows = {d.recipient: d for d in await settled(relay, 2)}
    assert rows["b@two.example"].status == DeliveryStatus.QUEUED
    assert rows["b@two.example"].route == "via-down"
    assert f"127.0.0.1:{down}" in (rows["b@two.example"].last_error or "")
    await eventually(lambda: _delivered(relay.relay.db, message_id, "a@one.example"))
    deferred = await events(relay.relay.db, "delivery.deferred")
    assert deferred and {e.data["route"] for e in deferred} == {"via-down"}
    assert {e.delivery_id for e in deferred} == {rows["b@two.example"].id}
    assert relay.sink.to("b@two.example") == []

    # the API shows the route where it shows the copies: the queue and the message's events
    key = (await ApiKeyDesk(relay.relay.db, utcnow).create("r", ApiKeyScope.READ, "t")).key
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.get(f"{relay.web_url}/api/v1/queue") as response:
            assert response.status == 200
            items = {i["recipient"]: i for i in (await response.json())["items"]}
        async with http.get(f"{relay.web_url}/api/v1/messages/{message_id}") as response:
            assert response.status == 200
            detail = await response.json()
    assert items["b@two.example"]["route"] == "via-down"
    assert set(items) == {"b@two.example"}
    told = {r["address"]: r["events"] for r in detail["recipients"]}
    assert {e["data"].get("route") for e in told["a@one.example"]} >= {"default"}
    assert {e["data"].get("route") for e in told["b@two.example"]} >= {"via-down"}


async def test_queued_mail_follows_a_route_added_later(
    relay_factory: StartRelay, other_sink: Sink
) -> None:
    """The route is decided at each attempt, not when the copy was queued."""
    first = await relay_factory()
    await first.sink.stop()
    message_id = queued_id(await first.send(make_message(to="p@partner.example")))
    [waiting] = await settled(first, 1)
    assert waiting.status == DeliveryStatus.QUEUED and waiting.route == "default"
    await first.relay.stop()

    await relay_factory(
        upstreams={"partner": upstream_at(other_sink.port)},
        routes=[
            {"name": "to-partner", "upstream": "partner", "recipient_domains": ["partner.example"]}
        ],
    )
    [copy] = await other_sink.expect(1)
    assert copy.rcpt_tos == ["p@partner.example"]
    [row] = await eventually(lambda: _all_delivered(first.relay.db, message_id, 1))
    assert row.route == "to-partner"
    routes = [
        e.data["route"]
        for e in await events(first.relay.db, "delivery.deferred", "delivery.delivered")
    ]
    assert routes[0] == "default" and routes[-1] == "to-partner"


async def _delivered(db: Any, message_id: str, recipient: str) -> bool:
    rows = await deliveries(db, message_id)
    return any(d.recipient == recipient and d.status == DeliveryStatus.DELIVERED for d in rows)


# -- the table on its own


def table(*routes: dict[str, Any], trusted: list[dict[str, Any]] | None = None) -> RouteTable:
    settings = Settings.model_validate(
        {
            "smtp": {"trusted": trusted or []},
            "upstream": {"url": "smtp://default.example"},
            "upstreams": {
                "a": {"url": "smtp://a.example"},
                "b": {"url": "smtps://b.example:2465"},
            },
            "routes": list(routes),
        }
    )
    return RouteTable.open(settings)


def test_first_match_wins_and_lists_or_within() -> None:
    routes = table(
        {"name": "first", "upstream": "a", "recipient_domains": ["x.example", "y.example"]},
        {"name": "second", "upstream": "b", "recipient_domains": ["y.example", "z.example"]},
    )
    agent = SimpleNamespace(sender="agent@broker.example", trusted_entry=None)
    assert routes.route_for(agent, "p@Y.example.").name == "first"
    assert routes.route_for(agent, "p@x.example").upstream_name == "a"
    chosen = routes.route_for(agent, "p@z.example")
    assert (chosen.name, chosen.upstream_name, chosen.relay) == ("second", "b", "b.example:2465")
    assert routes.route_for(agent, "p@sub.x.example").name == "default"  # domains are exact
    # one object per named upstream, shared by every route that names it
    assert (
        routes.route_for(agent, "p@x.example").upstream
        is routes.route_for(agent, "p@y.example").upstream
    )


def test_a_trusted_entry_is_matched_by_its_name_alone() -> None:
    routes = table(
        {"name": "m365", "upstream": "a", "trusted": ["m365"]},
        trusted=[
            {"name": "m365", "service": "Microsoft 365", "networks": ["10.0.0.0/8"]},
            {"name": "m365-b", "service": "Microsoft 365", "networks": ["10.0.0.0/8"]},
        ],
    )

    def via(entry: str | None) -> str:
        message = SimpleNamespace(sender="office@broker.example", trusted_entry=entry)
        return routes.route_for(message, "p@example.com").name

    assert via("m365") == "m365"
    assert via("m365-b") == "default"
    assert via("M365") == "default"
    assert via(None) == "default"


def test_check_config_lists_the_routes_and_checks_capture_directories(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    config = tmp_path / "sealrelay.toml"
    config.write_text(
        f"""
[upstreams.m365]
url = "smtp://smtp.office365.example:25"
[upstreams.archive]
url = "capture:{blocked}/outbox"
[[routes]]
name = "back-to-m365"
upstream = "m365"
trusted = ["m365"]
[[routes]]
name = "per-sender"
upstream = "archive"
sender_domains = ["branch.example"]
recipient_domains = ["a.example", "b.example"]
[[smtp.trusted]]
name = "m365"
networks = ["10.0.0.0/8"]
"""
    )
    settings, problems = check_config(config, environ={})
    assert settings is not None
    upstream_problems = [(p.key, p.error) for p in problems if p.key.startswith("upstream")]
    # [upstream] captures too (the embedded default): a warning each, an error for the file
    assert ("upstreams.archive.url", True) in upstream_problems
    assert ("upstreams.archive.url", False) in upstream_problems
    assert ("upstreams.m365.url", True) not in upstream_problems
    assert describe_routes(settings) == [
        "route back-to-m365: trusted m365 -> m365 (smtp.office365.example:25)",
        "route per-sender: sender domain branch.example and recipient domain a.example,"
        f" b.example -> archive (capture:{blocked}/outbox)",
        "otherwise -> default (capture:var/outbox)",
    ]


# -- settings that stop start-up


BASE = {"upstreams": {"m365": {"url": "smtp://m365.example"}}}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"routes": [{"name": "r", "upstream": "m366", "trusted": ["x"]}]},
            "routes: route r: upstream 'm366' is not defined; add [upstreams.m366]"
            " or name one of: default, m365",
        ),
        (
            {"routes": [{"name": "everything", "upstream": "m365"}]},
            "routes.0: route everything: needs a condition (sender_domains, recipient_domains"
            " or trusted); for all mail, set the upstream in [upstream] instead",
        ),
        (
            {
                "routes": [
                    {"name": "r", "upstream": "m365", "sender_domains": ["a.example"]},
                    {"name": "r", "upstream": "default", "sender_domains": ["b.example"]},
                ]
            },
            "routes: names must be unique; repeated: r",
        ),
        (
            {"routes": [{"name": "r", "upstream": "m365", "trusted": ["crm"]}]},
            "routes: route r: trusted 'crm' is not the name of an [[smtp.trusted]] entry"
            " (there: none)",
        ),
        (
            {"routes": [{"name": "default", "upstream": "m365", "trusted": ["crm"]}]},
            "routes.0: route name 'default' is taken by [upstream], the fallback",
        ),
        (
            {"upstreams": {"m365": {"url": "smtp://m365.example", "queue_lifetime": 60}}},
            "upstreams: m365.queue_lifetime: the queue's lifetime and retries are the same for"
            " every route; set it on [upstream]",
        ),
        (
            {"upstreams": {"m365": {"username": "relay"}}},
            "upstreams: m365.url: required, an upstream names where its mail goes",
        ),
        (
            {"upstreams": {"m365": {"url": "http://m365.example"}}},
            "upstreams.m365.url: must be smtp://HOST[:PORT]",
        ),
    ],
)
def test_bad_routes_stop_start_up_naming_the_key(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings.model_validate({**BASE, **data})
    lines = validation_problems(raised.value, {})
    assert [line for line in lines if line.startswith(problem)], lines


def test_an_unknown_upstream_in_the_file_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "sealrelay.toml"
    config.write_text(
        '[[routes]]\nname = "to-m365"\nupstream = "m365"\nrecipient_domains = ["a.example"]\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert raised.value.problems == [
        "routes: route to-m365: upstream 'm365' is not defined; add [upstreams.m365]"
        " or name one of: default"
    ]


ROUTES_TOML = """
[smtp]
allow_plaintext_auth_on_loopback = true
[upstream]
url = "smtp://127.0.0.1:2526"
[upstreams.m365]
url = "smtp://smtp.office365.example:25"
[[routes]]
name = "back-to-m365"
upstream = "{upstream}"
recipient_domains = ["partner.example"]
"""


async def test_check_config_prints_the_table_and_refuses_an_unknown_upstream(
    tmp_path: Path,
) -> None:
    good = write_config(tmp_path / "good", extra=ROUTES_TOML.format(upstream="m365"))
    checked = await sealrelay("check-config", str(good))
    assert checked.code == 0, checked.err
    assert checked.out.splitlines()[1:] == [
        "  route back-to-m365: recipient domain partner.example -> m365"
        " (smtp.office365.example:25)",
        "  otherwise -> default (127.0.0.1:2526)",
    ]
    bad = write_config(tmp_path / "bad", extra=ROUTES_TOML.format(upstream="m356"))
    refused = await sealrelay("check-config", str(bad))
    assert refused.code == 1
    assert refused.err.splitlines()[-1] == (
        "Error: config error: routes: route back-to-m365: upstream 'm356' is not defined;"
        " add [upstreams.m356] or name one of: default, m365"
    )
    served = await sealrelay("serve", "--config", str(bad))
    assert served.code == 1 and refused.err.splitlines()[-1] in served.err


# -- where a person sees it

SCREENS = Path(os.environ.get("SEALRELAY_SCREENS", "/work/wt/screens/routes"))
SIZES = [("phone", PHONE, "de-DE"), ("desktop", {"width": 1280, "height": 800}, "en-GB")]


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_console_shows_each_attempts_route(
    relay_factory: StartRelay, other_sink: Sink, tmp_path: Path
) -> None:
    down, web = free_port(), free_port()
    relay = await relay_factory(
        server={"public_url": f"http://127.0.0.1:{web}"},  # the sign-in checks the Origin
        web={"listen": f"127.0.0.1:{web}"},
        upstreams={"partner": upstream_at(other_sink.port), "down": upstream_at(down)},
        routes=[
            {"name": "to-partner", "upstream": "partner", "recipient_domains": ["two.example"]},
            {"name": "via-down", "upstream": "down", "recipient_domains": ["three.example"]},
        ],
    )
    admin = "admin@broker.example"
    await users.add_user(relay.relay.db, admin, PASSWORD, role=Role.ADMIN)
    to = "a@one.example, b@two.example, c@three.example"
    message_id = queued_id(await relay.send(make_message(to=to)))
    await relay.sink.expect(1)
    await other_sink.expect(1)
    await settled(relay, 3)
    await eventually(lambda: _delivered(relay.relay.db, message_id, "b@two.example"))

    async_playwright = playwright_api()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            for size, viewport, locale in SIZES:
                page = await sign_in(browser, relay.web_url, admin, viewport, locale)
                for path, name in (
                    (f"/console/messages/{message_id}", "message"),
                    ("/console/admin/queue", "queue"),
                ):
                    await page.goto(f"{relay.web_url}{path}")
                    facts = await page.locator("dl.facts").all_inner_texts()
                    shown = "\n".join(facts)
                    width = await page.evaluate("document.documentElement.scrollWidth")
                    assert width <= viewport["width"], f"{name} is {width} px wide"
                    shot = tmp_path / f"routes-{name}-{size}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    SCREENS.mkdir(parents=True, exist_ok=True)
                    shutil.copy(shot, SCREENS / shot.name)
                    assert "via-down" in shown, shown
                    if name == "message":
                        assert "to-partner" in shown and "default" in shown, shown
                await page.context.close()
        finally:
            await browser.close()
