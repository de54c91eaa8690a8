"""The session's command, hook and AUTH tables, built once per class and per handler
(gateway/fronts/command_tables.py), are the tables aiosmtpd's own reflection builds."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP

from gateway.config import Settings
from gateway.fronts.smtp import SmtpFront, SubmissionSMTP


async def test_the_tables_are_aiosmtpd_s_own() -> None:
    front = SmtpFront(Settings.model_validate({}), None, None)  # type: ignore[arg-type]
    session = front._factory(None, True, ())()
    assert isinstance(session, SubmissionSMTP)
    handler = session.event_handler
    assert handler is front.handler
    # aiosmtpd's SMTP.__init__ reflecting on the same handler, and on a session of its own
    own = SMTP(handler, loop=asyncio.get_running_loop(), auth_require_tls=False)

    assert set(session._smtp_methods) == set(own._smtp_methods)
    assert {"EHLO", "MAIL", "RCPT", "DATA", "AUTH", "STARTTLS", "QUIT"} <= set(own._smtp_methods)
    assert session._handle_hooks == own._handle_hooks
    assert {"MAIL", "RCPT", "DATA", "PROXY", "exception"} <= set(own._handle_hooks)
    assert session._auth_methods == own._auth_methods
    # the handler's mechanisms replace aiosmtpd's built-in ones of the same name
    assert {name: m.is_builtin for name, m in session._auth_methods.items()} == {
        "PLAIN": False,
        "LOGIN": False,
    }
    assert session._ehlo_hook_ver == own._ehlo_hook_ver
    # bound to this session and its handler
    assert session._smtp_methods["DATA"] == session.smtp_DATA
    assert session._smtp_methods["EHLO"] == session.smtp_EHLO
    assert session._handle_hooks["DATA"] == handler.handle_DATA
    # and the session shows all it has once it is built
    assert {"smtp_DATA", "push", "set_tables"} <= set(dir(session))


async def test_each_session_gets_tables_of_its_own() -> None:
    front = SmtpFront(Settings.model_validate({}), None, None)  # type: ignore[arg-type]
    make = front._factory(None, True, ())
    first, second = make(), make()
    assert first._smtp_methods["DATA"].__self__ is first
    assert second._smtp_methods["DATA"].__self__ is second
    assert first._handle_hooks is not second._handle_hooks
    assert first._auth_methods is not second._auth_methods
