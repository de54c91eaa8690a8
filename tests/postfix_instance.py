"""A real Postfix of the test's own: private directories, loopback listeners, no local delivery.

Tests that put sealrelay next to Postfix (content filter, milter) need the real thing, not a
double: its queue, its retries and its bounces are what the documented setups rely on.

    async with postfix_instance(tmp_path, relayhost=f"[127.0.0.1]:{sink.port}") as postfix:
        ... send to 127.0.0.1:{postfix.smtpd_port} ...
        await postfix.wait_queue_empty()

The instance itself lives in tests/postfix_core.py (bench/compare.py uses it too); this module
adds what a test wants of it: when Postfix is not installed, the test fails with one line
saying how to install it; it is never skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests import postfix_core
from tests.postfix_core import PostfixInstance, PostfixMissing, delay_reasons

__all__ = [
    "PostfixInstance",
    "PostfixMissing",
    "delay_reasons",
    "postfix_command",
    "postfix_instance",
]


def postfix_command(name: str) -> str:
    """The full path of one of Postfix's commands, or a failed test naming the package."""
    try:
        return postfix_core.postfix_command(name)
    except PostfixMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@contextlib.asynccontextmanager
async def postfix_instance(
    directory: Path,
    *,
    relayhost: str = "",
    main_cf: Sequence[str] = (),
    master_cf: Sequence[str] = (),
    smtpd_options: Sequence[str] = (),
    smtpd_port: int | None = None,
    logins: Mapping[str, str] | None = None,
) -> AsyncIterator[PostfixInstance]:
    """A started private Postfix in `directory`, stopped on the way out (see
    tests/postfix_core.postfix_instance for the arguments)."""
    postfix_command("postfix")  # a missing Postfix fails the test in one line
    async with postfix_core.postfix_instance(
        directory,
        relayhost=relayhost,
        main_cf=main_cf,
        master_cf=master_cf,
        smtpd_options=smtpd_options,
        smtpd_port=smtpd_port,
        logins=logins,
    ) as instance:
        yield instance
