"""The DATA feed, given pieces as data_received would: ends, smuggling, limits, sync."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fronts.data_reader import KEPT, WINDOW, DataFeed, Spooled
from gateway.mail import lines

LIMIT = 1001


@dataclass(frozen=True)
class DataResult:
    """What the session hands on: the content, or why there is none."""

    content: bytes
    too_big: bool = False
    line_too_long: bool = False


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[index : index + size] for index in range(0, len(data), size)]


class Fed:
    """What a connection's pieces made: the spooled DATA and the octets behind its end."""

    def __init__(self, pieces: list[bytes], size_limit: int | None, spool_dir: Path | None):
        self.feed = DataFeed(size_limit, LIMIT, spool_dir)
        self.rest = b""
        for piece in pieces:
            if self.feed.ended:
                self.rest += piece
                continue
            end = self.feed.feed(piece)
            if end is not None:
                self.rest += piece[end:]


async def spool_data(
    pieces: list[bytes], size_limit: int | None, spool_dir: Path | None = None
) -> tuple[Spooled, bytes]:
    fed = Fed(pieces, size_limit, spool_dir)
    assert fed.feed.ended, "the end of data was not found"
    return await fed.feed.spooled(), fed.rest


async def read_data(pieces: list[bytes], size_limit: int | None = None) -> tuple[DataResult, bytes]:
    spooled, rest = await spool_data(pieces, size_limit)
    try:
        if spooled.too_big:
            return DataResult(b"", too_big=True), rest
        if spooled.line_too_long:
            return DataResult(b"", line_too_long=True), rest
        return DataResult(await spooled.read()), rest
    finally:
        spooled.close()


async def test_reads_to_the_end_and_leaves_pipelined_commands() -> None:
    result, rest = await read_data([b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"])
    assert result.content == b"Subject: x\r\n\r\nbody\r\n"
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("split", range(1, 12))
async def test_the_end_split_across_pieces(split: int) -> None:
    data = b"a\r\nbc\r\n.\r\nNOOP\r\n"
    result, rest = await read_data(pieces_of(data, split))
    assert result.content == b"a\r\nbc\r\n"
    assert rest == b"NOOP\r\n"


async def test_the_spool_is_waited_for_until_the_end_comes() -> None:
    """`spooled` waits for pieces still to come, as a session's task does."""
    feed = DataFeed(None, LIMIT, None)
    spooling = asyncio.create_task(feed.spooled())
    assert feed.feed(b"one\r\n") is None
    await asyncio.sleep(0)
    assert not spooling.done()
    assert feed.feed(b"two\r\n.\r\nQUIT\r\n") == 8
    spooled = await spooling
    try:
        assert await spooled.read() == b"one\r\ntwo\r\n"
    finally:
        spooled.close()


async def test_empty_data_and_dot_stuffing() -> None:
    assert (await read_data([b".\r\n"]))[0].content == b""
    stuffed = b"..leading\r\nmid\r\n...\r\n.\r\n"
    assert (await read_data([stuffed]))[0].content == b".leading\r\nmid\r\n..\r\n"


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"x.\r\n"])
async def test_only_crlf_dot_crlf_ends_the_data(fake_end: bytes) -> None:
    data = b"one\r\n" + fake_end + b"MAIL FROM:<evil@example.com>\r\n.\r\n"
    result, rest = await read_data([data + b"QUIT\r\n"])
    assert result.content.endswith(b"MAIL FROM:<evil@example.com>\r\n")  # all one message
    assert rest == b"QUIT\r\n"


async def test_too_big_is_read_to_the_end_so_the_session_stays_in_step() -> None:
    body = b"x" * 70 + b"\r\n"
    result, rest = await read_data(pieces_of(body * 2000 + b".\r\nRSET\r\n", 4096), 10_000)
    assert result.too_big and result.content == b""
    assert rest == b"RSET\r\n"


