"""Agents: argon2 passwords, aliases, disabling; on both database backends."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from gateway import users
from gateway.store.db import Database
from gateway.store.models import User

PASSWORD = "a long enough password"
RELAY_COST = "$argon2id$v=19$m=19456,t=2,p=1$"


@pytest.mark.usefixtures("relay_password_cost")
async def test_passwords_are_stored_and_checked_at_the_relays_argon2_cost(
    database: Database,
) -> None:
    """OWASP's argon2id minimum, in what is stored and in the stand-in checked for an unknown
    login (so that its check takes as long as a known one's)."""
    await users.add_user(database, "anna@broker.example", PASSWORD)
    async with database.transaction() as session:
        stored = await session.scalar(select(User))
    assert stored is not None and stored.password_hash.startswith(RELAY_COST)
    assert users._dummy_hash().startswith(RELAY_COST)
    assert await users.authenticate(database, "anna@broker.example", PASSWORD) is not None
    assert await users.authenticate(database, "nobody@broker.example", PASSWORD) is None


async def test_add_and_authenticate_with_aliases(database: Database) -> None:
    await users.add_user(
        database, "Anna@Broker.Example", PASSWORD, group="sales", aliases=("team@broker.example",)
    )
    agent = await users.authenticate(database, "anna@broker.example", PASSWORD)
    assert agent is not None
    assert agent.group == "sales"
    assert agent.may_send_as("TEAM@broker.example")
    assert agent.may_send_as("anna@broker.example")
    assert not agent.may_send_as("boss@broker.example")
    async with database.transaction() as session:
        stored = await session.scalar(select(User))
    assert stored is not None and stored.password_hash.startswith("$argon2")
    assert PASSWORD not in stored.password_hash


async def test_an_international_domain_logs_in_and_sends_in_either_form(
    database: Database,
) -> None:
    """Addresses are stored with the domain in its Unicode form (email-validator's normal
    form); IT may have told the agent either form, and the mail client may write either."""
    await users.add_user(database, "Anna@xn--mller-kva.de", PASSWORD, aliases=("büro@müller.de",))
    async with database.transaction() as session:
        assert (await session.scalar(select(User.email))) == "anna@müller.de"
    for login in ("anna@xn--mller-kva.de", "Anna@Müller.de"):
        agent = await users.authenticate(database, login, PASSWORD)
        assert agent is not None, login
        assert agent.may_send_as("anna@xn--mller-kva.de") and agent.may_send_as("ANNA@müller.de")
        assert agent.may_send_as("büro@xn--mller-kva.de")
        assert not agent.may_send_as("anna@mueller.de")
    for address in ("anna@xn--mller-kva.de", "büro@xn--mller-kva.de"):
        found = await users.agent_by_address(database, address)
        assert found is not None and found.email == "anna@müller.de"
    assert await users.authenticate(database, "anna@xn--mller.de", PASSWORD) is None


async def test_wrong_password_unknown_and_disabled_users(database: Database) -> None:
    await users.add_user(database, "anna@broker.example", PASSWORD)
    assert await users.authenticate(database, "anna@broker.example", "wrong password!") is None
    assert await users.authenticate(database, "nobody@broker.example", PASSWORD) is None
    await users.set_disabled(database, "anna@broker.example")
    assert await users.authenticate(database, "anna@broker.example", PASSWORD) is None
    await users.set_disabled(database, "anna@broker.example", False)
    assert await users.authenticate(database, "anna@broker.example", PASSWORD) is not None


async def test_password_change(database: Database) -> None:
    await users.add_user(database, "anna@broker.example", PASSWORD)
    await users.set_password(database, "anna@broker.example", "another long password")
    assert await users.authenticate(database, "anna@broker.example", PASSWORD) is None
    assert await users.authenticate(database, "anna@broker.example", "another long password")


@pytest.mark.parametrize(
    ("email", "password", "aliases", "message"),
    [
        ("not-an-address", PASSWORD, (), "not a valid address"),
        ("anna@broker.example", "short", (), "at least 10 characters"),
        ("anna@broker.example", PASSWORD, ("bad alias",), "not a valid address"),
    ],
)
async def test_bad_input_is_refused(
    database: Database, email: str, password: str, aliases: tuple[str, ...], message: str
) -> None:
    with pytest.raises(users.UserError, match=message):
        await users.add_user(database, email, password, aliases=aliases)
    assert await users.list_users(database) == []


async def test_addresses_are_unique_across_users_and_aliases(database: Database) -> None:
    await users.add_user(
        database, "anna@broker.example", PASSWORD, aliases=("team@broker.example",)
    )
    with pytest.raises(users.UserError, match="already"):
        await users.add_user(database, "anna@broker.example", PASSWORD)
    with pytest.raises(users.UserError, match="already"):
        await users.add_user(
            database, "ben@broker.example", PASSWORD, aliases=("team@broker.example",)
        )
    with pytest.raises(users.UserError, match="already an alias"):
        await users.add_user(database, "team@broker.example", PASSWORD)
    assert [u.email for u, _ in await users.list_users(database)] == ["anna@broker.example"]


async def test_unknown_user_operations(database: Database) -> None:
    with pytest.raises(users.UserError, match="no user"):
        await users.set_disabled(database, "ghost@broker.example")
    with pytest.raises(users.UserError, match="no user"):
        await users.set_password(database, "ghost@broker.example", PASSWORD)


def test_a_generated_password_never_starts_like_an_option() -> None:
    """Pasted after `--auth-password` it must not read as an option; one draw in 64 would."""
    passwords = [users.generate_password() for _ in range(2000)]
    assert not [p for p in passwords if p.startswith("-")]
    assert all(len(p) == 20 for p in passwords) and len(set(passwords)) == len(passwords)
