"""IT and the newcomer: the `sealrelay` script finds its config as users expect, names the key
and the path of every problem at once, and never creates a database by only looking.

Every test runs the installed script as a process, as an admin would.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.config import SYSTEM_CONFIG
from tests.cli_runner import SEALRELAY, Run, sealrelay, write_config
from tests.letters.test_consent_pdf import DEJAVU
from tests.support import LETTER_TOML, free_port

AGENT = "anna@broker.example"


def errors(run: Run) -> list[str]:
    return [line for line in run.err.splitlines() if line.startswith("Error:")]


# -- item 19: every problem named, with its key and path, all at once -------------------------


async def test_serve_names_the_key_and_path_of_a_missing_certificate(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        extra=(
            "[smtp]\n"
            f'listen = ["127.0.0.1:{free_port()}"]\n'
            f'tls_cert = "{tmp_path}/tls/missing.crt"\n'
            f'tls_key = "{tmp_path}/tls/missing.key"\n'
            f'[web]\nlisten = "127.0.0.1:{free_port()}"\n'
        ),
    )
    run = await sealrelay("serve", "--config", str(config))
    assert run.code == 1
    assert errors(run) == [
        f"Error: config error: smtp.tls_cert: {tmp_path}/tls/missing.crt: no such file",
        f"Error: config error: smtp.tls_key: {tmp_path}/tls/missing.key: no such file",
    ]
    assert "Errno" not in run.err


async def test_check_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    occupied = tmp_path / "not-a-directory"
    occupied.write_text("a file where the blobs should go\n")
    config = tmp_path / "relay.toml"
    config.write_text(
        "[smtp]\n"
        "max_recipients = 0\n"
        "[upstream]\n"
        "url = 'http://wrong.example'\n"
        "[storage]\n"
        f"path = '{occupied}/blobs'\n"
        "[dkim.'broker.example']\n"
        "selector = 's2026'\n"
        f"key_file = '{tmp_path}/dkim/missing.pem'\n"
        "[letter]\n"
        f"terms_pdf = {{ de = '{tmp_path}' }}\n"
    )
    run = await sealrelay("check-config", str(config))
    assert (run.code, run.out) == (1, "")
    assert sorted(errors(run)) == sorted(
        [
            "Error: config error: smtp.max_recipients: Input should be greater than or equal to 1",
            "Error: config error: upstream.url: must be smtp://HOST[:PORT], smtps://HOST[:PORT],"
            " capture:DIR or mx:",
            f"Error: config error: storage.path: {occupied}/blobs cannot be created:"
            f" {occupied} is not a directory",
            f"Error: config error: dkim.broker.example.key_file: {tmp_path}/dkim/missing.pem:"
            " no such file; create it with `sealrelay dkim keygen --domain broker.example"
            f" --selector s2026 --out {tmp_path}/dkim/missing.pem`",
            f"Error: config error: letter.terms_pdf.de: {tmp_path} is a directory, not a file",
        ]
    )


async def test_check_config_finds_what_a_valid_file_points_at(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    listen = f"127.0.0.1:{free_port()}"
    swapped = tmp_path / "swapped.toml"
    swapped.write_text(
        f"[smtp]\nlisten = ['{listen}']\ntls_cert = '{key}'\ntls_key = '{cert}'\n"
        f"[upstream]\nurl = 'smtp://smarthost.example:587'\n"
        f"[database]\nurl = 'sqlite+aiosqlite:///{tmp_path}/relay.db'\n"
        f"[storage]\npath = '{cert}'\n" + LETTER_TOML
    )
    plaintext = write_config(
        tmp_path, "plain.toml", f"[smtp]\nlisten = ['0.0.0.0:{free_port()}']\n"
    )
    wrong, exposed = await asyncio.gather(
        sealrelay("check-config", "--config", str(swapped)),
        sealrelay("check-config", str(plaintext)),
    )
    assert wrong.code == 1
    assert errors(wrong) == [
        f"Error: config error: smtp.tls_cert: {key} with key {cert}: not a certificate and"
        f" matching private key in PEM ({errors(wrong)[0].rpartition('PEM (')[2]}",
        f"Error: config error: storage.path: {cert} exists and is not a directory",
    ]
    assert exposed.code == 1
    assert errors(exposed)[0].startswith("Error: config error: smtp.listen: 0.0.0.0:") and errors(
        exposed
    )[0].endswith(
        "agents could not log in: set smtp.tls_cert and smtp.tls_key,"
        " or allow_plaintext_auth_on_loopback on a loopback address"
    )


@pytest.fixture
def foreign_directory() -> Iterator[Path]:
    """A directory owned by another user (`nobody`, mode 755): readable, not writable."""
    directory = Path(tempfile.mkdtemp(prefix="sealrelay-perm-"))
    directory.chmod(0o755)
    os.chown(directory, 65534, 65534)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def without_privilege() -> list[str]:
    """How to run a command with file permissions enforced even for root (as in production,
    where the relay runs as its own user and root owns /etc and /var)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("root runs this test through setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


async def test_check_config_refuses_paths_the_relay_user_cannot_use(
    foreign_directory: Path,
) -> None:
    secret_key = foreign_directory / "dkim.pem"
    secret_key.write_text("-----BEGIN PRIVATE KEY-----\n")
    secret_key.chmod(stat.S_IRUSR | stat.S_IWUSR)
    os.chown(secret_key, 65534, 65534)
    config = foreign_directory.parent / f"{foreign_directory.name}.toml"
    config.write_text(
        "[server]\npublic_url = 'https://relay.broker.example'\n"
        "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
        "[upstream]\nurl = 'smtp://smarthost.example:587'\n"
        f"[database]\nurl = 'sqlite+aiosqlite:///{foreign_directory}/relay.db'\n"
        f"[storage]\npath = '{foreign_directory}/blobs'\n"
        f"[dkim.'broker.example']\nselector = 's1'\nkey_file = '{secret_key}'\n"
        "[policy]\ninternal_domains = ['broker.example']\n" + LETTER_TOML
    )
    try:
        process = await asyncio.create_subprocess_exec(
            *without_privilege(),
            str(SEALRELAY),
            "check-config",
            str(config),
            env={k: v for k, v in os.environ.items() if not k.startswith("SEALRELAY_")},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    finally:
        config.unlink()
    assert process.returncode == 1, (out, err)
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    assert sorted(err.decode().splitlines()) == [
        f"Error: config error: database.url: {foreign_directory} is not writable by {user}",
        f"Error: config error: dkim.broker.example.key_file: {secret_key} is not readable"
        f" by {user}",
        f"Error: config error: storage.path: {foreign_directory}/blobs does not exist and"
        f" {foreign_directory} is not writable by {user}",
    ]


async def test_check_config_warns_of_capture_and_unknown_groups(
    tmp_path: Path, database_url: str
) -> None:
    config = write_config(
        tmp_path,
        extra=(
            "[[groups]]\nname = 'international'\nlanguage = 'en'\n"
            "[[rules]]\nname = 'sales-videos'\nmatch.groups = ['sale']\n"
        ),
    )
    config.write_text(
        config.read_text().replace(f"sqlite+aiosqlite:///{tmp_path}/relay.db", database_url)
        + f"[upstream]\nurl = 'capture:{tmp_path}/outbox'\n"
        + "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
    )
    added = await sealrelay("user", "add", AGENT, "--group", "sales", "--config", str(config))
    assert added.code == 0, added.err
    assert added.err == (
        "Warning: group 'sales' is not in the config's [[groups]]; the [policy] defaults apply"
        " to this agent until it is\n"
    )
    checked = await sealrelay("check-config", str(config))
    assert checked.code == 0, checked.err
    assert checked.out.startswith(f"{config}: ok (")
    assert sorted(checked.err.splitlines()) == [
        "Warning: dkim: no key configured: every registered letter (offer) is refused with 550"
        ' until [dkim."DOMAIN"] is set for the sender\'s domain',
        f"Warning: groups: user {AGENT} is in group 'sales', which is not in [[groups]];"
        " the [policy] defaults apply to them",
        "Warning: rules.0.match.groups: rule 'sales-videos' matches group 'sale', which is not"
        " in [[groups]]",
        f"Warning: upstream.url: capture:{tmp_path}/outbox: outgoing mail is written to files"
        f" in {tmp_path}/outbox, nothing is sent; set smtp://HOST:PORT or smtps://HOST:PORT"
        " to deliver",
    ]


@pytest.mark.parametrize(
    ("setting", "warned"),
    [
        ("", True),
        ("[policy]\ninternal_domains = []\n", False),
        ("[policy]\ninternal_domains = ['broker.example']\n", False),
        ("[[groups]]\nname = 'sales'\ninternal_domains = ['broker.example']\n", False),
    ],
)
async def test_check_config_warns_when_the_signed_domains_are_not_called_internal(
    tmp_path: Path, dkim_key_file: Path, setting: str, warned: bool
) -> None:
    """Without internal_domains a colleague's mail is planned as a prospect's; once it is
    set anywhere, even empty, the admin decided."""
    config = write_config(
        tmp_path,
        extra="[smtp]\nallow_plaintext_auth_on_loopback = true\n"
        f"[dkim.'broker.example']\nselector = 's1'\nkey_file = '{dkim_key_file}'\n{setting}",
    )
    checked = await sealrelay("check-config", str(config))
    assert checked.code == 0, checked.err
    found = [line for line in checked.err.splitlines() if "internal_domains" in line]
    if warned:
        assert found == [
            "Warning: policy.internal_domains: not set: mail to colleagues at broker.example is"
            " handled as mail to prospects (attachments become links, offers registered"
            " letters, winmail.dat unpacked); list the brokerage's own domains, or set it to []"
            " to keep it so"
        ]
    else:
        assert found == []


@pytest.mark.parametrize(
    ("public_url", "warning"),
    [
        (None, "http://127.0.0.1:8080 is this machine's own address: the download links"),
        ("http://[::1]:8080", "http://[::1]:8080 is this machine's own address"),
        ("https://10.1.2.3", "https://10.1.2.3 is an address of a private network"),
        ("http://relay.broker.example", "personal links would travel unencrypted"),
        ("https://relay.broker.example", None),
    ],
)
async def test_check_config_warns_of_links_prospects_cannot_open(
    tmp_path: Path, public_url: str | None, warning: str | None
) -> None:
    """A relay that sends mail with `server.public_url` left at its default puts links to
    its own loopback into every prospect's mail: check-config says so (a warning: a
    staging relay may mean it). With a capture: upstream nothing leaves, nothing to say."""
    server = f"public_url = '{public_url}'\n" if public_url else ""
    config = write_config(
        tmp_path,
        extra="[smtp]\nallow_plaintext_auth_on_loopback = true\n"
        "[upstream]\nurl = 'smtp://127.0.0.1:2526'\n",
    )
    config.write_text(
        config.read_text().replace("[server]\n", f"[server]\n{server}"), encoding="utf-8"
    )
    checked = await sealrelay("check-config", str(config))
    assert checked.code == 0, checked.err
    found = [line for line in checked.err.splitlines() if "server.public_url" in line]
    if warning is None:
        assert found == []
    else:
        [line] = found
        assert line.startswith("Warning: server.public_url: ") and warning in line, line
    captured = config.read_text().replace("smtp://127.0.0.1:2526", f"capture:{tmp_path}/out")
    config.write_text(captured, encoding="utf-8")
    checked = await sealrelay("check-config", str(config))
    assert checked.code == 0 and "public_url" not in checked.err, checked.err


async def test_check_config_names_a_consent_pdf_font_that_is_none_or_lacks_styles(
    tmp_path: Path,
) -> None:
    """A file that is no font stops start-up; a regular file with no bold or italic beside it
    is worth a warning (those styles are drawn in it); DejaVu's family as installed, none."""
    not_a_font = tmp_path / "fonts" / "Logo.ttf"
    not_a_font.parent.mkdir()
    not_a_font.write_bytes(b"<svg/>")
    alone = tmp_path / "fonts" / "DejaVuSans.ttf"
    shutil.copyfile(DEJAVU, alone)
    outcomes = []
    for font in (not_a_font, alone, DEJAVU):
        extra = "[smtp]\nallow_plaintext_auth_on_loopback = true\n" + LETTER_TOML
        config = write_config(tmp_path / font.stem, extra=extra + f"pdf_font = '{font}'\n")
        outcomes.append(await sealrelay("check-config", str(config)))
    wrong, lacking, family = outcomes
    assert wrong.code == 1
    assert errors(wrong) == [
        f"Error: config error: letter.pdf_font: {not_a_font} is not a TrueType or OpenType"
        " font (.ttf, .otf, .ttc)"
    ]
    assert lacking.code == 0, lacking.err
    assert (
        "Warning: letter.pdf_font: no bold, italic, bold italic file beside DejaVuSans.ttf: the"
        " consent PDF draws those styles in the regular one"
    ) in lacking.err.splitlines()
    assert family.code == 0, family.err
    assert "pdf_font" not in family.err


# -- item 20: the config found as users expect; looking never creates a database ---------------


async def test_commands_find_the_config_as_users_expect(tmp_path: Path) -> None:
    assert not SYSTEM_CONFIG.exists(), "a system-wide config would change what this test finds"
    here, elsewhere, third = tmp_path / "here", tmp_path / "elsewhere", tmp_path / "third"
    local = write_config(here)  # ./sealrelay.toml
    named = write_config(elsewhere, "named.toml")
    explicit = write_config(third, "explicit.toml")
    created = await asyncio.gather(
        sealrelay("user", "add", "local@broker.example", cwd=here),
        sealrelay("user", "add", "env@broker.example", env={"SEALRELAY_CONFIG": str(named)}),
        sealrelay("user", "add", "opt@broker.example", "-c", str(explicit),
                  env={"SEALRELAY_CONFIG": str(named)}),
    )  # fmt: skip
    assert [run.code for run in created] == [0, 0, 0], [run.err for run in created]
    assert all("no config file found" not in run.err for run in created)
    from_local, from_env, from_option, typo = await asyncio.gather(
        sealrelay("user", "list", cwd=here),
        sealrelay("user", "list", cwd=here, env={"SEALRELAY_CONFIG": str(named)}),
        sealrelay("user", "list", "--config", str(explicit), cwd=here),
        sealrelay("user", "list", cwd=here, env={"SEALRELAY_CONFIG": str(tmp_path / "typo")}),
    )
    assert from_local.out == "local@broker.example  [agent]\n"
    assert from_env.out == "env@broker.example  [agent]\n"
    assert from_option.out == "opt@broker.example  [agent]\n"
    assert (typo.code, typo.out) == (1, "")
    assert typo.error_line == f"Error: config error: SEALRELAY_CONFIG {tmp_path}/typo: no such file"
    named_typo = await sealrelay("check-config", str(tmp_path / "typo.toml"), cwd=here)
    assert named_typo.error_line == f"Error: config error: {tmp_path}/typo.toml: no such file"
    assert local.exists() and not (here / "var").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("verify", "--journal"),
        ("queue", "list", "--all"),
        ("user", "list"),
        ("evidence", "0123456789abcdef"),
        ("queue", "retry", "0123456789abcdef"),
        ("links", "expire"),
    ],
)
async def test_commands_without_a_config_never_create_a_database(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    run = await sealrelay(*command, cwd=tmp_path)
    assert (run.code, run.out) == (1, "")
    assert run.err.splitlines() == [
        "Note: no config file found (--config FILE, $SEALRELAY_CONFIG, ./sealrelay.toml or"
        f" /etc/sealrelay/sealrelay.toml); using the embedded defaults in {tmp_path}",
        f"Error: database.url: there is no database at {tmp_path}/var/sealrelay.db; is this the"
        " right config? `sealrelay db upgrade` creates one",
    ]
    assert list(tmp_path.iterdir()) == []


async def test_check_config_without_a_config_says_what_it_checked(tmp_path: Path) -> None:
    run = await sealrelay("check-config", cwd=tmp_path)
    assert run.code == 1
    assert run.err.splitlines()[0].startswith("Note: no config file found")
    assert "Error: config error: smtp.listen: 127.0.0.1:2525: agents could not log in" in run.err
    assert list(tmp_path.iterdir()) == []


async def test_commands_refuse_a_database_without_tables(tmp_path: Path, database_url: str) -> None:
    if database_url.startswith("sqlite"):
        (tmp_path / "relay.db").touch()
    config = write_config(tmp_path)
    config.write_text(
        config.read_text().replace(f"sqlite+aiosqlite:///{tmp_path}/relay.db", database_url)
    )
    listed, verified, retried = await asyncio.gather(
        sealrelay("queue", "list", "-c", str(config)),
        sealrelay("verify", "--journal", "-c", str(config)),
        sealrelay("queue", "retry", "0123456789abcdef", "-c", str(config)),
    )
    for run in (listed, verified, retried):
        assert (run.code, run.out) == (1, "")
        assert run.error_line.startswith("Error: database.url: ")
        assert run.error_line.endswith(
            " holds no sealrelay tables; is this the right config?"
            " `sealrelay db upgrade` creates them"
        )
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda sync: sync.dialect.get_table_names(sync))
            assert tables == []
            await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    upgraded = await sealrelay("db", "upgrade", "-c", str(config))
    assert upgraded.code == 0, upgraded.err
    empty = await sealrelay("verify", "--journal", "-c", str(config))
    assert (empty.code, empty.out) == (0, "journal OK: 0 events, chain intact\n")


