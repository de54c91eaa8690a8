"""docs/events.md, rendered from the event catalog so that the published contract cannot drift.

Run `python -m gateway.store.event_docs > docs/events.md` after changing gateway/store/events.py; a
test fails while the file differs from what this prints.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from typing_extensions import is_typeddict

from gateway.store.events import CATALOG, EventType

INTRO = """\
# Journal events

Generated from `gateway/store/events.py` by `python -m gateway.store.event_docs`; do not edit
by hand.

The journal records everything that happened to every message, link and registered letter,
one event at a time, each carrying the hash of the one before it (`sealrelay verify
--journal`; docs/journal.md says how events are numbered and chained, within about a second).
The admin UI shows these events, the API lists them and webhooks push them to a CRM. Every
event has a `seq`, a time `at` (UTC), a `type` (the names below, which never
change), a `message_id` and a `delivery_id` (null where an event names none) and a `data`
object whose fields are listed for each type. Fields marked **personal data** name or
identify a person; an event type is marked when any of its fields is.
"""

_NAMES = {str: "string", int: "integer", bool: "boolean", type(None): "null"}


def type_name(hint: Any) -> str:
    """A payload type as a JSON reader knows it: string, list of strings, object, ..."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in get_args(hint))
    if origin is list:
        return f"list of {_plural(type_name(get_args(hint)[0]))}"
    if origin is dict:
        return f"object mapping strings to {_plural(type_name(get_args(hint)[1]))}"
    if is_typeddict(hint):
        fields = ", ".join(
            f"`{name}`: {type_name(arg)}"
            for name, arg in get_type_hints(hint).items()  # without the field docs
        )
        return f"object ({fields})"
    return _NAMES[hint]


def _plural(name: str) -> str:
    return name if name.startswith("object") else f"{name}s"


def event_section(event_type: EventType[Any]) -> list[str]:
    personal = " It carries **personal data**." if event_type.personal else ""
    lines = [f"## `{event_type.name}`", "", event_type.meaning + personal, ""]
    lines.append(f"- `message_id`: {event_type.message or 'always null'}")
    lines.append(f"- `delivery_id`: {event_type.delivery or 'always null'}")
    lines += ["", "| field | type | meaning |", "| --- | --- | --- |"]
    for field in event_type.fields():
        mark = " **personal data**" if field.personal else ""
        kind = type_name(field.type) + (" (optional)" if field.optional else "")
        lines.append(f"| `{field.name}` | {kind} | {field.meaning}{mark} |")
    return [*lines, ""]


def render() -> str:
    lines = [INTRO]
    lines += [f"- [`{name}`](#{name.replace('.', '')})" for name in CATALOG]
    lines.append("")
    for event_type in CATALOG.values():
        lines += event_section(event_type)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
