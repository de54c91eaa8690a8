"""A browser-like HTTP client for the console: keeps cookies, reads the forms' hidden fields."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import aiohttp

SESSION = "sealrelay_session"  # the dev name: the tests' public_url is http on loopback
HIDDEN = re.compile(r'<input type="hidden" name="([a-z]+)" value="([^"]*)">')


def hidden_fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in HIDDEN.findall(page)}


@dataclass
class Answer:
    status: int
    text: str
    headers: Any

    @property
    def location(self) -> str:
        return str(self.headers.get("Location", ""))


def speaking(language: str) -> dict[str, str]:
    """Headers for one post in another language: `console.post(path, form, **speaking("de"))`."""
    return {"Accept-Language": language}


class ConsoleClient:
    """One browser: its own cookie jar, optionally posing as another address behind a proxy."""

    def __init__(
        self,
        base: str,
        forwarded_for: str | None = None,
        language: str = "en",
        *,
        behind_https: bool = False,
    ) -> None:
        """`behind_https`: the relay's public_url is https and a proxy in front speaks it, so
        the browser keeps and returns the Secure (__Host-) cookies though we reach it by http."""
        self.base = base
        jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=base if behind_https else None)
        self.http = aiohttp.ClientSession(cookie_jar=jar)
        self.headers = {"Accept-Language": language}
        if forwarded_for:
            self.headers["X-Forwarded-For"] = forwarded_for

    async def __aenter__(self) -> ConsoleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    def cookie(self, name: str) -> str | None:
        for morsel in self.http.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None

    def set_cookie(self, name: str, value: str) -> None:
        self.http.cookie_jar.update_cookies({name: value}, aiohttp.client.URL(self.base))

    async def get(self, path: str) -> Answer:
        async with self.http.get(
            self.base + path, allow_redirects=False, headers=self.headers
        ) as response:
            return Answer(response.status, await response.text(), response.headers)

    async def post(self, path: str, data: dict[str, str], **headers: str) -> Answer:
        async with self.http.post(
            self.base + path,
            data=data,
            allow_redirects=False,
            headers={**self.headers, **headers},
        ) as response:
            return Answer(response.status, await response.text(), response.headers)

    async def sign_in(self, email: str, password: str, code: str | None = None) -> Answer:
        """Open the sign-in page, post the form (and the code step, when `code` is given).

        A browser signed in already is sent on by the sign-in page: its form is fetched
        without the session cookie, which the post then presents again.
        """
        token = self.cookie(SESSION)
        if token:
            self.http.cookie_jar.clear(lambda morsel: morsel.key == SESSION)
        page = await self.get("/console/login")
        if token:
            self.set_cookie(SESSION, token)
        assert page.status == 200, page.text
        fields = hidden_fields(page.text)
        answer = await self.post("/console/login", {**fields, "email": email, "password": password})
        if code is not None and answer.status == 200:
            answer = await self.post("/console/login", {**hidden_fields(answer.text), "code": code})
        return answer

    async def csrf(self) -> str:
        """The token of the home page's forms."""
        home = await self.get("/console/")
        assert home.status == 200, home.text
        return hidden_fields(home.text)["csrf"]