async def test_serve_names_a_listen_address_that_is_taken(tmp_path: Path) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        config = write_config(
            tmp_path,
            extra=(
                f"[smtp]\nlisten = ['127.0.0.1:{port}']\nallow_plaintext_auth_on_loopback = true\n"
                f"[web]\nlisten = '127.0.0.1:{free_port()}'\n"
                "[upstream]\nurl = 'smtp://smarthost.example:587'\n"
            ),
        )
        run = await sealrelay("serve", "--config", str(config))
    finally:
        taken.close()
        await taken.wait_closed()
    assert run.code == 1
    assert run.error_line == (
        f"Error: config error: smtp.listen: 127.0.0.1:{port}: cannot listen: Address already in use"
    )


async def test_an_upstream_username_needs_its_password_for_check_config_not_for_admin_work(
    tmp_path: Path,
) -> None:
    """Without it every send would fail and the copies wait out the queue's lifetime. The
    password belongs in the relay's environment, which the admin's shell need not have."""
    config = write_config(
        tmp_path,
        extra=(
            "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
            '[upstream]\nurl = "smtp://smtp.example.com:587"\nusername = "relay@broker.example"\n'
            '[upstreams.m365]\nurl = "smtp://m365.example:587"\npassword = "pw"\n'
        ),
    )
    checked, added = await asyncio.gather(
        sealrelay("check-config", "--config", str(config)),
        sealrelay("user", "add", AGENT, "--config", str(config)),
    )
    assert checked.code == 1
    assert errors(checked) == [
        "Error: config error: upstream.password: missing: username 'relay@broker.example'"
        " needs its password, here or, better, in the relay's environment"
        " (SEALRELAY_UPSTREAM__PASSWORD) or in a file named by password_file",
        "Error: config error: upstreams.m365.username: missing: a password alone logs in as nobody",
    ]
    assert added.code == 0, added.err
    with_secret = await sealrelay(
        "check-config", "--config", str(config), env={"SEALRELAY_UPSTREAM__PASSWORD": "secret"}
    )
    assert [line for line in errors(with_secret) if "upstream.password" in line] == []
    assert "upstreams.m365.username" in with_secret.err


