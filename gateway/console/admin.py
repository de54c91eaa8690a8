"""The admin's desks for the queue and the users, bound to the database and the clock, so
the web hands them requests and never a session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from gateway import users
from gateway.config import Settings
from gateway.console import totp
from gateway.outbound import queue
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from gateway.store.models import Delivery, DeliveryStatus, Role, User


class QueueDesk:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        clock: Callable[[], datetime],
        lifetime: timedelta,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.clock = clock
        self.lifetime = lifetime

    async def listing(
        self, statuses: Sequence[str] = (DeliveryStatus.QUEUED, DeliveryStatus.BOUNCED)
    ) -> list[queue.Claimed]:
        async with self.db.snapshot() as session:
            return await queue.list_deliveries(session, statuses)

    async def retry(self, delivery_id: str) -> Delivery:
        """Raises QueueError when there is no such copy or nothing to retry."""
        async with self.db.snapshot() as session:
            delivery = await session.get(Delivery, delivery_id)
        if delivery is not None:
            await queue.check_kept(self.blobs, delivery)
        async with self.db.transaction() as session:
            return await queue.retry_now(session, delivery_id, self.clock(), self.lifetime)

    async def delete(self, delivery_id: str) -> Delivery:
        async with self.db.transaction() as session:
            return await queue.delete(session, delivery_id, self.clock())


class UserDesk:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def find(self, email: str) -> tuple[User, list[str]]:
        """One user with their aliases; UnknownUser when there is none (or they were
        deleted)."""
        return await users.find_user(self.db, email)

    async def listing(self) -> list[tuple[User, list[str]]]:
        return await users.list_users(self.db)

    async def add(
        self, email: str, role: Role, group: str | None, aliases: Sequence[str]
    ) -> tuple[User, list[str], str]:
        """The new user, their aliases and the generated password (shown once)."""
        password = users.generate_password()
        user = await users.add_user(
            self.db, email, password, role=role, group=group, aliases=tuple(aliases)
        )
        normalized = {users.normalize_address(a) for a in aliases} - {user.email}
        return user, sorted(normalized), password

    async def change(
        self,
        email: str,
        *,
        role: Role | None = None,
        group: str | object | None = users.KEEP,
        disabled: bool | None = None,
    ) -> tuple[User, list[str]]:
        return await users.change_user(self.db, email, role=role, group=group, disabled=disabled)

    async def delete(self, email: str, *, by: str) -> None:
        await users.delete_user(self.db, email, by=by)

    async def reset_password(self, email: str, *, by: str) -> str:
        """The new generated password, to be shown once."""
        return await users.reset_password(self.db, email, by=by)

    async def turn_off_totp(self, email: str, *, by: str) -> bool:
        """For a user who lost their authenticator; whether they had TOTP on."""
        return await totp.disable(self.db, email, by=by)

    async def add_alias(self, email: str, address: str, *, by: str) -> list[str]:
        return await users.add_alias(self.db, email, address, by=by)

    async def remove_alias(self, email: str, address: str, *, by: str) -> list[str]:
        return await users.remove_alias(self.db, email, address, by=by)

    async def notices(self, email: str, settings: Settings) -> users.NoticePrefs:
        """The user's effective choice of optional mails."""
        return await users.notifications(self.db, email, settings)

    async def set_notices(
        self, email: str, changes: dict[str, bool], settings: Settings
    ) -> users.NoticePrefs:
        return await users.set_notifications(self.db, email, changes, settings)