async def test_pieces_larger_than_the_window() -> None:
    lines = [os.urandom(30).hex().encode() + b"\r\n" for _ in range(70_000)]
    data = b"".join(lines)
    assert len(data) > 4 * WINDOW
    assert (await read_data([data + b".\r\n"]))[0].content == data


async def test_line_length() -> None:
    ok = b"y" * 999 + b"\r\n"
    assert (await read_data([ok + b".\r\n"]))[0].content == ok
    long = b"y" * 1000 + b"\r\n"
    assert (await read_data([long + b".\r\n"]))[0].line_too_long


@pytest.mark.parametrize("dot_lines", [3, 300])  # a few dots are listed, many replaced
@pytest.mark.parametrize("size", [1, 2, 3, 5, 4096])
async def test_dots_and_long_lines_across_piece_borders(dot_lines: int, size: int) -> None:
    """The scans run on each window as it is spooled: whatever the borders, the result is
    the whole message's, unstuffed at every line start and refused for a line one octet over."""
    content = b".first.\r\n" + b"text.\r\n.dot.\r\n..two\r\n" * dot_lines + b"y" * 999 + b"\r\n."
    wire = content.replace(b"\r\n.", b"\r\n..")
    wire = b"." + wire + b"\r\n.\r\nQUIT\r\n"
    result, rest = await read_data(pieces_of(wire, size))
    assert result.content == content + b"\r\n"
    assert rest == b"QUIT\r\n"

    over = wire.replace(b"y" * 999, b"y" * 1000)
    result, rest = await read_data(pieces_of(over, size))
    assert result.line_too_long and result.content == b""
    assert rest == b"QUIT\r\n"