async def test_a_password_file_serves_an_upstream_no_variable_can_name(tmp_path: Path) -> None:
    """`[upstreams.brand-two]`: no shell or systemd unit takes SEALRELAY_UPSTREAMS__BRAND-TWO__
    PASSWORD, so check-config points to password_file, and a file there is checked as the
    relay will read it."""
    upstream = '[upstreams.brand-two]\nurl = "smtp://partner.example:587"\nusername = "relay"\n'
    base = "[smtp]\nallow_plaintext_auth_on_loopback = true\n"
    config = write_config(tmp_path, extra=base + upstream)
    missing = await sealrelay("check-config", "--config", str(config))
    assert [line for line in errors(missing) if "brand-two" in line] == [
        "Error: config error: upstreams.brand-two.password: missing: username 'relay' needs its"
        " password, here or, better, in a file named by password_file (no environment variable"
        " can set it: upstreams.brand-two has characters other than a-z, 0-9 and _)"
    ]
    secret = tmp_path / "brand-two.password"
    for content, problem in (
        (None, f"{secret}: no such file"),
        ("\n", f"{secret} is empty; it must hold the password"),
        ("s3cret\n", None),
    ):
        if content is not None:
            secret.write_text(content)
            secret.chmod(0o600)
        config = write_config(tmp_path, extra=base + upstream + f'password_file = "{secret}"\n')
        checked = await sealrelay("check-config", "--config", str(config))
        found = [line for line in errors(checked) if "brand-two" in line]
        expected = f"Error: config error: upstreams.brand-two.password_file: {problem}"
        assert found == ([expected] if problem else []), checked.err
        assert "can be read by other users" not in checked.err
    secret.chmod(0o640)
    shared = await sealrelay("check-config", "--config", str(config))
    assert shared.code == 0
    assert [line for line in shared.err.splitlines() if "brand-two" in line] == [
        f"Warning: upstreams.brand-two.password_file: {secret} can be read by other users;"
        " chmod 600 it"
    ]
    both = write_config(
        tmp_path, extra=base + upstream + f'password = "pw"\npassword_file = "{secret}"\n'
    )
    refused = await sealrelay("check-config", "--config", str(both))
    assert refused.code == 1 and "set one of them, not both" in refused.err
