"""Who may see and do what, for the console and the API alike: one table, no I/O.

A console user acts with their role's permissions over their role's share of the messages;
an API key acts with its scope's permissions over every message. Handlers never compare
roles themselves: each route declares the one permission it needs (web/guard.py), and every
query for messages is narrowed by the caller's `MessageScope`. A message outside the scope
is answered as if it did not exist, so its id reveals nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.store.models import ApiKeyScope, Role


class Permission(StrEnum):
    VIEW_MESSAGES = "view_messages"  # timelines, message details, the event feed (scoped)
    ACT_ON_MESSAGES = "act_on_messages"  # revoke, extend, re-send, release (scoped)
    VIEW_ADMIN = "view_admin"  # users, queue, policy, texts, keys, chain, webhooks
    MANAGE = "manage"  # change users, the queue, webhooks, API keys


_READ = frozenset({Permission.VIEW_MESSAGES, Permission.VIEW_ADMIN})
_EVERYTHING = frozenset(Permission)

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.AGENT: frozenset({Permission.VIEW_MESSAGES, Permission.ACT_ON_MESSAGES}),
    Role.TEAM_LEAD: frozenset({Permission.VIEW_MESSAGES, Permission.ACT_ON_MESSAGES}),
    Role.ADMIN: _EVERYTHING,
    Role.AUDITOR: _READ,
}

API_KEY_PERMISSIONS: dict[ApiKeyScope, frozenset[Permission]] = {
    ApiKeyScope.READ: _READ,
    ApiKeyScope.WRITE: _EVERYTHING,
}


@dataclass(frozen=True)
class MessageScope:
    """Which messages a caller sees: everything, one group's senders, or one user's own.

    A team lead without a group sees only their own messages, never everyone's.
    """

    everything: bool = False
    group: str | None = None
    user_id: int | None = None

    @classmethod
    def for_role(cls, role: Role, user_id: int, group: str | None) -> MessageScope:
        if role in (Role.ADMIN, Role.AUDITOR):
            return cls(everything=True)
        if role == Role.TEAM_LEAD and group is not None:
            return cls(group=group)
        return cls(user_id=user_id)

    def covers(self, sender_user_id: int | None, sender_group: str | None) -> bool:
        """Whether a message sent by this user (of this group) lies in the scope."""
        if self.everything:
            return True
        if self.group is not None:
            return sender_user_id is not None and sender_group == self.group
        return sender_user_id is not None and sender_user_id == self.user_id


@dataclass(frozen=True)
class Principal:
    """Who is asking: a signed-in user or an API key. `name` is what logs and the journal
    show as the actor."""

    name: str
    permissions: frozenset[Permission]
    scope: MessageScope
    user_id: int | None = None
    role: Role | None = None
    api_key_id: str | None = None

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions

    @classmethod
    def for_user(cls, user_id: int, email: str, role: Role, group: str | None) -> Principal:
        return cls(
            name=email,
            permissions=ROLE_PERMISSIONS[role],
            scope=MessageScope.for_role(role, user_id, group),
            user_id=user_id,
            role=role,
        )

    @classmethod
    def for_api_key(cls, key_id: str, name: str, scope: ApiKeyScope) -> Principal:
        return cls(
            name=f"api key {name}",
            permissions=API_KEY_PERMISSIONS[scope],
            scope=MessageScope(everything=True),
            api_key_id=key_id,
        )
