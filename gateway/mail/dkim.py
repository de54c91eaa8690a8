"""DKIM signing (RFC 6376): rsa-sha256, relaxed/relaxed, on the raw bytes that go out.

dkimpy does the RSA arithmetic in pure Python (8 ms a signature, more than the rest of the
relay spends on a small message); `cryptography` does it in 0.7 ms. Canonicalization is short
and exactly specified, so it is done here on bytes, and dkimpy stays the judge in the tests.

The agent's header bytes are hashed as they stand and never re-serialized; the caller
prepends the returned field to exactly the bytes that were signed.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.mail.headers import parse_fields, split_offsets

MIN_KEY_BITS = 1024
MAX_LINE = 78
PIECE = 1024 * 1024

DEFAULT_SIGNED: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Sender",
    "List-Unsubscribe",
)
DEFAULT_OVERSIGN: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
)

_FIELD_NAME = re.compile(r"[!-9;-~]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LINE_BREAK = re.compile(rb"\r?\n")
_WSP_RUN = re.compile(rb"[ \t]+")
_SPACE_RUN = re.compile(rb"  +")
_REVERSED_CRLFS = re.compile(rb"(?:\n\r)*")
_BODY_HASH = re.compile(r"[A-Za-z0-9+/]{43}=")


class DkimError(Exception):
    """A key or signing request that cannot give a valid signature; the message says why."""


@dataclass(frozen=True)
class DkimKey:
    """A signing identity: the d= domain, the s= selector and the key published under it."""

    domain: str
    selector: str
    private_key: rsa.RSAPrivateKey

    def __post_init__(self) -> None:
        domain = self.domain.rstrip(".")
        if not _DNS_NAME.fullmatch(domain) or len(domain) > 253:
            raise DkimError(f"DKIM domain {self.domain!r} is not a DNS name (use the A-label form)")
        if not _DNS_NAME.fullmatch(self.selector):
            raise DkimError(f"DKIM selector {self.selector!r} is not a DNS label")
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise DkimError("DKIM key is not an RSA private key")
        if self.private_key.key_size < MIN_KEY_BITS:
            raise DkimError(
                f"DKIM key has {self.private_key.key_size} bits; receivers ignore keys "
                f"under {MIN_KEY_BITS} (RFC 8301), use 2048"
            )
        object.__setattr__(self, "domain", domain)

    @classmethod
    def load(cls, domain: str, selector: str, path: Path) -> DkimKey:
        """Read a PEM key (PKCS#1 or PKCS#8) so a bad file stops start-up with one clear line."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DkimError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError as exc:
            raise DkimError(f"DKIM key {path} is encrypted; store it without a password") from exc
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise DkimError(f"DKIM key {path} is not a valid PEM private key") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimError(f"DKIM key {path} is not an RSA key (only rsa-sha256 is signed)")
        try:
            return cls(domain, selector, key)
        except DkimError as exc:
            raise DkimError(f"DKIM key {path}: {exc}") from exc


def generate_private_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh signing key; 2048 bits is what receivers expect and what fits one TXT record."""
    if bits < MIN_KEY_BITS:
        raise DkimError(f"refusing to generate a {bits}-bit DKIM key (minimum {MIN_KEY_BITS})")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_private_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    """Store a key readable by its owner only, never replacing one that DNS may already name."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise DkimError(f"DKIM key {path} already exists; not overwriting it") from exc
    except OSError as exc:
        raise DkimError(f"cannot create DKIM key {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise DkimError(f"cannot write DKIM key {path}: {exc.strerror or exc}") from exc


def public_txt_value(key: DkimKey | rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """The TXT value unsplit, as a resolver hands it to a verifier."""
    if isinstance(key, DkimKey):
        key = key.private_key
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def dns_txt_record(key: DkimKey | rsa.RSAPrivateKey, selector: str, domain: str) -> str:
    """A zone-file line to paste; TXT strings hold 255 octets at most, so p= is split."""
    value = public_txt_value(key)
    head, _, p = value.partition("p=")
    p = "p=" + p
    chunks = [head] + [p[i : i + 255] for i in range(0, len(p), 255)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT ( {quoted} )"


def body_hash(data: bytes, start: int = 0, piece: int = PIECE) -> str:
    """The bh= value of the body `data[start:]`; a caller sending one body under several
    headers can compute it once.

    The body is never copied whole (a 10 MB message would cost 10 MB more): it is hashed
    in pieces of about `piece` octets that end at a line end, each hashed as it stands
    unless it holds a space or a tab (base64 never does), else canonicalized on its own.
    Relaxed canonicalization only ever joins bytes within one line, so pieces cut after an
    LF canonicalize independently. Only the tail, from the line of the last visible
    character on, goes through the whole-body rules (empty lines removed at the end).

    A body without a final CRLF gets one before canonicalization, since SMTP adds it in
    transit and receivers hash what arrives: otherwise white space at the end of such a last
    line would be hashed here and stripped there.
    """
    digest = hashlib.sha256()
    tail = _tail_start(data, start)
    view = memoryview(data)
    while start < tail:
        cut = data.rfind(b"\n", start, min(start + piece, tail)) + 1
        if cut == 0:
            cut = data.find(b"\n", start, tail) + 1 or tail
        if data.find(b" ", start, cut) == -1 and data.find(b"\t", start, cut) == -1:
            digest.update(view[start:cut])
        else:
            digest.update(_relaxed_lines(data[start:cut]))
        start = cut
    digest.update(_relaxed_tail(data[tail:]))
    return base64.b64encode(digest.digest()).decode("ascii")


class BodyHash:
    """body_hash() of a body fed in pieces of any size, cut anywhere: a stored 10 MB body is
    hashed as it is read, never held whole. The value is exactly body_hash()'s.

    Whole lines are canonicalized as they come (relaxed canonicalization joins bytes within
    a line only); a line not yet ended waits for its end, or, past `piece` octets, is fed up
    to its last octet that is not white space. CRLFs that end what was canonicalized so far
    are held back as a count: the body's end drops all of them but one, anything after them
    lets them through. As body_hash() does, a body not ending in CRLF gets one.
    """

    def __init__(self, piece: int = PIECE) -> None:
        self._digest = hashlib.sha256()
        self._piece = piece
        self._partial = b""  # the line not ended yet, as it came
        self._crlfs = 0  # canonical CRLFs held back
        self._fed = False  # whether any canonical octet went into the digest
        self._last = b""  # the body's last two octets

    def update(self, data: bytes) -> None:
        if not data:
            return
        self._last = (self._last + data[-2:])[-2:]
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            self._partial += data
            if len(self._partial) > self._piece:
                self._spill()
            return
        start = 0
        if self._partial:
            start = data.find(b"\n") + 1
            self._lines(self._partial + data[:start], 0, len(self._partial) + start)
        self._lines(data, start, cut)
        self._partial = data[cut:]

    def value(self) -> str:
        """The bh= value; the hash takes no more data after it."""
        if self._partial or (self._last and self._last != b"\r\n"):
            final = _relaxed_lines(self._partial + b"\r\n")
            self._partial = b""
            self._emit(final, 0, len(final))
        if self._crlfs and self._fed:
            self._digest.update(b"\r\n")
        self._crlfs = 0
        return base64.b64encode(self._digest.digest()).decode("ascii")

    def _lines(self, data: bytes, start: int, end: int) -> None:
        """data[start:end], whole lines, canonicalized and fed."""
        if data.find(b" ", start, end) == -1 and data.find(b"\t", start, end) == -1:
            self._emit(data, start, end)
        else:
            canonical = _relaxed_lines(data[start:end])
            self._emit(canonical, 0, len(canonical))

    def _spill(self) -> None:
        """A long line not ended yet: up to its last octet that is not white space (or a CR)
        it canonicalizes on its own, since white-space runs and " CRLF" do not cross it."""
        kept = len(self._partial.rstrip(b" \t\r"))
        if kept:
            canonical = _relaxed_lines(self._partial[:kept])
            self._emit(canonical, 0, len(canonical))
        self._partial = _relaxed_lines(self._partial[kept:])

    def _emit(self, data: bytes, start: int, end: int) -> None:
        """Canonical octets data[start:end]: their ending CRLFs are held back, the rest fed
        after the CRLFs held so far."""
        crlfs = _crlfs_ending(data, start, end)
        end -= 2 * crlfs
        if end > start:
            while self._crlfs:
                run = min(self._crlfs, len(_CRLFS) // 2)
                self._digest.update(_CRLFS[: 2 * run])
                self._crlfs -= run
            self._digest.update(memoryview(data)[start:end])
            self._fed = True
        self._crlfs += crlfs


_CRLFS = b"\r\n" * 32768


def _crlfs_ending(data: bytes, start: int, end: int) -> int:
    """How many CRLFs end data[start:end], counted in growing windows from the end."""
    count, window = 0, 64
    while end - start >= 2:
        low = max(start, end - window)
        low += (end - low) % 2  # whole pairs, counted from the end
        tail = data[low:end]
        run = tail[len(tail.rstrip(b"\r\n")) :][::-1]
        match = _REVERSED_CRLFS.match(run)
        pairs = match.end() // 2 if match else 0
        count += pairs
        if 2 * pairs < len(tail):
            break
        end, window = low, window * 16
    return count


def _tail_start(data: bytes, start: int) -> int:
    """The start of the line holding the last octet that is not white space or a line end
    (`start` when there is none), found in growing windows from the end, not a copy."""
    end, window = len(data), 4096
    while end > start:
        low = max(start, end - window)
        kept = len(data[low:end].rstrip(b" \t\r\n"))
        if kept:
            return max(start, data.rfind(b"\n", start, low + kept) + 1)
        end, window = low, window * 16
    return start


def _relaxed_lines(lines: bytes) -> bytes:
    """Whole lines canonicalized: the same as RFC 6376's order (strip at line end, then
    collapse), in C-speed passes that are skipped when there is nothing to do."""
    if b"\t" in lines:
        lines = lines.replace(b"\t", b" ")
    if b"  " in lines:
        lines = _SPACE_RUN.sub(b" ", lines)
    if b" \r\n" in lines:
        lines = lines.replace(b" \r\n", b"\r\n")
    return lines


def _relaxed_tail(body: bytes) -> memoryview:
    """The end of a body canonicalized, empty lines at its end removed; an empty body when
    nothing but line ends is left."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _relaxed_lines(body)
    end = len(body)
    if end:
        tail = body[len(body.rstrip(b"\r\n")) :][::-1]
        match = _REVERSED_CRLFS.match(tail)
        end -= 2 * ((match.end() // 2 if match else 1) - 1)
        if end == 2:
            end = 0
    return memoryview(body)[:end]


def sign(
    message: bytes,
    key: DkimKey,
    *,
    extra_signed: Sequence[str] = (),
    extra_oversigned: Sequence[str] = (),
    now: int | None = None,
    oversigned: Sequence[str] = DEFAULT_OVERSIGN,
    bh: str | None = None,
    added: Sequence[bytes] = (),
) -> bytes:
    """The DKIM-Signature field for `added` fields followed by `message`, to be prepended to
    exactly these bytes.

    Oversigned names go into h= once more than they occur, so that adding such a field
    later (a second From, a forged evidence header) breaks the signature. `bh` takes a
    body_hash() of this body computed earlier, when one body goes out under several headers.
    `added`: whole fields (CRLF-terminated) put above the message's own as it leaves; its
    own header block is then parsed once for both (parse_fields keeps recent blocks).
    """
    if bh is not None and not _BODY_HASH.fullmatch(bh):
        raise DkimError(f"{bh!r} is not a body_hash() value")
    header_end, body_start = split_offsets(message)
    parsed = parse_fields(message[:header_end])
    if added:
        if not all(field.endswith(b"\r\n") for field in added):
            raise DkimError("added fields must be whole, each ending in CRLF")
        parsed = parse_fields(b"".join(added)) + parsed
    fields = [f for f in parsed if b":" in f.raw]
    over = _names(oversigned, extra_oversigned)
    wanted = _names(DEFAULT_SIGNED, extra_signed, over)
    over_set, wanted_set = frozenset(over), frozenset(wanted)

    by_name: dict[str, list[bytes]] = {}
    for field in fields:
        if field.name in wanted_set:
            by_name.setdefault(field.name, []).append(field.raw)
    if "from" not in by_name:
        raise DkimError("message has no From field; DKIM requires it to be signed")

    h_names: list[str] = []
    hashed: list[bytes] = []
    for name in wanted:
        present = by_name.get(name)
        if present is not None:
            h_names += [name] * (len(present) + (name in over_set))
            hashed += [_canon_field(raw) for raw in reversed(present)]
        elif name in over_set:
            h_names.append(name)

    timestamp = int(time.time()) if now is None else now
    tags = [
        "v=1;",
        "a=rsa-sha256;",
        "c=relaxed/relaxed;",
        f"d={key.domain};",
        f"s={key.selector};",
        f"t={timestamp};",
    ]
    unsigned = _fold(tags, h_names, bh if bh is not None else body_hash(message, body_start))
    hashed.append(_canon_field(unsigned))
    data = b"\r\n".join(hashed)  # each field's CRLF, the signature's own field without one
    signature = key.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return _append_b(unsigned, base64.b64encode(signature))


def _names(*groups: Sequence[str]) -> list[str]:
    for group in groups:
        if isinstance(group, str):
            raise DkimError(f"header names must be a sequence of names, not the string {group!r}")
    return list(_checked_names(tuple(tuple(group) for group in groups)))


@functools.lru_cache(maxsize=64)
def _checked_names(groups: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    """The names of `groups` lower-cased, each once, in order: the same few lists are given
    for every copy, so their check is kept."""
    seen: dict[str, None] = {}
    for group in groups:
        for name in group:
            if not _FIELD_NAME.fullmatch(name):
                raise DkimError(f"{name!r} is not a header field name")
            seen.setdefault(name.lower(), None)
    return tuple(seen)


def _canon_field(raw: bytes) -> bytes:
    name, _, value = raw.partition(b":")
    if b"\t" in value or b"  " in value or value.find(b"\n", 0, len(value) - 1) != -1:
        value = _WSP_RUN.sub(b" ", _LINE_BREAK.sub(b"", value))
    # else: one line, single spaces: the substitutions would change nothing
    value = value.strip(b" \t\r\n")
    return name.strip(b" \t").lower() + b":" + value


def _fold(tags: list[str], h_names: list[str], bh: str) -> bytes:
    """The field up to an empty b=; breaks fall where FWS is allowed (RFC 6376 §3.2, §3.5)."""
    # Each piece is (text, glued): a glued piece follows the previous one without a space.
    pieces: list[tuple[str, bool]] = [(tag, False) for tag in tags]
    h_parts = [f"{name}:" for name in h_names]
    h_parts[0] = "h=" + h_parts[0]
    h_parts[-1] = h_parts[-1][:-1] + ";"
    pieces += [(part, i > 0) for i, part in enumerate(h_parts)]
    pieces += [(f"bh={bh};", False), ("b=", False)]

    lines: list[str] = []
    line = "DKIM-Signature:"
    for text, glued in pieces:
        joined = line + ("" if glued else " ") + text
        if len(joined) > MAX_LINE and line.strip():
            lines.append(line)
            line = " " + text
        else:
            line = joined
    lines.append(line)
    return "\r\n".join(lines).encode("ascii")


def _append_b(unsigned: bytes, b: bytes) -> bytes:
    last_line = len(unsigned) - unsigned.rfind(b"\n") - 1
    room = max(MAX_LINE - last_line, 0)
    out = [unsigned + b[:room]]
    out += [b"\r\n " + b[i : i + MAX_LINE - 1] for i in range(room, len(b), MAX_LINE - 1)]
    return b"".join(out) + b"\r\n"
