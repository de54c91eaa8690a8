"""The optional second factor of a console sign-in: time-based one-time codes (RFC 6238).

Six digits, 30-second steps, SHA-1, as every authenticator app reads them from an
`otpauth://` URI. A code is accepted one step early or late (clocks drift), and each step's
code only once per user, so a code read over a shoulder is spent. The newest step used is
stored with the user and moved by one conditional UPDATE, so neither a restart nor another
process nor two sign-ins at the same moment can use a step twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import pyotp
from sqlalchemy import or_, select, update

from gateway.store import journal
from gateway.store.db import Database
from gateway.store.events import USER_TOTP_DISABLED, USER_TOTP_ENABLED, UserTotpDisabled
from gateway.store.models import User
from gateway.users import UnknownUser, normalize_address

ISSUER = "sealrelay"
DRIFT_STEPS = 1


@dataclass(frozen=True)
class TotpSetup:
    """What the user types into or scans with their authenticator app, shown once."""

    secret: str
    uri: str


def matching_step(secret: str, code: str, now: datetime) -> int | None:
    """The 30-second step whose code `code` is, within the allowed drift; None if none."""
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    step = totp.timecode(now)
    for offset in range(-DRIFT_STEPS, DRIFT_STEPS + 1):
        if pyotp.utils.strings_equal(totp.generate_otp(step + offset), code):
            return step + offset
    return None


async def spend(db: Database, user_id: int, step: int) -> bool:
    """True and `step` is spent for the user; False when it (or a later one) was used already.

    Compare-and-set in the database: of two sign-ins racing with one code, the second's
    UPDATE waits for the first's row lock (PostgreSQL) or the write lock (SQLite) and then
    finds the condition false.
    """
    async with db.transaction() as session:
        result = await session.execute(
            update(User)
            .where(
                User.id == user_id,
                or_(User.totp_last_step.is_(None), User.totp_last_step < step),
            )
            .values(totp_last_step=step)
            .execution_options(synchronize_session=False)
        )
    return int(getattr(result, "rowcount", 0)) == 1


async def enable(db: Database, email: str, issuer: str = ISSUER) -> TotpSetup:
    """A fresh secret for the user (replacing any earlier one); journaled."""
    email = normalize_address(email)
    secret = pyotp.random_base32()
    async with db.transaction() as session:
        user = await session.scalar(
            select(User).where(User.email == email, User.deleted_at.is_(None))
        )
        if user is None:
            raise UnknownUser("user.unknown", email=email)
        user.totp_secret = secret
        await journal.append(session, [USER_TOTP_ENABLED.new({"email": email})])
    uri = pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=issuer)
    return TotpSetup(secret, uri)


async def disable(db: Database, email: str, *, by: str | None = None) -> bool:
    """Whether a TOTP secret was removed (False when the user had none); `by` is the admin
    who did it in the console."""
    email = normalize_address(email)
    async with db.transaction() as session:
        user = await session.scalar(
            select(User).where(User.email == email, User.deleted_at.is_(None))
        )
        if user is None:
            raise UnknownUser("user.unknown", email=email)
        if user.totp_secret is None:
            return False
        user.totp_secret = None
        data: UserTotpDisabled = {"email": email}
        if by is not None:
            data["by"] = by
        await journal.append(session, [USER_TOTP_DISABLED.new(data)])
    return True
