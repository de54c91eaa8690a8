"""The session's command, hook and AUTH tables, built from the names listed once per class
(gateway/fronts/command_tables.py), are the tables aiosmtpd builds from every attribute."""

from __future__ import annotations

from gateway.config import Settings
from gateway.fronts.smtp import SmtpFront, SubmissionSMTP


def every(obj: object, prefix: str) -> set[str]:
    """What aiosmtpd's introspection finds without the short list: every attribute."""
    return {name for name in object.__dir__(obj) if name.startswith(prefix)}


async def test_the_tables_are_aiosmtpd_s_own() -> None:
    front = SmtpFront(Settings.model_validate({}), None, None)  # type: ignore[arg-type]
    session = front._factory(None, True, ())()
    assert isinstance(session, SubmissionSMTP)
    handler = session.event_handler

    commands = {name.removeprefix("smtp_") for name in every(session, "smtp_")}
    assert set(session._smtp_methods) == commands
    assert {"EHLO", "MAIL", "RCPT", "DATA", "AUTH", "STARTTLS", "QUIT"} <= commands
    hooks = {name.removeprefix("handle_") for name in every(handler, "handle_")}
    assert set(session._handle_hooks) == hooks
    assert {"MAIL", "RCPT", "DATA", "PROXY", "exception"} <= hooks
    # the handler's mechanisms replace aiosmtpd's built-in ones of the same name
    assert {name: m.is_builtin for name, m in session._auth_methods.items()} == {
        "PLAIN": False,
        "LOGIN": False,
    }
    # bound to this session and its handler
    assert session._smtp_methods["DATA"] == session.smtp_DATA
    assert session._handle_hooks["DATA"] == handler.handle_DATA
