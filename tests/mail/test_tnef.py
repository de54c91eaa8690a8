"""Reading the files out of a winmail.dat, and refusing a stream that lies about itself."""

from __future__ import annotations

import logging
import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tnefparse import TNEF

from gateway.mail import tnef
from tests.mail import tnef_stream as w
from tests.mail.tnef_stream import Attachment

PDF = b"%PDF-1.7\n" + os.urandom(5000)


def test_a_notes_files_come_out_named_and_typed() -> None:
    data = w.stream(
        [
            Attachment(PDF, title="EXPOSE~1.PDF", long_filename="Exposé Müllerstraße.pdf"),
            Attachment(b"a;b\r\n", title="preise.csv", mime_tag="text/csv"),
            Attachment(b"\x89PNG....", long_filename="C:\\Scans\\Grundriss.png"),
        ]
    )
    carried = tnef.carried_files(data)
    assert carried == [
        tnef.CarriedFile("Exposé Müllerstraße.pdf", "application/pdf", PDF),
        tnef.CarriedFile("preise.csv", "text/csv", b"a;b\r\n"),
        tnef.CarriedFile("Grundriss.png", "image/png", b"\x89PNG...."),
    ]


def test_the_title_is_read_in_the_streams_code_page() -> None:
    data = w.stream([Attachment(b"x", title="Übergabe-Protokoll.txt")], codepage=1252)
    assert [c.filename for c in tnef.carried_files(data) or []] == ["Übergabe-Protokoll.txt"]
    data = w.stream([Attachment(b"x", title="Договор.txt")], codepage=1251)
    assert [c.filename for c in tnef.carried_files(data) or []] == ["Договор.txt"]


def test_data_kept_as_a_property_and_an_unnamed_file() -> None:
    data = w.stream([Attachment(PDF, mime_tag="application/pdf", data_as_property=True)])
    assert tnef.carried_files(data) == [
        tnef.CarriedFile("attachment-1.pdf", "application/pdf", PDF)
    ]


def test_a_stream_cut_inside_its_last_checksum_still_gives_its_whole_data() -> None:
    data = w.stream([Attachment(PDF, title="a.pdf")])
    assert [c.data for c in tnef.carried_files(data[:-1]) or []] == [PDF]


@pytest.mark.parametrize(
    "stream",
    [
        w.stream([Attachment(PDF, title="a.pdf")], message_class=w.MEETING_REQUEST),
        w.stream([Attachment(PDF, title="a.pdf"), Attachment(b"item", method=5)]),
        w.stream([Attachment(b"ole", title="picture", method=6)]),
        w.stream([]),
    ],
    ids=["meeting-request", "outlook-item", "ole-object", "no-files"],
)
def test_what_holds_more_than_plain_files_is_kept_whole(stream: bytes) -> None:
    assert tnef.carried_files(stream) is None


def lying(properties: bytes) -> bytes:
    return w.stream([Attachment(PDF, title="a.pdf", raw_properties=properties)])


def lying_property(kind: int, count: int) -> bytes:
    """One property claiming `count` values with none following."""
    return lying(struct.pack("<IHHI", 1, kind | w.MULTI, 0x6000, count))


@pytest.mark.parametrize(
    "stream",
    [
        b"not a winmail.dat at all",
        w.stream([Attachment(PDF, title="a.pdf")])[:5000],
        lying_property(w.SHORT, 0xFFFFFFFF),
        lying_property(w.BINARY, 0xFFFFFFFF),
        lying(struct.pack("<I", 0xFFFFFFFF)),
        struct.pack("<IHBII", w.SIGNATURE, 0, 1, 0x00069003, 0xFFFFFFF0),
    ],
    ids=["no-signature", "cut-short", "short-count", "binary-count", "property-count", "length"],
)
def test_a_stream_that_lies_about_its_size_is_unreadable_at_once(stream: bytes) -> None:
    """tnefparse appends entries for a count of 2^32 shorts until memory is gone."""
    started = time.process_time()
    with pytest.raises(tnef.Unreadable):
        tnef.carried_files(stream)
    assert time.process_time() - started < 1


@pytest.mark.parametrize(
    ("content_type", "filename", "expected"),
    [
        ("application/ms-tnef", "winmail.dat", True),
        ("Application/VND.MS-TNEF", None, True),
        ("application/octet-stream", "WINMAIL.DAT", True),
        ("application/octet-stream", "winmail.dat.pdf", False),
    ],
)
def test_how_a_winmail_dat_is_known(
    content_type: str, filename: str | None, expected: bool
) -> None:
    assert tnef.is_tnef(content_type, filename) is expected


names = st.text(st.characters(codec="utf-8", exclude_categories=("C",)), min_size=1, max_size=40)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    st.lists(
        st.tuples(names.filter(lambda n: n.strip() and not set(n) & set("/\\")), st.binary()),
        min_size=1,
        max_size=4,
    )
)
def test_tnefparse_reads_the_test_streams_as_we_do(files: list[tuple[str, bytes]]) -> None:
    """The writer of the test streams against a reader that is not ours."""
    logging.getLogger("tnefparse").setLevel(logging.CRITICAL)
    data = w.stream([Attachment(body, long_filename=name) for name, body in files])
    theirs = TNEF(data, do_checksum=True)
    assert all(o.good_checksum for o in theirs.objects)
    assert [a.long_filename() for a in theirs.attachments] == [name for name, _ in files]
    assert [a.data for a in theirs.attachments] == [body for _, body in files]
    ours = tnef.carried_files(data) or []
    assert [(c.filename, c.data) for c in ours] == [(n.strip(), body) for n, body in files]
