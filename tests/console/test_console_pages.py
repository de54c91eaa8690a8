"""The console's sign-in over real HTTP against a running relay, on both databases."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta

import aiohttp
import aiosmtplib
import pyotp
import pytest
from aiohttp import web

from gateway import users
from gateway.access import Permission
from gateway.console import totp
from gateway.console.sessions import SessionDesk
from gateway.store.models import Role
from tests.conftest import AGENT, PASSWORD, Harness, StartRelay
from tests.console.client import SESSION, ConsoleClient, hidden_fields
from tests.console.test_sessions import Clock, wrong_code
from tests.support import free_port
from web.app import create_app
from web.console.forms import CookieNames, dev_url
from web.guard import RULES, Audience, Routes

PROXY = {"web": {"trusted_proxies": ["127.0.0.1"]}}


async def test_sign_in_rotates_the_cookie_and_shows_who_is_signed_in(relay: Harness) -> None:
    async with ConsoleClient(relay.web_url) as browser:
        page = await browser.get("/console/login")
        assert page.status == 200
        for header, value in {
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
            "Referrer-Policy": "same-origin",
            "X-Content-Type-Options": "nosniff",
        }.items():
            assert page.headers[header] == value
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert "script-src" not in page.headers["Content-Security-Policy"]
        assert "<script" not in page.text
        browser.set_cookie(SESSION, "planted-by-someone-else")
        answer = await browser.sign_in(AGENT, PASSWORD)
        assert answer.status == 303 and answer.location == "/console/"
        cookie = answer.headers.getone("Set-Cookie")
        assert cookie.startswith(f"{SESSION}=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        assert "Domain" not in cookie and "Max-Age" not in cookie
        token = browser.cookie(SESSION)
        assert token and token != "planted-by-someone-else"
        home = await browser.get("/console/")
        assert home.status == 200
        assert AGENT in home.text and "Agent" in home.text
        assert "1 session" in home.text
        assert home.headers["X-Frame-Options"] == "DENY"
        # a second sign-in in the same browser gets a new token and ends the old one
        await browser.sign_in(AGENT, PASSWORD)
        assert browser.cookie(SESSION) not in (None, token)
    async with ConsoleClient(relay.web_url) as thief:
        thief.set_cookie(SESSION, token)
        assert (await thief.get("/console/")).status == 303


async def test_a_cookie_set_before_sign_in_is_not_the_one_after(relay: Harness) -> None:
    """Session fixation: an attacker signs in, plants their token in the victim's browser."""
    async with ConsoleClient(relay.web_url) as attacker:
        await attacker.sign_in(AGENT, PASSWORD)
        planted = attacker.cookie(SESSION)
        assert planted
    async with ConsoleClient(relay.web_url) as victim:
        victim.set_cookie(SESSION, planted)
        await victim.sign_in(AGENT, PASSWORD)
        assert victim.cookie(SESSION) != planted
    async with ConsoleClient(relay.web_url) as attacker:
        attacker.set_cookie(SESSION, planted)
        assert (await attacker.get("/console/")).status == 303, "the planted token is dead"


async def test_wrong_password_unknown_and_disabled_user_get_the_same_page(
    relay: Harness,
) -> None:
    await users.add_user(relay.relay.db, "off@broker.example", PASSWORD)
    await users.set_disabled(relay.relay.db, "off@broker.example")
    async with ConsoleClient(relay.web_url, forwarded_for=None) as browser:
        answers = [
            await browser.sign_in(login, password)
            for login, password in [
                (AGENT, "wrong password!"),
                ("nobody@broker.example", PASSWORD),
                ("off@broker.example", PASSWORD),
            ]
        ]
        assert {a.status for a in answers} == {401}
        typed_back = re.compile(r'value="[^"]*@broker.example"')
        assert len({typed_back.sub("", a.text) for a in answers}) == 1
        assert f'value="{AGENT}"' in answers[0].text, "the address typed stays in the form"
        assert "The email address or the password is not right." in answers[0].text
        assert browser.cookie(SESSION) is None
        assert (await browser.get("/console/")).status == 303


async def test_the_console_speaks_the_browsers_language(relay: Harness) -> None:
    async with aiohttp.ClientSession() as http:
        for language, heading in [
            ("de-DE,de;q=0.9", "An der Konsole anmelden"),
            ("en-GB", "Sign in to the console"),
            ("fr-FR", "An der Konsole anmelden"),  # not shipped: [policy] language (de)
        ]:
            async with http.get(
                f"{relay.web_url}/console/login", headers={"Accept-Language": language}
            ) as response:
                assert heading in await response.text()


