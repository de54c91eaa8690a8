"""Fixtures for tests of registered letters: a clock the test moves on and a running site.

Loaded for every test module through `pytest_plugins` in conftest.py, so a module that needs
other settings overrides `site` in three lines with `site_factory(**sections)` instead of
copying the relay's set-up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from gateway.mail import dkim
from gateway.store.db import Database
from tests.letter_site import Clock, LetterSite, running_site
from tests.support import Sink

StartSite = Callable[..., Awaitable[LetterSite]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def site_factory(
    database: Database,
    sink: Sink,
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    dkim_key: dkim.DkimKey,
    dkim_key_file: Path,
    clock: Clock,
) -> AsyncIterator[StartSite]:
    """Starts the site with settings sections on top of the letter tests' own."""
    async with AsyncExitStack() as stack:

        async def start(**sections: dict[str, Any]) -> LetterSite:
            return await stack.enter_async_context(
                running_site(
                    database, sink, tmp_path, tls_files, dkim_key, dkim_key_file, clock, **sections
                )
            )

        yield start


@pytest.fixture
async def site(site_factory: StartSite) -> LetterSite:
    return await site_factory()
