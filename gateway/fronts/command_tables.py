"""aiosmtpd's per-connection command tables, worked out once per class and per handler.

aiosmtpd's SMTP.__init__ builds a session's tables of commands (`smtp_*`), handler hooks
(`handle_*`) and AUTH mechanisms (`auth_*`) from `dir()` and `inspect.getmembers()` of the
session and of its handler, on every connection: about 30 of the 55 us a session object
cost, paid again for every message a client sends on a connection of its own (smtp-source,
and most MTAs relaying one message at a time).

A session that mixes in `CommandTables` hands SMTP.__init__ `BARE_HANDLER` and, while that
runs, lists nothing in `dir()`, so aiosmtpd's reflection finds nothing; `set_tables` then
fills the tables from names found once per class and hooks found once per handler. They
come out as aiosmtpd's own (tests/fronts/test_command_tables.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any
from weakref import WeakKeyDictionary

from aiosmtpd.smtp import _AuthMechAttr

_pairs: dict[tuple[type, str], tuple[tuple[str, str], ...]] = {}
_handlers: WeakKeyDictionary[Any, tuple[dict[str, Any], dict[str, _AuthMechAttr], str | None]]
_handlers = WeakKeyDictionary()


class _Bare:
    """A handler without hooks or mechanisms, all aiosmtpd's __init__ gets to see."""

    def __dir__(self) -> list[str]:
        return []


BARE_HANDLER = _Bare()


def _keyed(cls: type, prefix: str) -> tuple[tuple[str, str], ...]:
    """(table key, attribute name) of the class's `prefix` methods."""
    found = _pairs.get((cls, prefix))
    if found is None:
        found = _pairs[cls, prefix] = tuple(
            (_key(name, getattr(cls, name)), name) for name in dir(cls) if name.startswith(prefix)
        )
    return found


def _key(name: str, method: Any) -> str:
    """A method's key in its table, as aiosmtpd keys it: `smtp_DATA` and `handle_DATA` are
    DATA, `auth_PLAIN` is PLAIN (or the name @auth_mechanism gave it)."""
    prefix, _, rest = name.partition("_")
    if prefix == "auth":
        return str(getattr(method, "__auth_mechanism_name__", rest.replace("__", "-")))
    return rest


def _handler_tables(handler: Any) -> tuple[dict[str, Any], dict[str, _AuthMechAttr], str | None]:
    """Its hooks, its mechanisms and the form of its EHLO hook, as aiosmtpd finds them."""
    found = _handlers.get(handler)
    if found is None:
        cls = type(handler)
        hooks = {key: getattr(handler, name) for key, name in _keyed(cls, "handle_")}
        mechanisms = {
            key: _AuthMechAttr(getattr(handler, name), False) for key, name in _keyed(cls, "auth_")
        }
        ehlo = hooks.get("EHLO")
        form = None if ehlo is None else _ehlo_form(ehlo)
        found = _handlers[handler] = (hooks, mechanisms, form)
    return found


def _ehlo_form(hook: Any) -> str:
    count = len(inspect.signature(hook).parameters)
    if count not in (4, 5):
        raise RuntimeError("Unsupported EHLO Hook")
    return "old" if count == 4 else "new"


class CommandTables:
    _bare = True  # dir() lists nothing until set_tables has run

    def __dir__(self) -> Iterable[str]:
        return [] if self._bare else super().__dir__()

    def set_tables(self, handler: Any, exclude: Iterable[str] = ()) -> None:
        """The tables SMTP.__init__ would have built with `handler`, which becomes the
        session's handler."""
        cls = type(self)
        hooks, handled, ehlo_form = _handler_tables(handler)
        mechanisms = {
            key: _AuthMechAttr(getattr(self, name), True) for key, name in _keyed(cls, "auth_")
        }
        mechanisms.update(handled)  # the handler's replace built-in ones of the same name
        for key in exclude:
            mechanisms.pop(key, None)
        self.event_handler = handler
        self._handle_hooks = dict(hooks)
        self._auth_methods = mechanisms
        self._ehlo_hook_ver = ehlo_form
        self._smtp_methods = {key: getattr(self, name) for key, name in _keyed(cls, "smtp_")}
        self._bare = False
