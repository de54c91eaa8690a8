"""Everything a settings file names, checked before the relay relies on it.

Pydantic checks the shape of each value; this checks the world those values point at: the
certificate can be read, the blob directory can be written by the user the relay runs as,
the DKIM keys load. `check-config` reports every problem at once and `serve` refuses to start
on any error, each line naming the key and the path, so IT fixes a file in one round instead of
meeting `[Errno 2] No such file or directory` one problem at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import pwd
import socket
import ssl
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import make_url

from gateway import agent_logins
from gateway.config import (
    ConfigError,
    DkimDomain,
    LetterSettings,
    LoopSettings,
    Settings,
    SmtpSettings,
    StorageSettings,
    UpstreamSettings,
    environment_variable,
    read_config,
    read_secret,
    settable_from_environment,
    validation_problems,
)
from gateway.fronts.listen_addresses import (
    is_loopback,
    listen_host,
    logins_needed,
    plaintext_logins_allowed,
)
from gateway.fronts.trusted import TrustedEntry
from gateway.letters import letter_keys
from gateway.letters.pdf_font import STYLE_NAMES, font_files, font_problem
from gateway.mail import dkim
from gateway.mail.loop_mark import LoopKeyError, load_or_create_key
from gateway.problems import Problem
from gateway.texts import files as text_files

if TYPE_CHECKING:  # aiobotocore is the optional s3 extra
    from gateway.store.s3_blobs import S3BlobStore

BUCKET_PROBE_TIMEOUT = 20  # seconds for check-config to list, write and delete in a bucket


def check_config(
    path: Path | None, environ: Mapping[str, str] | None = None, *, reach_bucket: bool = True
) -> tuple[Settings | None, list[Problem]]:
    """The settings (None when they do not validate) and every problem found in them.
    `reach_bucket`: list, write and delete in an s3:// store's bucket, and call it an error
    when that fails (check-config does; serve starts degraded instead, BlobHealth)."""
    try:
        data, sources = read_config(path, environ)
    except ConfigError as exc:
        return None, [Problem(str(path), line.removeprefix(f"{path}: ")) for line in exc.problems]
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = [_split(line) for line in validation_problems(exc, sources)]
        return None, problems + list(_sections_that_validate(data)) + list(_texts())
    return settings, list(settings_problems(settings, reach_bucket=reach_bucket))


def settings_problems(settings: Settings, *, reach_bucket: bool = True) -> Iterator[Problem]:
    """What the valid settings point at: files, directories, keys, names."""
    yield from _smtp(settings.smtp)
    yield from _public_url(settings)
    yield from _upstream(settings.upstream)
    for name, upstream in settings.upstreams.items():
        yield from _upstream(upstream, f"upstreams.{name}")
    yield from _direct_delivery(settings)
    yield from _database(settings.database.url)
    yield from _storage(settings.storage, reach_bucket=reach_bucket)
    yield from _secrets(settings)
    for domain, entry in settings.dkim.items():
        yield from _dkim(domain, entry)
    yield from _loop(settings.loop)
    yield from _letter(settings.letter)
    yield from _texts()
    yield from _letter_texts(settings)
    yield from _letter_keys(settings)
    yield from _rule_groups(settings)
    yield from _internal_domains(settings)


def unknown_group_problems(settings: Settings, user_groups: Mapping[str, str]) -> list[Problem]:
    """Users (email -> group) whose group is not configured: the defaults apply to them."""
    known = {group.name for group in settings.groups}
    return [
        Problem(
            "groups",
            f"user {email} is in group {group!r}, which is not in [[groups]];"
            " the [policy] defaults apply to them",
            error=False,
        )
        for email, group in sorted(user_groups.items())
        if group not in known
    ]


def _split(line: str) -> Problem:
    key, _, text = line.partition(": ")
    return Problem(key, text)


def _sections_that_validate(data: Mapping[str, Any]) -> Iterator[Problem]:
    """File checks of the sections that are valid on their own, while others are not."""
    checks: list[tuple[str, type[BaseModel], Callable[[Any], Iterator[Problem]]]] = [
        ("smtp", SmtpSettings, _smtp),
        ("upstream", UpstreamSettings, _upstream),
        ("storage", StorageSettings, _storage),
        ("letter", LetterSettings, _letter),
    ]
    for name, model, check in checks:
        try:
            section = model.model_validate(data.get(name, {}))
        except ValidationError:
            continue  # its errors are reported already
        yield from check(section)
    dkim_table = data.get("dkim", {})
    if isinstance(dkim_table, Mapping):
        for domain, entry in dkim_table.items():
            try:
                yield from _dkim(str(domain).lower(), DkimDomain.model_validate(entry))
            except ValidationError:
                continue


# -- the sections


def _smtp(smtp: SmtpSettings) -> Iterator[Problem]:
    for entry in smtp.trusted:
        try:
            TrustedEntry.load(entry)
        except RuntimeError as exc:
            yield Problem("smtp.trusted", str(exc).removeprefix("smtp.trusted "))
    if smtp.tls_cert is None or smtp.tls_key is None:
        yield from _logins_without_tls(smtp)
        return
    missing = [
        problem
        for key, path in (("smtp.tls_cert", smtp.tls_cert), ("smtp.tls_key", smtp.tls_key))
        if (problem := readable_file(key, path)) is not None
    ]
    if missing:
        yield from missing
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(smtp.tls_cert, smtp.tls_key)
    except (OSError, ssl.SSLError) as exc:
        yield Problem(
            "smtp.tls_cert",
            f"{_shown(smtp.tls_cert)} with key {_shown(smtp.tls_key)}: not a certificate and"
            f" matching private key in PEM ({exc.strerror or exc})",
        )


def _logins_without_tls(smtp: SmtpSettings) -> Iterator[Problem]:
    for address in smtp.listen:
        if logins_needed(smtp, address) and not plaintext_logins_allowed(
            smtp, listen_host(address)
        ):
            yield Problem(
                "smtp.listen",
                f"{address}: agents could not log in: set smtp.tls_cert and smtp.tls_key,"
                " or allow_plaintext_auth_on_loopback on a loopback address",
            )


def _public_url(settings: Settings) -> Iterator[Problem]:
    """The address every download link and letter in prospects' mail points at. Left at its
    default on a relay that sends mail, the links lead to the relay's own machine: a
    warning, since a staging relay may mean it, but one no real prospect could follow."""
    if settings.upstream.url.startswith("capture:"):
        return  # nothing leaves this relay: a machine of one's own
    url = settings.server.public_url
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if is_loopback(host) or (address is not None and address.is_unspecified):
        where = "this machine's own address"
    elif address is not None and (address.is_private or address.is_link_local):
        where = "an address of a private network"
    elif parts.scheme == "http":
        yield Problem(
            "server.public_url",
            f"{url}: prospects' personal links would travel unencrypted; serve the web over"
            " https:// (a reverse proxy, docs/deployment.md)",
            error=False,
        )
        return
    else:
        return
    yield Problem(
        "server.public_url",
        f"{url} is {where}: the download links and letters in prospects' mail would lead"
        " nowhere they can reach; set the https:// address prospects open them at",
        error=False,
    )


def _upstream(upstream: UpstreamSettings, key: str = "upstream") -> Iterator[Problem]:
    """`key`: the table, `upstream` or a named one's `upstreams.NAME`."""
    yield from _login(upstream, key)
    yield from _client_certificate(upstream, key)
    if not upstream.url.startswith("capture:"):
        return
    directory = Path(upstream.url.removeprefix("capture:"))
    problem = writable_directory(f"{key}.url", directory)
    if problem is not None:
        yield problem
    yield Problem(
        f"{key}.url",
        f"{upstream.url}: outgoing mail is written to files in {_shown(directory)}, nothing is"
        " sent; set smtp://HOST:PORT or smtps://HOST:PORT to deliver",
        error=False,
    )


