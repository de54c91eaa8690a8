"""`make test` on a fresh machine: scripts/with-test-services provides what the suite needs.

The script is run as a process, as `make test` runs it, with the PostgreSQL port pointed at a
free one, so a throw-away server has to be started, used and removed again.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port

SCRIPT = Path(__file__).parents[2] / "scripts" / "with-test-services"
PROBE = """
import asyncio, os, asyncpg
async def main():
    url = os.environ["SEALRELAY_TEST_POSTGRES_URL"].replace("+asyncpg", "")
    connection = await asyncpg.connect(url)
    print("connected", await connection.fetchval("SELECT current_database()"), url)
    await connection.close()
asyncio.run(main())
raise SystemExit(int(os.environ.get("PROBE_EXIT", "0")))
"""


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def run_script(*command: str, env: dict[str, str], user: str | None = None) -> Run:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SEALRELAY_TEST_")}
    environ.update(env)
    prefix = ["runuser", "-u", user, "--"] if user else []
    process = await asyncio.create_subprocess_exec(
        *prefix,
        str(SCRIPT),
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
        cwd="/",
    )
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def answers(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def test_without_postgres_a_throw_away_server_serves_the_run_and_is_removed() -> None:
    port = free_port()
    assert not await answers(port)
    run = await run_script(
        sys.executable,
        "-c",
        PROBE,
        env={"SEALRELAY_TEST_POSTGRES_PORT": str(port), "PROBE_EXIT": "3"},
    )
    assert run.code == 3, run.err  # the command's own status
    assert f"connected test postgresql://postgres@127.0.0.1:{port}/test" in run.out
    started = re.search(r"starting a throw-away one in (\S+)", run.err)
    assert started is not None, run.err
    assert "throw-away PostgreSQL stopped and removed" in run.err
    assert not Path(started.group(1)).exists()
    assert not await answers(port)


async def test_a_running_postgres_or_a_given_url_is_used_as_it_is() -> None:
    port = free_port()
    given = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
    run = await run_script(
        sys.executable,
        "-c",
        "import os; print(os.environ['SEALRELAY_TEST_POSTGRES_URL'])",
        env={"SEALRELAY_TEST_POSTGRES_PORT": str(port), "SEALRELAY_TEST_POSTGRES_URL": given},
    )
    assert (run.code, run.out.strip()) == (0, given), run.err
    assert "throw-away" not in run.err and not await answers(port)


async def test_missing_browser_without_root_stops_with_one_line_saying_how() -> None:
    user = "nobody" if os.geteuid() == 0 else None
    run = await run_script(
        "true", env={"SEALRELAY_TEST_CHROMIUM": "/nonexistent/chromium"}, user=user
    )
    assert run.code == 1
    [line] = run.err.strip().splitlines()
    assert "chromium missing" in line and "apt-get install chromium" in line, line
