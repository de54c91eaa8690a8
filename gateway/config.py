"""Settings: one TOML file, overridable per key from the environment, validated once.

Code never reads raw config dicts; it gets a frozen `Settings`. A bad value stops start-up
with one line naming the key (and the environment variable when that is where it came from).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections import Counter
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from gateway.texts.catalog import DEFAULT_TIMEZONE, time_zone
from rules.automated_visits import ScannerRules
from rules.domains import domain_key
from rules.language import SHIPPED_LANGUAGES
from rules.matching import ConfiguredRule, Match, PolicyConfig
from rules.policy import Policy

# The policy's defaults are rules/policy.py's; the settings only give them their TOML shape.
DEFAULT_POLICY = Policy()

ENV_PREFIX = "SEALRELAY_"
# [worker]: sends upstream at once in all, and to one destination (docs/deployment.md)
DEFAULT_CONCURRENCY = 20
DEFAULT_DESTINATION_CONCURRENCY = 10
# The longest a link may be valid, in days: the policy's limits, and an agent's extension's.
DOWNLOAD_LINK_DAYS_MAX = 3650
LETTER_LINK_DAYS_MAX = 365


class ConfigError(Exception):
    """Raised with human lines, `key: what is wrong`; `str()` is the first of them."""

    def __init__(self, *problems: str) -> None:
        super().__init__(problems[0] if problems else "config error")
        self.problems = list(problems) or [str(self)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Section):
    hostname: str = Field(default_factory=socket.getfqdn)
    public_url: str = "http://127.0.0.1:8080"
    # The local part the relay's own mail to an agent comes from, at the agent's domain
    # when that domain has a [dkim] key (so it is signed), else at `hostname`.
    own_mail_sender: str = Field(default="postmaster", pattern=r"^[A-Za-z0-9._+-]{1,64}$")
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="relay processes, each with its own event loop and the same listening"
        " ports (SO_REUSEPORT), sharing one database (docs/deployment.md)",
    )

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


def _ip_networks(value: list[str]) -> list[str]:
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or network") from exc
    return value


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


HostPort = Annotated[str, Field(min_length=3)]


class TrustedClient(Section):
    """One `[[smtp.trusted]]` entry: a client that may send without AUTH (docs/trusted-hosts.md).

    A client matches only when every condition given holds: its address is in `networks`,
    it presented a certificate verified against `client_ca` naming one of
    `certificate_names` (when given), and it speaks TLS (when `require_tls`).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    networks: list[str] = Field(min_length=1)
    certificate_names: list[Annotated[str, Field(min_length=1)]] = []
    client_ca: Path | None = None
    require_tls: bool = False
    listen: list[HostPort] = []
    service: str | None = Field(default=None, min_length=1, max_length=100)
    domains: list[Annotated[str, Field(min_length=1)]] | None = None
    map_agents: bool = False

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _ip_networks(value)

    @field_validator("listen")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_host_port(v) for v in value]

    @field_validator("certificate_names")
    @classmethod
    def _lower(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [v.strip().lower().rstrip(".") for v in value]

    @field_validator("domains")
    @classmethod
    def _domain_keys(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _domains(value)

    @model_validator(mode="after")
    def _certificate_needs_ca(self) -> TrustedClient:
        if self.certificate_names and self.client_ca is None:
            raise ValueError("certificate_names needs client_ca, the CAs to verify them against")
        return self

    @property
    def service_name(self) -> str:
        return self.service or self.name


class SmtpSettings(Section):
    listen: list[HostPort] = ["127.0.0.1:2525"]
    implicit_tls_listen: list[HostPort] = []
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_size: ByteSize = Field(default=ByteSize(50 * 1024 * 1024), gt=1024)
    max_recipients: int = Field(default=100, ge=1)
    max_auth_failures: int = Field(default=3, ge=1)
    max_received_headers: int = Field(default=30, ge=5)
    allow_plaintext_auth_on_loopback: bool = False
    timeout: float = Field(default=300, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=50, ge=1)
    busy_timeout: float = Field(
        default=10, gt=0, description="seconds of silence before login when 3/4 full"
    )
    max_auth_failures_per_ip: int = Field(default=20, ge=1)
    # shared with the console's sign-in; not applied where a login succeeded within a day
    max_auth_failures_per_account: int = Field(default=10, ge=1)
    auth_failure_forget: float = Field(
        default=60, gt=0, description="seconds until one failed login of an address is forgotten"
    )
    # behind HAProxy: every connection must start with a PROXY header (docs/haproxy.md)
    proxy_protocol: bool = False
    proxy_from: list[str] = []
    proxy_timeout: float = Field(default=10, gt=0, description="seconds to wait for the header")
    trusted: list[TrustedClient] = []
    data_in_memory: ByteSize = Field(
        default=ByteSize(16 * 1024 * 1024),
        ge=1024 * 1024,
        description="octets of received messages the pipeline holds at once; more wait spooled",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="where DATA is spooled while it arrives (nameless files); default:"
        " spool/ beside the blob store directory. On the blob store's file system, a big"
        " message's spool file becomes its stored original; elsewhere it is copied",
    )

    @field_validator("listen", "implicit_tls_listen")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_host_port(v) for v in value]

    @field_validator("proxy_from")
    @classmethod
    def _proxy_networks(cls, value: list[str]) -> list[str]:
        return _ip_networks(value)

    @model_validator(mode="after")
    def _tls_complete(self) -> SmtpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.implicit_tls_listen and self.tls_cert is None:
            raise ValueError("implicit_tls_listen needs tls_cert and tls_key")
        if self.proxy_protocol and not self.proxy_from:
            raise ValueError("proxy_protocol needs proxy_from: the proxies' addresses")
        names = [t.name for t in self.trusted]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"trusted: names must be unique; repeated: {', '.join(repeated)}")
        for entry in self.trusted:
            if (entry.client_ca is not None or entry.require_tls) and self.tls_cert is None:
                raise ValueError(
                    f"trusted {entry.name}: client_ca and require_tls need tls_cert and tls_key"
                )
        return self