def _login(upstream: UpstreamSettings, key: str) -> Iterator[Problem]:
    """Both or neither: a login without its password fails at every send, and the copies
    would wait out queue_lifetime deferred. Here and not in the settings' validation, so
    that admin commands run without the secret in their environment or its file."""
    if upstream.password_file is not None:
        yield from _password_file(upstream.password_file, f"{key}.password_file")
    has_password = upstream.password is not None or upstream.password_file is not None
    if upstream.username is not None and not has_password:
        variable = environment_variable(f"{key}.password")
        where = (
            f"in the relay's environment ({variable}) or in a file named by password_file"
            if settable_from_environment(f"{key}.password")
            else "in a file named by password_file (no environment variable can set it:"
            f" {key} has characters other than a-z, 0-9 and _)"
        )
        yield Problem(
            f"{key}.password",
            f"missing: username {upstream.username!r} needs its password, here or, better, {where}",
        )
    elif has_password and upstream.username is None:
        yield Problem(f"{key}.username", "missing: a password alone logs in as nobody")


def _password_file(path: Path, key: str) -> Iterator[Problem]:
    problem = readable_file(key, path)
    if problem is not None:
        yield problem
        return
    try:
        secret = read_secret(path)
    except (OSError, UnicodeDecodeError) as exc:
        yield Problem(key, f"{_shown(path)}: cannot read: {exc}")
        return
    if not secret:
        yield Problem(key, f"{_shown(path)} is empty; it must hold the password")
    yield from _open_to_others(key, path)