async def test_not_signed_in_goes_to_sign_in_and_back_but_never_elsewhere(
    relay: Harness,
) -> None:
    async with ConsoleClient(relay.web_url) as browser:
        answer = await browser.get("/console/")
        assert answer.status == 303
        assert answer.location in (
            "/console/login?next=%2Fconsole%2F",
            "/console/login?next=/console/",
        )
        for target, lands in [
            ("/console/", "/console/"),
            ("https://evil.example/console/", "/console/"),
            ("//evil.example/console/", "/console/"),
            ("/console/\\evil", "/console/"),
        ]:
            browser.http.cookie_jar.clear(lambda morsel: morsel.key == SESSION)
            page = await browser.get(f"/console/login?next={target}")
            fields = hidden_fields(page.text)
            assert fields["next"] == lands
            fields["next"] = target  # a forged form: the server checks again
            answer = await browser.post(
                "/console/login", {**fields, "email": AGENT, "password": PASSWORD}
            )
            assert answer.location == lands
        # signed in, the sign-in page sends one on
        assert (await browser.get("/console/login")).location == "/console/"


async def test_csrf_missing_wrong_or_foreign_is_refused_and_changes_nothing(
    relay: Harness,
) -> None:
    async with ConsoleClient(relay.web_url) as browser, ConsoleClient(relay.web_url) as other:
        await browser.sign_in(AGENT, PASSWORD)
        await other.sign_in(AGENT, PASSWORD)
        good = await browser.csrf()
        foreign = await other.csrf()
        assert good != foreign, "the token is bound to the session"
        for path in ("/console/logout", "/console/logout-everywhere"):
            for data, headers in [
                ({}, {}),
                ({"csrf": ""}, {}),
                ({"csrf": "0" * 64}, {}),
                ({"csrf": foreign}, {}),
                ({"csrf": good}, {"Origin": "https://evil.example"}),
                ({"csrf": good}, {"Origin": "null"}),
            ]:
                answer = await browser.post(path, data, **headers)
                assert answer.status == 403, (path, data, headers)
                assert "Form expired" in answer.text
                assert answer.headers["X-Frame-Options"] == "DENY"
        assert (await browser.get("/console/")).status == 200
        assert (await other.get("/console/")).status == 200
        assert "2 sessions" in (await browser.get("/console/")).text


async def test_the_sign_in_form_has_its_own_csrf_token(relay: Harness) -> None:
    async with ConsoleClient(relay.web_url) as browser, ConsoleClient(relay.web_url) as other:
        fields = hidden_fields((await browser.get("/console/login")).text)
        theirs = hidden_fields((await other.get("/console/login")).text)
        login = {"email": AGENT, "password": PASSWORD, "next": "/console/"}
        for data, headers in [
            (login, {}),
            ({**login, "csrf": theirs["csrf"]}, {}),
            ({**login, "csrf": fields["csrf"]}, {"Origin": "https://evil.example"}),
        ]:
            answer = await browser.post("/console/login", data, **headers)
            assert answer.status == 403
            assert browser.cookie(SESSION) is None
        async with (
            aiohttp.ClientSession() as cookieless,  # the token without its cookie
            cookieless.post(
                f"{relay.web_url}/console/login", data={**login, "csrf": fields["csrf"]}
            ) as response,
        ):
            assert response.status == 403
        answer = await browser.post(
            "/console/login", {**login, "csrf": fields["csrf"]}, Origin="http://127.0.0.1:8080"
        )
        assert answer.status == 303


async def test_sign_out_and_sign_out_everywhere_end_sessions_on_other_clients(
    relay: Harness,
) -> None:
    async with (
        ConsoleClient(relay.web_url) as laptop,
        ConsoleClient(relay.web_url) as phone,
        ConsoleClient(relay.web_url) as tablet,
    ):
        for browser in (laptop, phone, tablet):
            assert (await browser.sign_in(AGENT, PASSWORD)).status == 303
        assert "3 sessions" in (await laptop.get("/console/")).text
        answer = await tablet.post("/console/logout", {"csrf": await tablet.csrf()})
        assert answer.status == 303 and answer.location == "/console/login?done=out"
        removal = answer.headers.getone("Set-Cookie")
        assert removal.startswith(f'{SESSION}=""') and "Max-Age=0" in removal
        assert "HttpOnly" in removal and "Path=/" in removal
        assert tablet.cookie(SESSION) in (None, "")
        assert (await tablet.get("/console/")).status == 303
        assert "You are signed out." in (await tablet.get("/console/login?done=out")).text
        assert (await phone.get("/console/")).status == 200
        answer = await laptop.post("/console/logout-everywhere", {"csrf": await laptop.csrf()})
        assert answer.location == "/console/login?done=everywhere"
        assert (await phone.get("/console/")).status == 303
        assert (await laptop.get("/console/")).status == 303