class UpstreamSettings(Section):
    url: str = "capture:var/outbox"
    username: str | None = None
    password: str | None = None
    # a file whose one line is the password (a systemd credential, a container secret): read
    # when the relay starts, so that admin commands run without access to it
    password_file: Path | None = None
    timeout: float = Field(default=60, gt=0, description="seconds for each reply and each write")
    connect_timeout: float = Field(default=30, gt=0, description="seconds to connect (TCP, TLS)")
    session_timeout: float = Field(
        default=300, gt=0, description="seconds one conversation may take, plus its size's time"
    )
    min_transfer_rate: float = Field(
        default=10240, gt=0, description="bytes/s: a copy of N bytes gets N / this more seconds"
    )
    verify_tls: bool = True
    # The certificate (PEM, chain after it) and its private key the relay shows when the
    # upstream asks, so a smart host such as a Microsoft 365 connector can tell it by name
    client_certificate: Path | None = None
    client_key: Path | None = Field(default=None, validate_default=True)
    queue_lifetime: float = Field(default=5 * 86400, gt=0, description="seconds")
    retry_base: float = Field(default=60, gt=0, description="seconds before the first retry")
    retry_max: float = Field(default=3600, gt=0, description="seconds between retries at most")
    # Kept connections (docs/connection-cache.md), named after Postfix's smtp_connection_cache_*
    connection_cache: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="idle connections kept per destination; 0: none; unset: every one a"
        " destination's sends opened (at most [worker] destination_concurrency)",
    )
    connection_cache_time_limit: float = Field(
        default=5, gt=0, description="seconds an idle connection is kept for the next copy"
    )
    connection_reuse_count_limit: int = Field(
        default=100, ge=1, description="copies one connection carries at most"
    )
    connection_reuse_time_limit: float = Field(
        default=300, gt=0, description="seconds after it opened that a connection is not reused"
    )
    # RSET, MAIL, RCPT and DATA in one write when the upstream offers PIPELINING (RFC 2920)
    pipelining: bool = True
    # the copy as one BDAT chunk, not dot-stuffed, when the upstream offers CHUNKING (RFC 3030)
    chunking: bool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split(":", 1)[0]
        if scheme == "capture":
            if not value.split(":", 1)[1]:
                raise ValueError("capture: needs a directory, e.g. capture:var/outbox")
            return value
        if value == "mx:":  # direct delivery to each recipient domain's MX ([mx] settings)
            return value
        parts = urlsplit(value)
        if scheme not in {"smtp", "smtps"} or not parts.hostname:
            raise ValueError("must be smtp://HOST[:PORT], smtps://HOST[:PORT], capture:DIR or mx:")
        return value

    @model_validator(mode="after")
    def _one_password(self) -> UpstreamSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: set one of them, not both")
        return self

    def login_password(self) -> str | None:
        """The password to log in with: `password`, else the line in `password_file` (its
        line end is not part of it)."""
        if self.password_file is None:
            return self.password
        return read_secret(self.password_file)

    @field_validator("client_key")
    @classmethod
    def _key_with_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Both or neither: a certificate without its key cannot be shown, and a key alone
        is nothing to show."""
        certificate = info.data.get("client_certificate")
        if value is None and certificate is not None:
            raise ValueError("missing: client_certificate needs its private key here (PEM)")
        if value is not None and certificate is None and "client_certificate" in info.data:
            raise ValueError("set client_certificate too: the key alone is nothing to show")
        return value


class MxSettings(Section):
    """Direct delivery (`url = "mx:"`): how recipient domains are looked up and reached
    (docs/direct-delivery.md)."""

    # DNS servers ("IP:PORT") asked for MX, A, AAAA and MTA-STS records; empty: the system's
    resolver: list[HostPort] = []
    # The port MX hosts are reached on: 25 on the internet; another for tests or a site
    # whose firewall sends port 25 elsewhere.
    port: int = Field(default=25, gt=0, lt=65536)
    mta_sts: bool = True
    connections_per_destination: int = Field(default=2, ge=1, le=100)
    failure_backoff: float = Field(
        default=60, ge=0, description="seconds a domain that could not be reached is left alone"
    )
    dns_timeout: float = Field(default=10, gt=0, description="seconds for one DNS question")
    # More trust roots (PEM) for MX hosts' certificates and MTA-STS policy servers
    ca_file: Path | None = None

    @field_validator("resolver")
    @classmethod
    def _resolvers(cls, value: list[str]) -> list[str]:
        for entry in value:
            host = _host_port(entry).rpartition(":")[0].strip("[]")
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ValueError(f"{entry!r}: a resolver must be an IP address and port") from exc
        return value

    @field_validator("ca_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value}: no such file")
        return value


# The fallback route's name: `[upstream]`, for mail no `[[routes]]` entry matches.
DEFAULT_ROUTE = "default"
# How long a copy may wait and how often it is tried are the queue's, whatever the route:
# set on [upstream] only (a copy's lifetime is fixed when it is queued, before any route).
QUEUE_KEYS = ("queue_lifetime", "retry_base", "retry_max")
ROUTE_NAME = r"^[A-Za-z0-9._-]{1,100}$"


def _domains(value: list[str]) -> list[str]:
    return [domain_key(v) for v in value]


class RouteSettings(Section):
    """One `[[routes]]` entry (docs/routes.md): a copy that meets every condition given goes
    to the named upstream. Within a list, any one entry will do."""

    name: str = Field(pattern=ROUTE_NAME)
    upstream: str = Field(min_length=1)
    sender_domains: list[Annotated[str, Field(min_length=1)]] = []
    recipient_domains: list[Annotated[str, Field(min_length=1)]] = []
    trusted: list[Annotated[str, Field(min_length=1)]] = []

    @field_validator("sender_domains", "recipient_domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return _domains(value)

    @model_validator(mode="after")
    def _has_condition(self) -> RouteSettings:
        if not (self.sender_domains or self.recipient_domains or self.trusted):
            raise ValueError(
                f"route {self.name}: needs a condition (sender_domains, recipient_domains or"
                " trusted); for all mail, set the upstream in [upstream] instead"
            )
        if self.name == DEFAULT_ROUTE:
            raise ValueError(f"route name {DEFAULT_ROUTE!r} is taken by [upstream], the fallback")
        return self


def _named_upstreams(value: dict[str, UpstreamSettings]) -> dict[str, UpstreamSettings]:
    for name, upstream in value.items():
        if name == DEFAULT_ROUTE or not re.fullmatch(ROUTE_NAME, name):
            raise ValueError(
                f"{name!r}: a name of letters, digits, '.', '_' or '-', and not"
                f" {DEFAULT_ROUTE!r} ([upstream] is that one)"
            )
        if "url" not in upstream.model_fields_set:
            raise ValueError(f"{name}.url: required, an upstream names where its mail goes")
        for key in QUEUE_KEYS:
            if key in upstream.model_fields_set:
                raise ValueError(
                    f"{name}.{key}: the queue's lifetime and retries are the same for every"
                    " route; set it on [upstream]"
                )
    return value


def _route_references(
    routes: list[RouteSettings], upstreams: Mapping[str, object] | None, trusted: list[str] | None
) -> list[RouteSettings]:
    """Every route names a defined upstream and defined trusted entries, under its own name."""
    names = [r.name for r in routes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"names must be unique; repeated: {', '.join(repeated)}")
    for route in routes:
        known = [DEFAULT_ROUTE, *(upstreams or {})]
        if upstreams is not None and route.upstream not in known:
            raise ValueError(
                f"route {route.name}: upstream {route.upstream!r} is not defined; add"
                f" [upstreams.{route.upstream}] or name one of: {', '.join(known)}"
            )
        unknown = [t for t in route.trusted if trusted is not None and t not in trusted]
        if unknown:
            raise ValueError(
                f"route {route.name}: trusted {', '.join(map(repr, unknown))} is not the name of"
                f" an [[smtp.trusted]] entry (there: {', '.join(trusted or []) or 'none'})"
            )
    return routes


class WebSettings(Section):
    listen: HostPort = "127.0.0.1:8080"
    trusted_proxies: list[str] = []
    # Prospects' visits (download and letter pages, files) share the database with the relay:
    # at most this many of their transactions at once (gateway/store/admission.py), at most
    # half of PostgreSQL's pool of 10, so delivery, leases and the sequencer always get one.
    visit_db_limit: int = Field(
        default=4, ge=1, le=5, description="visits' database transactions at once"
    )
    visit_wait: float = Field(
        default=0.5,
        gt=0,
        le=10,
        description="seconds a new visit waits for its share before it is answered 503",
    )

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return _host_port(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _ip_networks(value)


class ConsoleSettings(Section):
    """The web console: how long a session lasts, and whether its DKIM page asks DNS."""

    idle_timeout: float = Field(
        default=30 * 60, ge=60, description="seconds without a request after which a session ends"
    )
    absolute_timeout: float = Field(
        default=12 * 3600, ge=60, description="seconds after sign-in at which a session ends"
    )

    # The DKIM page asks DNS whether each key is published; off where the relay cannot reach
    # DNS, and `dns_resolver` (HOST:PORT) asks that server rather than the system's.
    dns_checks: bool = True
    dns_resolver: HostPort | None = None

    @field_validator("dns_resolver")
    @classmethod
    def _resolver(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = _host_port(value).rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ValueError(f"{value!r}: the resolver must be an IP address and port") from exc
        return value

    @model_validator(mode="after")
    def _idle_within_absolute(self) -> ConsoleSettings:
        if self.idle_timeout > self.absolute_timeout:
            raise ValueError("idle_timeout must not exceed absolute_timeout")
        return self


class ScannerSettings(Section):
    """Which visits of a link count as a link scanner's (rules/automated_visits.py): the
    shipped ranges and user agents are a heuristic; these add to them or switch ranges off."""

    window_seconds: float = Field(default=120, ge=0, description="seconds after delivery")
    user_agents: list[str] = []
    networks: list[str] = []
    shipped_networks: bool = True

    @field_validator("user_agents")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                re.compile(entry)
            except re.error as exc:
                raise ValueError(f"{entry!r} is not a regular expression: {exc}") from exc
        return value

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return _ip_networks(value)

    def rules(self) -> ScannerRules:
        return ScannerRules.configured(
            window_seconds=self.window_seconds,
            extra_user_agents=self.user_agents,
            extra_networks=self.networks,
            shipped_networks=self.shipped_networks,
        )


class DatabaseSettings(Section):
    url: str = "sqlite+aiosqlite:///var/sealrelay.db"
    connect_retry_max: float = Field(
        default=30, gt=0, description="seconds between start-up attempts to reach it, at most"
    )
    chain_interval: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="seconds between the journal sequencer's looks for other processes' events",
    )

    @field_validator("url")
    @classmethod
    def _supported(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        if value.startswith("sqlite") and make_url(value).database in (None, "", ":memory:"):
            raise ValueError(
                f"{value}: SQLite needs a file (sqlite+aiosqlite:///var/sealrelay.db): an"
                " in-memory database would lose the queue at every restart, and each process"
                " would have its own"
            )
        return value


INLINE_DEFAULT = 64 * 1024
INLINE_CEILING = 1024 * 1024
_S3_ONLY = ("endpoint_url", "region", "access_key_id", "secret_access_key_file")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class StorageSettings(Section):
    """Where blobs live: a local directory (`path`), or an S3-compatible bucket when `url`
    is s3://bucket/prefix (docs/object-storage.md). `url` as file:///dir or a plain path
    names the local directory instead of `path`. The S3 secret is read from a file, so it
    is never in the TOML; with no key configured the usual AWS chain applies (environment,
    instance role)."""

    path: Path = Path("var/blobs")
    url: str | None = None
    endpoint_url: str | None = Field(
        default=None, description="the S3 API's URL when it is not AWS (MinIO, Garage, Ceph)"
    )
    region: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+$")
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    access_key_id: str | None = Field(default=None, pattern=r"^\S+$")
    secret_access_key_file: Path | None = None
    blob_grace_days: float = Field(default=7, ge=0)
    keep_originals_days: float = Field(
        default=30,
        ge=0,
        description="days a message's original and copies are kept after it was received,"
        " once no copy waits and no letter of it is evidence; 0 keeps them for ever",
    )
    sweep_interval: float = Field(default=3600, gt=0, description="seconds between sweeps")
    inline_max_bytes: ByteSize = Field(
        default=ByteSize(INLINE_DEFAULT),
        description="the intake keeps a message (original and the copy without the relay's"
        " control headers) of at most this many bytes in the database, committed with the"
        " message, instead of a file or object with fsyncs of its own; 0 turns it off",
    )

    def originals_kept(self) -> timedelta | None:
        """How long the sweeper keeps originals (gateway/store/blob_columns.py); None: always."""
        return timedelta(days=self.keep_originals_days) if self.keep_originals_days else None

    @field_validator("inline_max_bytes")
    @classmethod
    def _inline_limit(cls, value: int) -> int:
        if not 0 <= value <= INLINE_CEILING:
            raise ValueError(
                f"must be from 0 (every blob a file) to {INLINE_CEILING} bytes (1 MiB): the"
                f" database holds small blobs only, a read takes the whole blob into memory"
                f" (default {INLINE_DEFAULT})"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _local_url_names_the_path(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("url"), str):
            local = _local_directory(data["url"])
            if local is not None:
                return {**data, "path": local}
        return data

    @field_validator("url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is None or _local_directory(value) is not None:
            return value
        parts = urlsplit(value)
        if parts.scheme != "s3":
            raise ValueError("must be s3://bucket/prefix, file:///directory or a path")
        if not _BUCKET.match(parts.netloc):
            raise ValueError(f"{parts.netloc!r} is not an S3 bucket name (s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise ValueError("s3://bucket/prefix takes no ?query or #fragment")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _s3_keys_with_s3(self) -> StorageSettings:
        if self.bucket is None:
            given = [key for key in _S3_ONLY if getattr(self, key) is not None]
            if given:
                raise ValueError(f'{", ".join(given)}: only with url = "s3://bucket/prefix"')
        if (self.access_key_id is None) != (self.secret_access_key_file is None):
            raise ValueError("access_key_id and secret_access_key_file go together")
        return self

    @property
    def bucket(self) -> str | None:
        """The S3 bucket blobs live in; None for a local directory."""
        if self.url is None or _local_directory(self.url) is not None:
            return None
        return urlsplit(self.url).netloc

    @property
    def prefix(self) -> str:
        """The key prefix in the bucket ("" for the whole bucket)."""
        if self.url is None or self.bucket is None:
            return ""
        return urlsplit(self.url).path.strip("/")


def _local_directory(url: str) -> str | None:
    """The directory a file:// URL or a plain path names; None for any other URL."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return parts.path or None
    return url if not parts.scheme and url else None