@pytest.mark.parametrize("size", [KEPT - 1000, KEPT + 1000, 3 * KEPT])
async def test_small_data_stays_in_memory_and_big_data_goes_to_the_spool(
    size: int, tmp_path: Path
) -> None:
    line = b"z" * 98 + b"\r\n"
    data = b"." + line * (size // len(line))  # a stuffed dot first: the data starts a line
    spooled, _ = await spool_data(pieces_of(data + b".\r\n", 65_536), None, tmp_path)
    try:
        spooled_to_file = any(
            os.readlink(f"/proc/self/fd/{fd}").startswith(f"{tmp_path}/")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        )
        assert spooled_to_file == (size > KEPT)
        assert spooled.size == len(data) - 1
        assert await spooled.read() == data[1:]
        hashed = spooled.hashed_file()
        if size > KEPT:
            assert hashed is not None
            assert hashed.digest == hashlib.sha256(data[1:]).hexdigest()
            assert hashed.size == len(data) - 1
            # the blob store may give the spool file a name (its original, not a copy)
            directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{hashed.fd}", "named", dst_dir_fd=directory)
            finally:
                os.close(directory)
            assert (tmp_path / "named").read_bytes() == data[1:]
            (tmp_path / "named").unlink()
        else:
            assert hashed is None
    finally:
        spooled.close()
    assert list(tmp_path.iterdir()) == []


async def test_lines_of_dots_reach_the_spool_a_window_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ".\r\n" ends a piece of the read, so lines of dots make pieces of a few octets;
    the spool file still gets one write per window, not one hop to a thread per piece
    (a 10 MB message of such lines took a minute to receive)."""
    writes: list[int] = []
    to_thread = asyncio.to_thread

    async def counting(function: object, *args: object) -> object:
        if getattr(function, "__name__", "") == "_write_out":
            writes.append(sum(len(piece) for piece in args[2]))  # type: ignore[attr-defined]
        return await to_thread(function, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counting)
    dots = b"..\r\n...\r\n..x\r\n" * (3 * KEPT // 14)  # stuffed: ".", "..", ".x"
    spooled, _ = await spool_data(pieces_of(dots + b".\r\n", 65_536), None, tmp_path)
    try:
        expected = dots.replace(b"\r\n.", b"\r\n")[1:]
        assert await spooled.read() == expected
        assert sum(writes) == len(expected)
        assert len(writes) <= len(expected) // WINDOW + 2
    finally:
        spooled.close()


LINE_END_PIECES = st.sampled_from(
    [b"a", b".", b"x.", b"..", b"\r\n", b"\r\n", b"\r\n.", b"\r", b"\n", b"\n\r", b"\r\r\n"]
)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(LINE_END_PIECES, max_size=50), size=st.integers(1, 9))
async def test_a_bare_line_end_is_found_as_the_lines_arrive(pieces: list[bytes], size: int) -> None:
    """The spool's finding, made a block of lines at a time whatever the pieces, is the
    whole content's: the pipeline takes it instead of scanning the message again."""
    content = b"".join(pieces)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content == b"\r\n":
        content = b""
    wire = (b"." if content.startswith(b".") else b"") + lines.stuffed(content) + b".\r\n"
    if b"\r\n.\r\n" in b"\r\n" + wire[:-3]:
        return  # the content would end before its end (a line of one dot, unstuffed)
    spooled, behind = await spool_data(pieces_of(wire + b"QUIT\r\n", size), None)
    try:
        found = lines.bare_line_end(content) != -1
        assert spooled.bare_line_end is found
        if not found:  # a dot after a bare LF may be taken for stuffing: refused anyway
            assert await spooled.read() == content
    finally:
        spooled.close()
    assert behind == b"QUIT\r\n"


async def test_a_bare_line_end_past_the_first_window_is_found(tmp_path: Path) -> None:
    line = b"QUJD" * 19 + b"\r\n"
    for bad in (b"bare\nLF\r\n", b"bare\rCR\r\n", b"\n"):
        content = line * (3 * WINDOW // len(line)) + bad + line * 10
        spooled, _ = await spool_data([content + b".\r\n"], None, tmp_path)
        try:
            assert spooled.bare_line_end and await spooled.read() == content
        finally:
            spooled.close()
    clean = line * (3 * WINDOW // len(line))
    spooled, _ = await spool_data([clean + b".\r\n"], None, tmp_path)
    assert not spooled.bare_line_end
    spooled.close()


@pytest.mark.parametrize("size", [1000, 65_536, 300_001])
async def test_prose_whose_lines_end_in_a_full_stop_is_gathered_whole(
    tmp_path: Path, size: int
) -> None:
    """Each such line is a piece of its own; gathered a window at a time, the content is
    the same, the spool file holds it, and the next command stays in the reader."""
    content = b"The house has 3.5 rooms.\r\n.Near the lake.\r\n..\r\nx\r\n" * 20_000
    wire = content.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n"
    spooled, behind = await spool_data(pieces_of(wire, size), None, tmp_path)
    try:
        assert spooled.size == len(content) and not spooled.bare_line_end
        assert await spooled.read() == content
        assert spooled.hashed_file() is not None
    finally:
        spooled.close()
    assert behind == b"QUIT\r\n"


FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"x.\r\n", b"\r\n.x", b"\r\n..\r\n"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
@pytest.mark.parametrize("at", [0, 3, WINDOW - 2, 2 * WINDOW + 1])
@pytest.mark.parametrize("size", [7, 65_536])
async def test_only_crlf_dot_crlf_ends_a_big_message_whatever_comes_first(
    fake_end: bytes, at: int, size: int
) -> None:
    """Found by its dot in base64 (no dot at all) and in text alike: no other dot ends the
    data, wherever it falls against the windows and the pieces the client's writes make."""
    line = b"QUJD" * 19 + b"\r\n"
    body = (line * (3 * WINDOW // len(line)))[:at] + fake_end + line * 100
    for content in (body, b"Text. More text.\r\n" * 40 + body):
        content += b"" if content.endswith(b"\r\n") else b"\r\n"
        wire = (b"." if content.startswith(b".") else b"") + lines.stuffed(content)
        result, rest = await read_data(pieces_of(wire + b".\r\nQUIT\r\n", size))
        assert rest == b"QUIT\r\n"  # still in step
        if lines.bare_line_end(content) == -1:  # else refused: a dot after LF may go
            assert result.content == content