def _client_certificate(upstream: UpstreamSettings, key: str) -> Iterator[Problem]:
    """The certificate and key load together, as each connection to the upstream uses them."""
    certificate, private_key = upstream.client_certificate, upstream.client_key
    if certificate is None or private_key is None:
        return
    unreadable = [
        problem
        for name, path in (("client_certificate", certificate), ("client_key", private_key))
        if (problem := readable_file(f"{key}.{name}", path)) is not None
    ]
    if unreadable:
        yield from unreadable
        return
    if upstream.url.startswith("capture:"):
        yield Problem(
            f"{key}.client_certificate",
            f"{upstream.url}: nothing is sent, so the certificate is not used",
            error=False,
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        yield Problem(
            f"{key}.client_certificate",
            f"{_shown(certificate)} with {key}.client_key {_shown(private_key)}: not a"
            f" certificate and its matching private key in PEM ({exc.strerror or exc})",
        )


def _direct_delivery(settings: Settings) -> Iterator[Problem]:
    """With `mx:`, receivers see the EHLO name and the trust roots decide MTA-STS."""
    if settings.upstream.url != "mx:":
        return
    name = settings.server.hostname.rstrip(".")
    if "." not in name or name.endswith((".local", ".localdomain", ".internal", ".lan")):
        yield Problem(
            "server.hostname",
            f"{name}: direct delivery greets MX hosts with this name; it must be a public"
            " name whose A record and PTR match the relay's address (docs/direct-delivery.md)",
            error=False,
        )
    if settings.mx.ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(settings.mx.ca_file))
        except (OSError, ssl.SSLError) as exc:
            yield Problem("mx.ca_file", f"{settings.mx.ca_file}: not PEM certificates: {exc}")


def _database(url: str) -> Iterator[Problem]:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database is None:
        return  # Settings refuses a SQLite database without a file
    path = Path(parsed.database)
    problem = (
        writable_file("database.url", path)
        if path.exists()
        else writable_directory("database.url", path.parent)
    )
    if problem is not None:
        yield problem


def _storage(storage: StorageSettings, *, reach_bucket: bool = True) -> Iterator[Problem]:
    if storage.bucket is not None:
        yield from _bucket(storage, reach_bucket)
        return
    problem = writable_directory("storage.path", storage.path)
    if problem is not None:
        yield problem


def _bucket(storage: StorageSettings, reach: bool) -> Iterator[Problem]:
    """The secret key file, then the bucket itself: listed, written and deleted under the
    prefix, as the relay will, so a wrong key, bucket or policy shows before the first mail."""
    secret = storage.secret_access_key_file
    if secret is not None:
        if (problem := readable_file("storage.secret_access_key_file", secret)) is not None:
            yield problem
            return
        yield from _open_to_others("storage.secret_access_key_file", secret)
    try:
        from gateway.store import s3_blobs
    except ImportError:
        yield Problem(
            "storage.url", "an s3:// store needs aiobotocore: pip install 'sealrelay[s3]'"
        )
        return
    if not reach:
        return
    try:
        _in_own_loop(_probe(s3_blobs.s3_store(storage, connect_timeout=5, max_attempts=2)))
    except OSError as exc:
        yield Problem("storage.url", str(exc))


