"""Debian's Chromium through Playwright, for every test that looks at a page or a mail.

Playwright's own browser builds are never used; without either the test fails with what to
install, it never skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PHONE = {"width": 390, "height": 844}
# Headless Chromium names itself "HeadlessChrome", which the relay rightly takes for a link
# scanner (rules/automated_visits.py); the pages' visitors in these tests are people.
CHROMIUM_ARGS.append(
    "--user-agent=Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/131.0.0.0 Safari/537.36"
)


def playwright_api() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: .venv/bin/pip install -e '.[test]'", pytrace=False
        )
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y chromium"
            " (Playwright's own browser downloads are not used)",
            pytrace=False,
        )
    return async_playwright