async def test_escaped_markup_in_a_users_address_and_group(relay: Harness) -> None:
    email = "o'neil&co@broker.example"
    group = '<img src=x onerror="alert(1)">'
    await users.add_user(relay.relay.db, email, PASSWORD, role=Role.TEAM_LEAD, group=group)
    async with ConsoleClient(relay.web_url) as browser:
        assert (await browser.sign_in(email, PASSWORD)).status == 303
        home = (await browser.get("/console/")).text
    assert "<img" not in home
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in home
    assert "o&#39;neil&amp;co@broker.example" in home
    async with ConsoleClient(relay.web_url) as browser:
        answer = await browser.sign_in('"><script>alert(1)</script>', "wrong password!")
    assert answer.status == 401
    assert "<script>" not in answer.text
    assert 'value="&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in answer.text


async def test_totp_right_wrong_and_missing_code_over_http(relay: Harness) -> None:
    await users.add_user(relay.relay.db, "boss@broker.example", PASSWORD, role=Role.ADMIN)
    setup = await totp.enable(relay.relay.db, "boss@broker.example")
    async with ConsoleClient(relay.web_url) as browser:
        step = await browser.sign_in("boss@broker.example", PASSWORD)
        assert step.status == 200 and 'autocomplete="one-time-code"' in step.text
        assert browser.cookie(SESSION) is None
        fields = hidden_fields(step.text)
        assert set(fields) == {"csrf", "next", "pending"}
        # skipping the step: the home page stays closed
        assert (await browser.get("/console/")).status == 303
        now = relay.relay.clock()
        for code in ("", wrong_code(setup.secret, now)):
            answer = await browser.post("/console/login", {**fields, "code": code})
            assert answer.status == 401 and "That code is not right." in answer.text
            assert browser.cookie(SESSION) is None
        answer = await browser.post(
            "/console/login", {**fields, "code": pyotp.TOTP(setup.secret).now()}
        )
        assert answer.status == 303
        assert "Administrator" in (await browser.get("/console/")).text


async def _throttled_console(relay: Harness, ip: str) -> None:
    async with ConsoleClient(relay.web_url, forwarded_for=ip) as browser:
        answer = await browser.sign_in(AGENT, PASSWORD)
        assert answer.status == 429, answer.text
        assert int(answer.headers["Retry-After"]) > 0
        assert "Too many failed sign-ins" in answer.text
        assert browser.cookie(SESSION) is None


async def test_failed_smtp_logins_throttle_the_console(relay_factory: StartRelay) -> None:
    relay = await relay_factory(smtp={"max_auth_failures_per_ip": 3}, **PROXY)
    guesser = "127.0.0.21"
    for _ in range(3):
        async with relay.client(source_address=(guesser, 0)) as smtp:
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await smtp.auth_plain(AGENT, "wrong password!")
            assert failed.value.code == 535, failed.value
    await _throttled_console(relay, guesser)
    async with ConsoleClient(relay.web_url, forwarded_for="127.0.0.22") as elsewhere:
        assert (await elsewhere.sign_in(AGENT, PASSWORD)).status == 303


async def test_failed_console_sign_ins_throttle_smtp_auth(relay_factory: StartRelay) -> None:
    relay = await relay_factory(smtp={"max_auth_failures_per_ip": 3}, **PROXY)
    guesser = "127.0.0.23"
    async with ConsoleClient(relay.web_url, forwarded_for=guesser) as browser:
        for _ in range(3):
            assert (await browser.sign_in(AGENT, "wrong password!")).status == 401
    with pytest.raises(aiosmtplib.SMTPException) as refused:
        async with relay.client(source_address=(guesser, 0)) as smtp:
            await smtp.login(AGENT, PASSWORD)
    assert "Too many failed logins from your address" in str(refused.value)
    async with relay.client(source_address=("127.0.0.24", 0)) as smtp:
        await smtp.login(AGENT, PASSWORD)


async def test_failures_for_one_account_over_many_addresses_throttle_both_ways_in(
    relay_factory: StartRelay,
) -> None:
    relay = await relay_factory(
        smtp={"max_auth_failures_per_ip": 50, "max_auth_failures_per_account": 3}, **PROXY
    )
    for n in range(2):
        async with relay.client(source_address=(f"127.0.0.{30 + n}", 0)) as smtp:
            await smtp.ehlo()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await smtp.auth_plain(AGENT, "wrong password!")
            assert failed.value.code == 535, failed.value
    async with ConsoleClient(relay.web_url, forwarded_for="127.0.0.40") as browser:
        assert (await browser.sign_in(AGENT, "wrong password!")).status == 401
    await _throttled_console(relay, "127.0.0.41")
    async with relay.client(source_address=("127.0.0.42", 0)) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await smtp.login(AGENT, PASSWORD)
    assert refused.value.code == 454
    assert "for this account" in refused.value.message