async def _probe(store: S3BlobStore) -> None:
    try:
        async with asyncio.timeout(BUCKET_PROBE_TIMEOUT):
            await store.probe()
    except TimeoutError as exc:
        raise OSError(f"no answer from the bucket within {BUCKET_PROBE_TIMEOUT} s") from exc
    finally:
        await store.close()


def _in_own_loop(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to the end on an event loop of its own, in a thread: the checks are
    synchronous and their caller may be running a loop already."""
    with ThreadPoolExecutor(1, thread_name_prefix="config-check") as thread:
        thread.submit(asyncio.run, work).result()


def _secrets(settings: Settings) -> Iterator[Problem]:
    """The login key, when there is one: readable, 32 bytes, for the relay's user only. A
    missing one is made when the first login is set (never shown: only its size and mode)."""
    path = agent_logins.key_path(settings)
    if not path.exists():
        return
    if (problem := readable_file("secrets.key_file", path)) is not None:
        yield problem
        return
    if path.stat().st_size != agent_logins.KEY_BYTES:
        yield Problem(
            "secrets.key_file", f"{_shown(path)} must hold exactly {agent_logins.KEY_BYTES} bytes"
        )
    yield from _open_to_others("secrets.key_file", path)


def _open_to_others(key: str, path: Path) -> Iterator[Problem]:
    """A warning: a secret the group or others may read is one a mistake away from leaking."""
    if path.stat().st_mode & 0o077:
        yield Problem(key, f"{_shown(path)} can be read by other users; chmod 600 it", error=False)


def _dkim(domain: str, entry: DkimDomain) -> Iterator[Problem]:
    key = f"dkim.{domain}.key_file"
    problem = readable_file(key, entry.key_file)
    if problem is not None and not entry.key_file.exists():
        yield Problem(
            key,
            f"{problem.text}; create it with `sealrelay dkim keygen --domain {domain}"
            f" --selector {entry.selector} --out {entry.key_file}`",
        )
        return
    if problem is not None:
        yield problem
        return
    try:
        dkim.DkimKey.load(domain, entry.selector, entry.key_file)
    except dkim.DkimError as exc:
        yield Problem(key, str(exc))


def _loop(loop: LoopSettings) -> Iterator[Problem]:
    """The loop key: a valid key, or a directory where the relay can make one at start."""
    if not loop.key_file.exists():
        problem = writable_directory("loop.key_file", loop.key_file.parent)
        if problem is not None:
            yield Problem(problem.key, f"the key is made there at start, but {problem.text}")
        return
    problem = readable_file("loop.key_file", loop.key_file)
    if problem is not None:
        yield problem
        return
    try:
        load_or_create_key(loop.key_file)
    except LoopKeyError as exc:
        yield Problem("loop.key_file", str(exc).removeprefix(f"loop.key_file {loop.key_file}: "))


def _letter(letter: LetterSettings) -> Iterator[Problem]:
    for name, directory in letter.block_sets.items():
        problem = readable_directory(f"letter.block_sets.{name}", directory)
        if problem is not None:
            yield problem
    for language, pdf in letter.terms_pdf.items():
        problem = readable_file(f"letter.terms_pdf.{language}", pdf)
        if problem is not None:
            yield problem
    if letter.pdf_font is not None:
        yield from _pdf_font(letter.pdf_font)


def _pdf_font(path: Path) -> Iterator[Problem]:
    if (problem := readable_file("letter.pdf_font", path)) is not None:
        yield problem
        return
    if (text := font_problem(path)) is not None:
        yield Problem("letter.pdf_font", text)
        return
    files = font_files(path)
    lacking = [name for style, name in STYLE_NAMES.items() if files[style] == path]
    if lacking:
        yield Problem(
            "letter.pdf_font",
            f"no {', '.join(lacking)} file beside {path.name}: the consent PDF draws those"
            " styles in the regular one",
            error=False,
        )


def _texts() -> Iterator[Problem]:
    """Every shipped language's file of every text kind, with the keys the others have."""
    for problem in text_files.text_problems():
        yield Problem("texts", problem)


def _letter_texts(settings: Settings) -> Iterator[Problem]:
    """The block sets load as the relay will load them (only once their directories exist)."""
    from gateway.letters.blocks import BlockSets  # spares every other command the Markdown parser

    letter = settings.letter
    if any(not directory.is_dir() for directory in letter.block_sets.values()):
        return
    try:
        BlockSets(settings)
    except ValueError as exc:
        yield Problem("letter.block_sets", str(exc))
        return
    for name, directory in letter.block_sets.items():
        for problem in text_files.block_set(name, directory).problems():
            # the broker's texts: a checkbox in one language only may be meant
            yield Problem(f"letter.block_sets.{name}", problem, error=False)


def _letter_keys(settings: Settings) -> Iterator[Problem]:
    """Letters that could only go out unsigned are refused: say so before mail is sent."""
    yield from letter_keys.problems(settings)


def _rule_groups(settings: Settings) -> Iterator[Problem]:
    known = {group.name for group in settings.groups}
    for index, rule in enumerate(settings.rules):
        for group in rule.match.groups:
            if group not in known:
                yield Problem(
                    f"rules.{index}.match.groups",
                    f"rule {rule.name!r} matches group {group!r}, which is not in [[groups]]",
                    error=False,
                )


def _internal_domains(settings: Settings) -> Iterator[Problem]:
    """A relay that signs for the brokerage's domains but was never told they are its own
    treats a colleague as a prospect: links instead of files, an offer held for consent."""
    decided = "internal_domains" in settings.policy.model_fields_set or any(
        "internal_domains" in group.model_fields_set for group in settings.groups
    )
    if settings.dkim and not decided:
        yield Problem(
            "policy.internal_domains",
            f"not set: mail to colleagues at {', '.join(sorted(settings.dkim))} is handled as"
            " mail to prospects (attachments become links, offers registered letters,"
            " winmail.dat unpacked); list the brokerage's own domains, or set it to [] to keep"
            " it so",
            error=False,
        )


# -- files and directories, as the user the relay runs as sees them


def readable_file(key: str, path: Path) -> Problem | None:
    try:
        if path.is_dir():
            return Problem(key, f"{_shown(path)} is a directory, not a file")
        if not path.exists():
            return Problem(key, f"{_shown(path)}: no such file")
    except OSError as exc:
        return Problem(key, f"{_shown(path)}: {exc.strerror}")
    if not os.access(path, os.R_OK):
        return Problem(key, f"{_shown(path)} is not readable by {_user()}")
    return None


def writable_file(key: str, path: Path) -> Problem | None:
    if path.is_dir():
        return Problem(key, f"{_shown(path)} is a directory, not a file")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        return Problem(key, f"{_shown(path)} is not writable by {_user()}")
    return None


def readable_directory(key: str, path: Path) -> Problem | None:
    if not path.exists():
        return Problem(key, f"{_shown(path)}: no such directory")
    if not path.is_dir():
        return Problem(key, f"{_shown(path)} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        return Problem(key, f"{_shown(path)} is not readable by {_user()}")
    return None


def writable_directory(key: str, path: Path) -> Problem | None:
    """The directory can be written, or created where it is missing."""
    if path.exists():
        if not path.is_dir():
            return Problem(key, f"{_shown(path)} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            return Problem(key, f"{_shown(path)} is not writable by {_user()}")
        return None
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return Problem(key, f"{_shown(path)} cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return Problem(
            key, f"{_shown(path)} does not exist and {ancestor} is not writable by {_user()}"
        )
    return None


def _shown(path: Path) -> str:
    """The path as written, and where that is when it is relative."""
    return str(path) if path.is_absolute() else f"{path} ({path.absolute()})"


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def listen_problems(settings: Settings, roles: Collection[str]) -> list[Problem]:
    """Addresses this instance would listen on that it cannot take (in use, not local)."""
    wanted: list[tuple[str, str]] = []
    if "smtp" in roles:
        wanted += [("smtp.listen", a) for a in settings.smtp.listen]
        wanted += [("smtp.implicit_tls_listen", a) for a in settings.smtp.implicit_tls_listen]
        if settings.milter.listen is not None:
            wanted.append(("milter.listen", settings.milter.listen))
    if "web" in roles:
        wanted.append(("web.listen", settings.web.listen))
    return [
        Problem(key, f"{address}: cannot listen: {reason}")
        for key, address in wanted
        if (reason := _cannot_bind(address)) is not None
    ]


def _cannot_bind(address: str) -> str | None:
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # asyncio sets SO_REUSEADDR too: a port in TIME_WAIT is no problem for it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        return str(exc.strerror or exc)
    return None
