"""The permission table and message scopes, without any server."""

from __future__ import annotations

import pytest

from gateway.access import MessageScope, Permission, Principal
from gateway.store.models import ApiKeyScope, Role

ANNA, BEN = 1, 2


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        (Role.AGENT, {Permission.VIEW_MESSAGES, Permission.ACT_ON_MESSAGES}),
        (Role.TEAM_LEAD, {Permission.VIEW_MESSAGES, Permission.ACT_ON_MESSAGES}),
        (Role.ADMIN, set(Permission)),
        (Role.AUDITOR, {Permission.VIEW_MESSAGES, Permission.VIEW_ADMIN}),
    ],
)
def test_each_role_has_exactly_its_permissions(role: Role, allowed: set[Permission]) -> None:
    principal = Principal.for_user(ANNA, "anna@broker.example", role, "sales")
    assert {p for p in Permission if principal.may(p)} == allowed


def test_an_auditor_can_change_nothing() -> None:
    auditor = Principal.for_user(ANNA, "audit@broker.example", Role.AUDITOR, None)
    assert not auditor.may(Permission.ACT_ON_MESSAGES)
    assert not auditor.may(Permission.MANAGE)


def test_a_read_key_reads_and_a_write_key_also_changes() -> None:
    read = Principal.for_api_key("k1", "crm", ApiKeyScope.READ)
    write = Principal.for_api_key("k2", "crm", ApiKeyScope.WRITE)
    assert read.may(Permission.VIEW_MESSAGES) and not read.may(Permission.ACT_ON_MESSAGES)
    assert not read.may(Permission.MANAGE)
    assert all(write.may(p) for p in Permission)
    assert read.scope.everything and read.name == "api key crm"


def test_an_agent_sees_only_their_own_messages() -> None:
    scope = MessageScope.for_role(Role.AGENT, ANNA, "sales")
    assert scope.covers(ANNA, "sales")
    assert not scope.covers(BEN, "sales")
    assert not scope.covers(None, None)  # the relay's own mail (bounces) belongs to no agent


def test_a_team_lead_sees_their_group_and_without_a_group_only_their_own() -> None:
    lead = MessageScope.for_role(Role.TEAM_LEAD, ANNA, "sales")
    assert lead.covers(BEN, "sales") and lead.covers(ANNA, "sales")
    assert not lead.covers(BEN, "rentals")
    assert not lead.covers(BEN, None)
    alone = MessageScope.for_role(Role.TEAM_LEAD, ANNA, None)
    assert alone.covers(ANNA, None) and not alone.covers(BEN, None)


@pytest.mark.parametrize("role", [Role.ADMIN, Role.AUDITOR])
def test_admins_and_auditors_see_every_message(role: Role) -> None:
    scope = MessageScope.for_role(role, ANNA, None)
    assert scope.covers(BEN, "rentals") and scope.covers(None, None)