async def test_idle_and_absolute_expiry_over_http(relay: Harness) -> None:
    clock = Clock(start=datetime.now(UTC))
    parts = relay.relay.web_parts()
    desk = SessionDesk(
        relay.relay.db, relay.settings.console, relay.relay.login_throttle, b"k" * 32, clock
    )
    app = create_app(dataclasses.replace(parts, sessions=desk))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with ConsoleClient(f"http://127.0.0.1:{port}") as browser:
            await browser.sign_in(AGENT, PASSWORD)
            clock.now += timedelta(minutes=29)
            assert (await browser.get("/console/")).status == 200
            clock.now += timedelta(minutes=30)
            assert (await browser.get("/console/")).status == 303
            await browser.sign_in(AGENT, PASSWORD)
            signed_in_at = clock.now
            while (await browser.get("/console/")).status == 200:  # active every 29 minutes
                clock.now += timedelta(minutes=29)
            assert timedelta(hours=12) <= clock.now - signed_in_at < timedelta(hours=12, minutes=29)
            answer = await browser.post("/console/logout", {"csrf": "anything"})
            assert answer.status == 303 and answer.location == "/console/login"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_cookies_are_host_prefixed_and_secure_unless_dev_on_loopback(
    relay_factory: StartRelay,
) -> None:
    assert dev_url("http://127.0.0.1:8080") and dev_url("http://localhost")
    assert dev_url("http://[::1]:8080")
    assert not dev_url("https://127.0.0.1") and not dev_url("http://relay.broker.example")
    assert not dev_url("http://10.0.0.5:8080")
    assert CookieNames.for_public_url("https://relay.broker.example") == CookieNames(
        "__Host-sealrelay_session", "__Host-sealrelay_login", secure=True
    )
    # behind a proxy that serves the relay under /sealrelay
    relay = await relay_factory(server={"public_url": "https://relay.broker.example/sealrelay"})
    async with ConsoleClient(relay.web_url) as browser:
        page = await browser.get("/console/login")
        assert 'action="/sealrelay/console/login"' in page.text
        assert 'href="/sealrelay/static/console.css?v=' in page.text
        assert 'href="/sealrelay/static/base.css?v=' in page.text
        login_cookie = page.headers.getone("Set-Cookie")
        assert login_cookie.startswith("__Host-sealrelay_login=")
        assert "Secure" in login_cookie and "SameSite=Strict" in login_cookie
        nonce = login_cookie.split(";")[0].split("=", 1)[1]
        browser.http.cookie_jar.clear()
        answer = await browser.post(  # the cookie as a browser sends it back over https
            "/console/login",
            {**hidden_fields(page.text), "email": AGENT, "password": PASSWORD},
            Cookie=f"__Host-sealrelay_login={nonce}",
        )
        assert answer.status == 303 and answer.location == "/sealrelay/console/"
        cookie = answer.headers.getone("Set-Cookie")
        assert cookie.startswith("__Host-sealrelay_session=")
        for flag in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
            assert flag in cookie
        assert "Domain" not in cookie


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_every_console_post_route_checks_csrf_and_no_cookie_opens_the_api(
    relay: Harness,
) -> None:
    """Enumerates the route table: a console form added later is covered without a line of
    its own, and an API route never accepts the console's cookie."""
    app = create_app(relay.relay.web_parts())
    routes = Routes(app)
    routes.api("GET", "/api/v1/probe", _ok, Permission.VIEW_MESSAGES)
    routes.console("POST", "/console/probe", _ok, Permission.VIEW_MESSAGES)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    posts = [
        re.sub(r"\{[^}]+\}", "0", route.resource.canonical)  # any value fills a path's slot
        for route, rule in app[RULES].items()
        if rule.audience is Audience.CONSOLE and route.method == "POST" and route.resource
    ]
    assert {"/console/logout", "/console/logout-everywhere", "/console/probe"} <= set(posts)
    try:
        async with ConsoleClient(f"http://127.0.0.1:{port}") as browser:
            await browser.sign_in(AGENT, PASSWORD)
            for path in posts:
                assert (await browser.post(path, {})).status == 403, path
            assert (
                await browser.post("/console/probe", {"csrf": await browser.csrf()})
            ).text == "ok"
            assert (await browser.get("/console/")).status == 200, "no POST got through"
            assert (await browser.get("/api/v1/probe")).status == 401
    finally:
        await runner.cleanup()