class SecretsSettings(Section):
    """Where the key that seals the agents' upstream passwords lives: never the database."""

    key_file: Path | None = Field(
        default=None,
        description="AES key for the agents' upstream logins; default: agent-logins.key"
        " beside the blob store directory, created 0600 on first use. Back it up.",
    )


class DkimDomain(Section):
    selector: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    key_file: Path


class LoopSettings(Section):
    """The loop-prevention mark on outgoing copies (gateway/mail/loop_mark.py)."""

    # Made (mode 0600) on first start when missing; the relays of one brokerage share it.
    key_file: Path = Path("var/loop.key")
    max_age_days: float = Field(
        default=7, gt=0, le=365, description="older marks of ours are ignored, not refused"
    )


class WorkerSettings(Section):
    concurrency: int = Field(
        default=DEFAULT_CONCURRENCY, ge=1, le=1000, description="sends upstream at once, in all"
    )
    destination_concurrency: int = Field(
        default=DEFAULT_DESTINATION_CONCURRENCY,
        ge=1,
        le=1000,
        description="sends to one destination (smart host and login, MX domain) at once;"
        " unset: 10, or `concurrency` when that is less",
    )
    batch_size: int = Field(default=50, ge=1, le=1000)
    lease_seconds: float = Field(
        default=30,
        gt=0,
        description="renewed while a copy is in flight; a dead worker's claims"
        " return to the queue after this",
    )
    poll_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _destination_within_total(cls, data: Any) -> Any:
        """An explicit destination_concurrency above concurrency is a mistake (it could
        never be reached); left unset, it follows a lowered concurrency."""
        if not isinstance(data, Mapping) or "destination_concurrency" in data:
            return data
        try:
            total = int(data["concurrency"])
        except (KeyError, TypeError, ValueError):
            return data  # the default, or a value its own check reports
        if 1 <= total < DEFAULT_DESTINATION_CONCURRENCY:
            return {**data, "destination_concurrency": total}
        return data

    @field_validator("destination_concurrency")
    @classmethod
    def _destination_at_most_total(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("concurrency")  # missing when it failed its own check
        if total is not None and value > total:
            raise ValueError(
                f"{value} is more than concurrency ({total}), the sends to all destinations"
                " together; lower it or raise concurrency"
            )
        return value


def _shipped(value: str) -> str:
    if value not in SHIPPED_LANGUAGES:
        raise ValueError(
            f"{value!r} is not a language sealrelay ships ({', '.join(SHIPPED_LANGUAGES)})"
        )
    return value


Language = Annotated[str, AfterValidator(_shipped)]
MIME_TYPE = r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$"


class BrandingSettings(Section):
    """What prospects see on their pages: the brokerage, not sealrelay."""

    company_name: str = "sealrelay"
    logo_url: str | None = None
    primary_color: str = Field(default="#1f4e79", pattern=r"^#[0-9a-fA-F]{6}$")
    background_color: str = Field(default="#f4f6f8", pattern=r"^#[0-9a-fA-F]{6}$")
    # the one zone every page, mail and PDF writes times in, with the zone's name
    timezone: str = DEFAULT_TIMEZONE

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        time_zone(value)
        return value


class PolicyOverrides(Section):
    """Any subset of the policy settings; what a group or a rule changes."""

    link_attachments_over: ByteSize | None = None
    link_total_over: ByteSize | None = None
    keep_attached: list[Annotated[str, Field(pattern=MIME_TYPE)]] | None = None
    always_link: list[Annotated[str, Field(min_length=1)]] | None = None
    download_link_days: int | None = Field(default=None, ge=1, le=DOWNLOAD_LINK_DAYS_MAX)
    internal_domains: list[str] | None = None
    language: Language | None = None
    registered_letter: bool | None = None
    letter_link_days: int | None = Field(default=None, ge=1, le=LETTER_LINK_DAYS_MAX)
    letter_block_set: str | None = Field(default=None, min_length=1)
    unpack_winmail: bool | None = None

    def values(self) -> dict[str, Any]:
        """The set values, in the types rules.policy.Policy expects."""
        values = self.model_dump(exclude_none=True, exclude={"name"})
        for key in ("keep_attached", "always_link", "internal_domains"):
            if key in values:
                values[key] = frozenset(v.lower() for v in values[key])
        for key in ("link_attachments_over", "link_total_over"):
            if key in values:
                values[key] = int(values[key])
        return values


class PolicySettings(PolicyOverrides):
    """The defaults for everyone; groups and rules override them."""

    link_attachments_over: ByteSize | None = ByteSize(DEFAULT_POLICY.link_attachments_over)
    link_total_over: ByteSize | None = ByteSize(DEFAULT_POLICY.link_total_over)
    keep_attached: list[Annotated[str, Field(pattern=MIME_TYPE)]] | None = sorted(
        DEFAULT_POLICY.keep_attached
    )
    always_link: list[Annotated[str, Field(min_length=1)]] | None = sorted(
        DEFAULT_POLICY.always_link
    )
    download_link_days: int | None = Field(
        default=DEFAULT_POLICY.download_link_days, ge=1, le=DOWNLOAD_LINK_DAYS_MAX
    )
    internal_domains: list[str] | None = sorted(DEFAULT_POLICY.internal_domains)
    # never None: every page and mail of the relay falls back to it (rules.language)
    language: Language = DEFAULT_POLICY.language
    registered_letter: bool | None = DEFAULT_POLICY.registered_letter
    letter_link_days: int | None = Field(
        default=DEFAULT_POLICY.letter_link_days, ge=1, le=LETTER_LINK_DAYS_MAX
    )
    letter_block_set: str | None = DEFAULT_POLICY.letter_block_set
    unpack_winmail: bool | None = DEFAULT_POLICY.unpack_winmail


class LetterSettings(Section):
    """Registered letters: what marks an offer, the texts, the evidence's archive copy."""

    tags: list[str] = list(DEFAULT_POLICY.letter_tags)
    # Block sets by name: "default" is the shipped example set; others are directories.
    block_sets: dict[str, Path] = {}
    terms_pdf: dict[Language, Path] = {}
    archive_bcc: str | None = None
    company_address: str = ""
    company_email: str = ""
    company_phone: str = ""
    commission: str = ""
    # Years the evidence (letter, held and released original, consent PDF) is kept, counted
    # from the end of the year of the consent or of the letter's expiry.
    evidence_retention: int = Field(default=3, ge=1, le=30, description="years")
    # Tell the agent by mail when a letter's link ran out without a consent.
    expired_notice: bool = True
    # A TrueType font file for the consent PDF, so that every letter of a name shows (its
    # -Bold and -Italic files beside it are used too); unset: the PDF's built-in fonts,
    # which draw Windows-1252 only (German, English, Spanish).
    pdf_font: Path | None = None

    @field_validator("archive_bcc")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and "@" not in value:
            raise ValueError(f"{value!r} is not a mail address")
        return value


class NoticeSettings(Section):
    """The agent's optional mails: what each agent gets unless they chose otherwise.

    Both are on by default: a first download and a letter about to run out are the moments
    an agent acts on (call the prospect, send again), each is at most one short mail per
    recipient and message, and an agent who finds them noisy turns them off
    (`sealrelay user notify`). The consent confirmation is not among them: it carries the
    evidence and always goes.
    """

    first_download: bool = True
    expiry_warning: bool = True
    # How long before a waiting letter's link runs out the agent is warned.
    expiry_warning_days: int = Field(default=2, ge=1, le=60, description="days")
    # First downloads of one recipient within this many seconds make one mail (a prospect
    # fetching several files one after another); the notice waits that long.
    download_batch_seconds: int = Field(default=60, ge=0, le=3600, description="seconds")


class NoticeOverrides(Section):
    """A group's own defaults for the agent's optional mails; unset: the installation's."""

    first_download: bool | None = None
    expiry_warning: bool | None = None


class GroupSettings(PolicyOverrides):
    name: str = Field(min_length=1)
    notices: NoticeOverrides = NoticeOverrides()

    def values(self) -> dict[str, Any]:
        values = super().values()
        values.pop("notices", None)  # not policy: read by notices_for
        return values


class RuleMatch(Section):
    senders: list[str] = []
    groups: list[str] = []
    recipient_domains: list[str] = []
    subject_prefixes: list[str] = []
    filenames: list[str] = []


class RuleSettings(Section):
    name: str = Field(min_length=1)
    match: RuleMatch = RuleMatch()
    set: PolicyOverrides = PolicyOverrides()


class MilterSettings(Section):
    """`[milter]`: the milter front for a Postfix or Sendmail that stays in charge
    (docs/postfix.md, "Milter"). Off until `listen` is given."""

    listen: HostPort | None = None
    allow_from: list[str] = ["127.0.0.0/8", "::1/128"]
    service: str = Field(default="postfix", min_length=1, max_length=100)
    domains: list[Annotated[str, Field(min_length=1)]] | None = None
    map_agents: bool = False
    timeout: float = Field(default=300, gt=0, description="seconds of silence from the MTA")

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value)

    @field_validator("allow_from")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one network (the MTA's address)")
        return _ip_networks(value)

    @field_validator("domains")
    @classmethod
    def _domain_keys(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _domains(value)


class Settings(Section):
    server: ServerSettings = ServerSettings()
    smtp: SmtpSettings = SmtpSettings()
    milter: MilterSettings = MilterSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    # more upstreams by name, for [[routes]] (docs/routes.md); [upstream] is "default"
    upstreams: Annotated[dict[str, UpstreamSettings], AfterValidator(_named_upstreams)] = {}
    mx: MxSettings = MxSettings()
    web: WebSettings = WebSettings()
    console: ConsoleSettings = ConsoleSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    secrets: SecretsSettings = SecretsSettings()
    worker: WorkerSettings = WorkerSettings()
    dkim: dict[str, DkimDomain] = {}
    loop: LoopSettings = LoopSettings()
    branding: BrandingSettings = BrandingSettings()
    letter: LetterSettings = LetterSettings()
    notices: NoticeSettings = NoticeSettings()
    scanners: ScannerSettings = ScannerSettings()
    policy: PolicySettings = PolicySettings()
    groups: list[GroupSettings] = []
    rules: list[RuleSettings] = []
    routes: list[RouteSettings] = []

    @field_validator("routes")
    @classmethod
    def _routes_name_what_exists(
        cls, value: list[RouteSettings], info: ValidationInfo
    ) -> list[RouteSettings]:
        # what failed its own validation is missing here, and reported already
        smtp = info.data.get("smtp")
        trusted = [t.name for t in smtp.trusted] if isinstance(smtp, SmtpSettings) else None
        return _route_references(value, info.data.get("upstreams"), trusted)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for kind, names in (
            ("groups", [g.name for g in self.groups]),
            ("rules", [r.name for r in self.rules]),
        ):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{kind}: names must be unique; repeated: {', '.join(repeated)}")
        known_sets = {"default", *self.letter.block_sets}
        for source, chosen in [
            ("policy", self.policy.letter_block_set),
            *((f"group {g.name}", g.letter_block_set) for g in self.groups),
            *((f"rule {r.name}", r.set.letter_block_set) for r in self.rules),
        ]:
            if chosen is not None and chosen not in known_sets:
                raise ValueError(
                    f"{source}: letter_block_set {chosen!r} is not in letter.block_sets"
                )
        return self

    def notices_for(self, group: str | None) -> NoticeSettings:
        """The notice defaults for an agent of `group`: the group's own, else `[notices]`."""
        own = next((g.notices for g in self.groups if g.name == group), None)
        if own is None:
            return self.notices
        return self.notices.model_copy(update=own.model_dump(exclude_none=True))

    def policy_config(self) -> PolicyConfig:
        """The pure policy input for rules/, built once at start-up."""
        return PolicyConfig(
            defaults=Policy(**self.policy.values(), letter_tags=tuple(self.letter.tags)),
            groups={g.name: g.values() for g in self.groups},
            rules=tuple(
                ConfiguredRule(
                    name=r.name,
                    match=Match(
                        senders=tuple(r.match.senders),
                        groups=tuple(r.match.groups),
                        recipient_domains=tuple(r.match.recipient_domains),
                        subject_prefixes=tuple(r.match.subject_prefixes),
                        filenames=tuple(r.match.filenames),
                    ),
                    settings=r.set.values(),
                )
                for r in self.rules
            ),
        )

    @field_validator("dkim")
    @classmethod
    def _domain_keys(cls, value: dict[str, DkimDomain]) -> dict[str, DkimDomain]:
        """Each domain by its key (rules/domains.py: lower case, A-labels), which every user
        of `dkim` compares a From domain's key with, and DNS publishes the key under."""
        named = Counter(domain_key(domain) for domain in value)
        if twice := sorted(domain for domain, count in named.items() if count > 1):
            raise ValueError(f"[dkim] names {', '.join(twice)} more than once (case is ignored)")
        return {domain_key(domain): entry for domain, entry in value.items()}


SYSTEM_CONFIG = Path("/etc/sealrelay/sealrelay.toml")
LOCAL_CONFIG = Path("sealrelay.toml")
CONFIG_VARIABLE = "SEALRELAY_CONFIG"


def locate_config(explicit: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The settings file as users expect to find it, or None for the embedded defaults.

    `--config`, then $SEALRELAY_CONFIG, then ./sealrelay.toml, then /etc/sealrelay/sealrelay.toml.
    A file named explicitly (option or variable) must exist: a typo never falls through.
    """
    environ = os.environ if environ is None else environ
    named = [("--config", explicit)] if explicit is not None else []
    if environ.get(CONFIG_VARIABLE):
        named.append((CONFIG_VARIABLE, Path(environ[CONFIG_VARIABLE])))
    if named:
        origin, path = named[0]
        if not path.is_file():
            raise ConfigError(f"{origin} {path}: no such file")
        return path
    return next((p for p in (LOCAL_CONFIG, SYSTEM_CONFIG) if p.is_file()), None)


def where_config_is_looked_for() -> str:
    return f"--config FILE, ${CONFIG_VARIABLE}, ./{LOCAL_CONFIG} or {SYSTEM_CONFIG}"


def read_config(
    path: Path | None, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw settings (file, then environment on top) and which variable set which key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    sources = _apply_environment(data, os.environ if environ is None else environ)
    return data, sources


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the TOML file (or the embedded defaults) with the environment on top."""
    data, sources = read_config(path, environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(*validation_problems(exc, sources)) from exc


def read_secret(path: Path) -> str:
    """A secret kept in a file of its own: its text without the line end editors and `echo`
    leave (spaces inside and around it count)."""
    text = path.read_text(encoding="utf-8")
    return text.removesuffix("\n").removesuffix("\r")


def environment_variable(key: str) -> str:
    """The variable that sets `key` (`upstream.password`: SEALRELAY_UPSTREAM__PASSWORD)."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def settable_from_environment(key: str) -> bool:
    """Whether a variable can set `key`: a shell or a systemd unit takes only letters,
    digits and _ in a name, and names are read back in lower case."""
    variable = environment_variable(key)
    return key == key.lower() and re.fullmatch(r"[A-Z_][A-Z0-9_]*", variable) is not None


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Overlay SEALRELAY_<SECTION>__<KEY> variables; returns key -> variable for messages."""
    sources = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        target = data
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} does not name a setting")
        target[path[-1]] = _env_value(raw)
        sources[".".join(path)] = name
    return sources


def _env_value(raw: str) -> Any:
    """Lists and tables come as JSON (`["a:1","b:2"]`); everything else stays a string."""
    if raw.startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def validation_problems(
    exc: ValidationError, sources: Mapping[str, str], prefix: str = ""
) -> list[str]:
    """Every error pydantic found, one line each, naming the key (and its variable)."""
    return [_problem(error, sources, prefix) for error in exc.errors()]


def _problem(error: Any, sources: Mapping[str, str], prefix: str) -> str:
    key = prefix + ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        meant = _meant(error["loc"])
        message = f"unknown setting; did you mean {meant}?" if meant else "unknown setting"
    elif error["type"] in ("byte_size", "byte_size_unit"):
        message = f"{error['input']!r} is not a size: bytes, or a number with a unit (50MiB, 2MB)"
    origin = next((var for k, var in sources.items() if key.startswith(k)), None)
    where = f" (from {origin})" if origin else ""
    return f"{key.rstrip('.') or 'config'}: {message}{where}"


def _meant(loc: tuple[int | str, ...]) -> str | None:
    """The key a mistyped one most likely stands for: a setting of the same section whose
    name is nearly the same (`max_recipient` for `max_recipients`)."""
    node: Any = Settings
    for part in loc[:-1]:
        node = _inside(node, str(part))
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1, cutoff=0.75)
    return close[0] if close else None


def _inside(node: Any, key: str) -> Any:
    """What a key holds: a section's setting, or an entry of a table of tables (`[dkim."D"]`)
    or of an array of tables (`[[rules]]`); None past anything else."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(key)
        return None if field is None else _unwrapped(field.annotation)
    if get_origin(node) in (dict, list):
        return _unwrapped(get_args(node)[-1])
    return None


def _unwrapped(annotation: Any) -> Any:
    """`X | None` as X."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = [kind for kind in get_args(annotation) if kind is not type(None)]
        return kinds[0] if len(kinds) == 1 else None
    return annotation
