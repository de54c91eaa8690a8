"""What every console page after sign-in shares: rendering on console/base.html, the signed-in
user's CSRF token, the navigation their permissions allow, notices after an action, and the
404 page for what lies outside the caller's scope.

The sign-in pages (web/console/pages.py) keep their own rendering; the work pages
(timeline, actions, letters waiting, admin) each get one `ConsoleView`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.access import Permission, Principal
from gateway.texts.catalog import Catalog
from web.console.forms import FIELD, ConsoleForms
from web.console.pages import CONSOLE_USER, ConsolePages
from web.console.paths import ACCOUNT, ADMIN, HOME, LETTERS, MESSAGES
from web.guard import CONSOLE_LOGIN, PRINCIPAL
from web.pages import ProspectSite

# what `?done=` may name after an action: the notice's catalog key
NOTICES = frozenset(
    {
        "revoked",
        "revoked_none",
        "extended",
        "resent",
        "released",
        "user_added",
        "user_changed",
        "retried",
        "deleted",
        "endpoint_added",
        "endpoint_enabled",
        "endpoint_disabled",
        "endpoint_changed",
        "replayed",
        "key_created",
        "key_revoked",
        "user_deleted",
        "alias_added",
        "alias_removed",
        "totp_off",
        "notices_saved",
        "password_changed",
        "login_saved",
        "login_cleared",
        "user_login_saved",
        "user_login_cleared",
    }
)


@dataclass(frozen=True)
class NavItem:
    href: str
    label: str
    current: bool


class ConsoleView:
    def __init__(self, site: ProspectSite, forms: ConsoleForms, console: ConsolePages) -> None:
        self.site = site
        self.forms = forms
        self.css = console.css

    def catalog(self, request: web.Request) -> Catalog:
        return self.site.catalog_for(request)

    def principal(self, request: web.Request) -> Principal:
        return request[PRINCIPAL]

    def csrf(self, request: web.Request) -> str:
        return self.forms.for_session(request[CONSOLE_USER].session_id)

    def render(
        self,
        request: web.Request,
        template: str,
        title: str,
        *,
        status: int = 200,
        error: str | None = None,
        **context: object,
    ) -> web.Response:
        catalog = self.catalog(request)
        principal = self.principal(request)
        done = request.query.get("done", "")
        return self.site.render(
            request,
            template,
            catalog,
            status=status,
            title=title,
            console_css=self.css,
            field=FIELD,
            login_url=self.site.url(CONSOLE_LOGIN),
            user=request[CONSOLE_USER],
            csrf=self.csrf(request),
            nav=self._nav(request, catalog, principal),
            may_act=principal.may(Permission.ACT_ON_MESSAGES),
            may_manage=principal.may(Permission.MANAGE),
            notice=catalog.t(f"work.done.{done}") if done in NOTICES else None,
            error=error,
            moment=catalog.moment,
            size=catalog.size,
            **context,
        )

    def not_found(self, request: web.Request) -> web.Response:
        """The same page for "does not exist" and "not yours": an id reveals nothing."""
        return self._message_page(request, "work.not_found", 404)

    async def unknown_page(self, request: web.Request) -> web.StreamResponse:
        """Any other console path: the console's own 404, behind sign-in like every console
        page (a visitor not signed in is sent there first, so it tells them nothing), rather
        than the prospects' "link not found". Only GET: a wrong method on a known page keeps
        its 405."""
        return self._message_page(request, "work.no_page", 404)

    def forbidden(self, request: web.Request) -> web.Response:
        """What a signed-in user sees on a page or action their role does not allow."""
        return self._message_page(request, "work.forbidden", 403)

    def _message_page(self, request: web.Request, key: str, status: int) -> web.Response:
        """`key` names the text; `key`_title, its heading."""
        catalog = self.catalog(request)
        return self.render(
            request,
            "console/work_message.html",
            catalog.t(f"{key}_title"),
            status=status,
            message=catalog.t(key),
        )

    def see_other(self, path: str, done: str) -> web.HTTPSeeOther:
        """Back to a console page after an action, with the notice saying what happened."""
        assert done in NOTICES, done
        return web.HTTPSeeOther(self.site.url(f"{path}?done={done}"))

    def _nav(self, request: web.Request, catalog: Catalog, principal: Principal) -> list[NavItem]:
        items = [
            (HOME, "work.nav.home"),
            (MESSAGES, "work.nav.messages"),
            (LETTERS, "work.nav.letters"),
        ]
        if principal.may(Permission.VIEW_ADMIN):
            items.append((ADMIN, "work.nav.admin"))
        items.append((ACCOUNT, "work.nav.account"))
        path = request.path
        return [
            NavItem(
                href,
                catalog.t(key),
                path == href or (href != HOME and path.startswith(href + "/")),
            )
            for href, key in items
        ]


def form_text(value: object, limit: int = 1000) -> str:
    return value[:limit].strip() if isinstance(value, str) else ""
