"""The consent PDF and the agent's confirmation: what they say, in every language, whatever
characters the prospect's name or the texts hold. No database, no fixtures."""

from __future__ import annotations

import email
import email.policy
import io
import re
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pypdf
import pytest
from fontTools.ttLib import TTCollection, TTFont

from gateway.letters import consent_pdf
from gateway.letters.confirmation import confirmation_mail
from gateway.letters.consent_pdf import Paragraph, markdown_paragraphs, pdf_text
from gateway.letters.evidence import ConsentRecord, ShownBlock, texts_sha256
from gateway.letters.pdf_font import font_files, font_problem
from gateway.mail.own_mail import render
from gateway.texts.files import SHIPPED_BLOCK_SET, load_texts
from rules.language import shipped_language

CONSENT_ID = "0190abcdef0123456789"
LETTERS = SHIPPED_BLOCK_SET

WITHDRAWAL = """### Widerrufsrecht

Sie haben das Recht, binnen **vierzehn Tagen** ohne Angabe von Gründen diesen Vertrag zu
widerrufen. „Anführungszeichen“ – Gedankenstrich … 100 € Größe Maß.

- An Muster Immobilien GmbH, [info@muster.example](mailto:info@muster.example)
- Bestellt am (\\*)/erhalten am (\\*)

1. erstens
2. zweitens

Musterstraße 1\\
12345 Berlin

Mehr unter [unserer Seite](https://muster.example/widerruf).
"""

BLOCKS_DE = (
    ShownBlock("withdrawal", "Widerrufsbelehrung", WITHDRAWAL, "Ich habe die Belehrung erhalten."),
    ShownBlock(
        "early-start",
        "Beginn vor Ablauf der Widerrufsfrist",
        "Mir ist bekannt, dass mein Widerrufsrecht erlischt.",
        "Ich verlange den vorzeitigen Beginn.",
    ),
    ShownBlock("privacy", "Datenschutzhinweise", "Wir verarbeiten Ihre Daten.", None),
)
BLOCKS_ES = (
    ShownBlock(
        "withdrawal",
        "Información sobre el desistimiento",
        "¿Tiene preguntas? ¡Llámenos! Señor Núñez, año, acción.",
        "He recibido la información.",
    ),
    ShownBlock("terms", "Condiciones", "La comisión es del 3 %.", "Acepto pagar la comisión."),
)
BLOCKS_EN = (
    ShownBlock(
        "withdrawal", "Right of withdrawal", "You may withdraw within 14 days.", "Received."
    ),
    ShownBlock("terms", "Terms", "The commission is **3.57 %**.", "I agree to pay the commission."),
)
BLOCKS = {"de": BLOCKS_DE, "en": BLOCKS_EN, "es": BLOCKS_ES}
# the first block with a checkbox is ticked, the second is not
TICKED = {"de": "withdrawal", "en": "withdrawal", "es": "terms"}
UNTICKED = {"de": "early-start", "en": "terms", "es": "withdrawal"}


def make_record(language: str = "de", **changes: object) -> ConsentRecord:
    blocks = BLOCKS[language]
    record = ConsentRecord(
        consent_id=CONSENT_ID,
        recipient="Peter Müller <peter@example.com>",
        subject="[Exposé] Wohnung mit Balkon – 3 Zimmer",
        agent="Anna Agent <agent@broker.example>",
        company="Muster Immobilien GmbH",
        language=language,
        letter_sent_at=datetime(2026, 11, 23, 13, 0, 1, tzinfo=UTC),
        given_at=datetime(2026, 11, 23, 14, 5, 9, 654321, tzinfo=UTC),
        ip="203.0.113.7",
        user_agent="Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Safari/604.1",
        blocks=blocks,
        checked=frozenset({TICKED[language]}),
        texts_sha256=texts_sha256(blocks),
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def pages_text(pdf: bytes) -> list[str]:
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return [" ".join(page.extract_text().split()) for page in reader.pages]


def text_of(pdf: bytes) -> str:
    return " ".join(pages_text(pdf))


def block(record: ConsentRecord, block_id: str) -> ShownBlock:
    return next(b for b in record.blocks if b.id == block_id)


# -- the PDF ---------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["de", "en", "es"])
def test_the_pdf_holds_the_declarations_in_the_prospects_language(language: str) -> None:
    record = make_record(language)
    pdf = consent_pdf.render(record)
    assert pdf.startswith(b"%PDF-")
    text = text_of(pdf)
    texts = load_texts("consent_pdf")[language]

    assert texts["title"] in text
    for value in (
        record.company,
        record.recipient,
        record.subject,
        record.agent,
        record.ip,
        record.user_agent,
        record.consent_id,
        record.texts_sha256,
        f"sealrelay evidence {record.consent_id}",
        "2026-11-23 14:05:09 UTC",  # consent, UTC
        "2026-11-23 13:00:01 UTC",  # letter sent, UTC
    ):
        assert value in text, value
    for key in ("fields.ip", "fields.given", "fields.letter_sent", "texts_hash"):
        assert texts[key] in text, key
    for shown in record.blocks:
        assert shown.title in text
    ticked, unticked = block(record, TICKED[language]), block(record, UNTICKED[language])
    assert f"{texts['ticked']}: {ticked.checkbox}" in text
    assert f"{texts['not_ticked']}: {ticked.checkbox}" not in text
    assert f"{texts['not_ticked']}: {unticked.checkbox}" in text
    # a block without a checkbox gets no mark
    assert text.count(f"{texts['ticked']}: ") == 2


def test_local_time_is_berlin_in_winter_and_summer() -> None:
    winter = text_of(consent_pdf.render(make_record()))
    assert "23.11.2026, 15:05:09 Uhr MEZ = 2026-11-23 14:05:09 UTC" in winter
    assert "23.11.2026, 14:00:01 Uhr MEZ = 2026-11-23 13:00:01 UTC" in winter
    summer = make_record(given_at=datetime(2026, 7, 1, 22, 30, 0, tzinfo=UTC))
    assert "02.07.2026, 00:30:00 Uhr MESZ" in text_of(consent_pdf.render(summer))
    tokyo = text_of(consent_pdf.render(make_record("en"), "Asia/Tokyo"))
    assert "23 Nov 2026, 23:05:09 JST = 2026-11-23 14:05:09 UTC" in tokyo


def test_german_and_spanish_characters_survive() -> None:
    german = text_of(consent_pdf.render(make_record("de")))
    for phrase in (
        "Gründen",
        "„Anführungszeichen“ – Gedankenstrich … 100 € Größe Maß.",
        "Musterstraße 1",
        "Empfänger",
    ):
        assert phrase in german, phrase
    spanish = text_of(consent_pdf.render(make_record("es")))
    assert "¿Tiene preguntas? ¡Llámenos! Señor Núñez, año, acción." in spanish
    assert "Información sobre el desistimiento" in spanish


def test_characters_the_core_fonts_lack_become_question_marks() -> None:
    record = make_record(
        recipient="李小龍 😀 <li@example.com>",
        user_agent="Agent\x00with\ncontrols\u202e and emoji 🏠",
        company="Őrség Ingatlan Kft.",
    )
    text = text_of(consent_pdf.render(record))
    assert "??? ? <li@example.com>" in text
    assert "Agent with controls and emoji ?" in text
    assert "Orség Ingatlan Kft." in text  # the accent the code page lacks goes, not the letter


def test_pdf_text_maps_to_windows_1252() -> None:
    assert pdf_text("„ä“ – € …") == "„ä“ – € …"
    assert pdf_text("a\u202fb\u2011c\u200bd") == "a b-cd"
    assert pdf_text("ő ł 漢 😀") == "o ? ? ?"
    assert pdf_text("x\r\ny\tz\x07") == "x  y z "
    assert pdf_text("\u202eevil") == "evil"
    for sample in ("", "ñ¿¡á", "☒ ☐ ✓"):
        pdf_text(sample).encode("cp1252")


def test_long_texts_flow_onto_numbered_pages() -> None:
    long = "\n\n".join(
        f"Absatz {n}: " + "Ein langer Satz über das Objekt. " * 40 for n in range(40)
    )
    blocks = (ShownBlock("terms", "Maklerbedingungen", long, "Ich stimme zu."),)
    record = make_record(blocks=blocks, checked=frozenset({"terms"}))
    pages = pages_text(consent_pdf.render(record))
    assert len(pages) >= 5
    for number, page in enumerate(pages, start=1):
        assert f"Seite {number} von {len(pages)}" in page
        assert CONSENT_ID in page
    assert "Absatz 39:" in " ".join(pages)
    assert "angekreuzt: Ich stimme zu." in pages[-1] or "angekreuzt: Ich stimme zu." in pages[-2]


def test_markdown_is_shown_as_text() -> None:
    text = text_of(consent_pdf.render(make_record()))
    assert "**" not in text
    assert "###" not in text
    assert "binnen vierzehn Tagen ohne" in text
    assert "• An Muster Immobilien GmbH, info@muster.example" in text
    assert "1. erstens 2. zweitens" in text
    assert "Bestellt am (*)/erhalten am (*)" in text
    assert "unserer Seite (https://muster.example/widerruf)" in text


def test_markdown_paragraphs() -> None:
    paragraphs = markdown_paragraphs(
        "# Title\n\nOne **bold** and *em*\nsoft.  \nHard.\n\n- a\n  - b\n\n3. c\n\n> quoted\n"
    )
    assert paragraphs == [
        Paragraph((("Title", "B"),), heading=True),
        Paragraph((("One ", ""), ("bold", "B"), (" and ", ""), ("em", "I"), (" soft.\nHard.", ""))),
        Paragraph((("a", ""),), marker="\u2022", level=1),
        Paragraph((("b", ""),), marker="\u2022", level=2),
        Paragraph((("c", ""),), marker="3.", level=1),
        Paragraph((("quoted", ""),), quote=True),
    ]


def test_the_same_record_gives_the_same_bytes() -> None:
    assert consent_pdf.render(make_record()) == consent_pdf.render(make_record())


@pytest.mark.parametrize("language", ["de", "en", "es"])
def test_the_shipped_letter_texts_render(language: str) -> None:
    files = sorted((LETTERS / language).glob("*.md"))
    assert files, f"no shipped texts in {LETTERS / language}"
    blocks = tuple(
        ShownBlock(path.stem, path.stem.title(), path.read_text(encoding="utf-8"), "Ja.")
        for path in files
    )
    record = make_record(language, blocks=blocks, checked=frozenset({files[0].stem}))
    text = text_of(consent_pdf.render(record))
    assert record.texts_sha256 in text
    assert "**" not in text


def test_languages_and_wording_files() -> None:
    assert shipped_language("de-DE") == "de"
    assert shipped_language("es_ES") == "es"
    assert shipped_language("fr") == "en"
    for kind in ("consent_pdf", "confirmation"):
        catalogs = load_texts(kind)  # raises if a language's keys differ
        assert set(catalogs) == {"de", "en", "es"}
    french = text_of(consent_pdf.render(replace(make_record("en"), language="fr")))
    assert load_texts("consent_pdf")["en"]["title"] in french


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        consent_pdf.render(make_record(given_at=datetime(2026, 11, 23, 14, 5, 9)))


# -- the agent's confirmation ----------------------------------------------------------------


def confirmation_of(
    record: ConsentRecord,
    *,
    offer_subject: str = "Wohnung mit Balkon – 3 Zimmer",
    language: str = "de",
) -> tuple[bytes, EmailMessage, bytes]:
    pdf = consent_pdf.render(record)
    mail = confirmation_mail(
        record,
        pdf,
        agent_address="agent@broker.example",
        offer_subject=offer_subject,
        language=language,
    )
    raw = render(
        mail,
        sender="postmaster@relay.broker.example",
        hostname="relay.broker.example",
        now=datetime.now(UTC),
    )
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed, pdf


def test_the_confirmation_tells_the_agent_in_german() -> None:
    record = make_record("es")  # the prospect's language does not matter to the agent
    _, mail, pdf = confirmation_of(record)

    assert mail["From"] == "sealrelay <postmaster@relay.broker.example>"
    assert mail["To"] == "agent@broker.example"
    assert mail["Subject"] == (
        "Einwilligung erteilt: Wohnung mit Balkon – 3 Zimmer – Peter Müller <peter@example.com>"
    )
    assert mail["Auto-Submitted"] == "auto-generated"
    assert re.fullmatch(
        rf"<{CONSENT_ID}\.[0-9a-f]{{16}}@relay\.broker\.example>", mail["Message-ID"]
    )
    assert mail["Date"].datetime.tzinfo is not None
    assert mail.get_content_type() == "multipart/mixed"

    body = mail.get_body(("plain",))
    assert body is not None
    assert body["Content-Transfer-Encoding"] == "quoted-printable"
    text = body.get_content()
    for phrase in (
        "Peter Müller <peter@example.com> hat in die Bedingungen Ihres Angebots eingewilligt.",
        "Angebot:              Wohnung mit Balkon – 3 Zimmer",
        "Einwilligung erteilt: 23.11.2026, 15:05:09 Uhr MEZ (2026-11-23 14:05:09 UTC)",
        "IP-Adresse:           203.0.113.7",
        "Das Original wurde daraufhin an Peter Müller <peter@example.com> freigegeben.",
        f"Einwilligungs-ID:              {CONSENT_ID}",
        record.texts_sha256,
        "☒ Acepto pagar la comisión.",
        "☐ He recibido la información. (nicht angekreuzt)",
        f"sealrelay evidence {CONSENT_ID}",
    ):
        assert phrase in text, phrase

    attachments = list(mail.iter_attachments())
    assert len(attachments) == 1
    attached = attachments[0]
    assert isinstance(attached, EmailMessage)
    assert attached.get_content_type() == "application/pdf"
    assert attached.get_filename() == f"Einwilligung-{CONSENT_ID}.pdf"
    assert attached["Content-Transfer-Encoding"] == "base64"
    assert attached.get_content() == pdf


def test_the_confirmation_is_seven_bit_crlf_mail() -> None:
    raw, _, _ = confirmation_of(make_record())
    assert raw.isascii()
    assert raw.count(b"\n") == raw.count(b"\r\n")
    assert raw.count(b"\r") == raw.count(b"\r\n")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    header_block = raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?utf-8?" in header_block  # the subject is RFC 2047 encoded


@pytest.mark.parametrize(
    ("language", "subject", "filename"),
    [
        ("en", "Consent given: Offer – Peter Müller <peter@example.com>", "Consent-"),
        (
            "es",
            "Consentimiento otorgado: Offer – Peter Müller <peter@example.com>",
            "Consentimiento-",
        ),
    ],
)
def test_the_confirmation_in_other_languages(language: str, subject: str, filename: str) -> None:
    _, mail, _ = confirmation_of(make_record(), offer_subject="Offer", language=language)
    assert mail["Subject"] == subject
    attached = next(iter(mail.iter_attachments()))
    assert isinstance(attached, EmailMessage)
    assert (attached.get_filename() or "").startswith(filename)
    assert mail.get_body(("plain",))["Content-Language"] == language  # type: ignore[index]


def test_values_cannot_add_header_fields() -> None:
    record = make_record(recipient="Eve <eve@example.com>\r\nBcc: victim@example.org")
    _, mail, _ = confirmation_of(record, offer_subject="Offer\nX-Injected: yes")
    assert mail["Bcc"] is None
    assert mail["X-Injected"] is None
    assert "Bcc: victim@example.org" in mail["Subject"]  # on the subject's one line
    with pytest.raises(ValueError, match="host name"):
        render(
            confirmation_mail(record, b"%PDF", agent_address="a@b.example", offer_subject="x"),
            sender="postmaster@relay.example",
            hostname="bad host\r\n",
            now=datetime.now(UTC),
        )
    with pytest.raises(ValueError, match="agent address"):
        confirmation_mail(
            record, b"%PDF", agent_address="a@b.example\r\nBcc: x@y", offer_subject="x"
        )


# -- a TrueType font ([letter] pdf_font) -----------------------------------------------------

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # fonts-dejavu-core


def base_fonts(pdf: bytes) -> set[str]:
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return {
        str(font["/BaseFont"]).lstrip("/").split("+")[-1]
        for page in reader.pages
        for font in page["/Resources"]["/Font"].values()
    }


def test_a_truetype_font_shows_every_letter_it_has() -> None:
    """Polish, Turkish, Greek and Cyrillic names as written, Hebrew and Arabic right to left
    (read back in their logical order); what even the font lacks (Han characters in DejaVu)
    reduced as with the core fonts; the bold and oblique files beside the regular one used
    for their styles."""
    assert DEJAVU.is_file(), "fonts-dejavu-core is missing (scripts/with-test-services installs it)"
    record = make_record(
        recipient="Łukasz Wiśniewski <lukasz@example.com>",
        company="Şükrü Öztürk Emlak",
        agent="Γιώργος Παπαδόπουλος / Дмитрий Иванов <agent@broker.example>",
        subject="דירה בתל אביב",
        user_agent="Agent\x00with\ncontrols\u202e 李 ő محمد الأحمد",
    )
    blocks = (*record.blocks, ShownBlock("note", "Hinweis", "Ein *kursiver* Satz.", None))
    record = replace(record, blocks=blocks, texts_sha256=texts_sha256(blocks))
    pdf = consent_pdf.render(record, font=DEJAVU)
    text = text_of(pdf)
    assert "Łukasz Wiśniewski <lukasz@example.com>" in text
    assert "Şükrü Öztürk Emlak" in text
    assert "Γιώργος Παπαδόπουλος / Дмитрий Иванов" in text
    assert "דירה בתל אביב" in text  # drawn as stored, it would read back reversed
    assert "Agent with controls ? ő محمد الأحمد" in text
    assert "„Anführungszeichen“ – Gedankenstrich … 100 €" in text
    assert base_fonts(pdf) == {"DejaVuSansBook", "DejaVuSansBold", "DejaVuSansOblique", "Courier"}
    assert consent_pdf.render(record, font=DEJAVU) == pdf  # the same record, the same bytes


def test_without_a_font_the_core_fonts_draw_it() -> None:
    pdf = consent_pdf.render(make_record(recipient="Łukasz <l@example.com>"))
    assert "?ukasz <l@example.com>" in text_of(pdf)
    assert base_fonts(pdf) == {"Helvetica", "Helvetica-Bold", "Courier"}


def test_a_font_that_cannot_be_read_leaves_the_consent_in_the_core_fonts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gone or broken since check-config looked: the prospect's consent is still recorded."""
    broken = tmp_path / "Broken.ttf"
    broken.write_bytes(b"\x00\x01\x00\x00 not a font")
    for font in (tmp_path / "Gone.ttf", broken):
        pdf = consent_pdf.render(make_record(), font=font)
        assert "Peter Müller <peter@example.com>" in text_of(pdf)
        assert base_fonts(pdf) == {"Helvetica", "Helvetica-Bold", "Courier"}
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 2 and all("consent PDF in the built-in fonts" in m for m in logged)


@pytest.mark.parametrize(
    ("names", "styles"),
    [
        (
            ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"],
            {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf", "I": "DejaVuSans-Oblique.ttf"},
        ),
        (
            ["NotoSans-Regular.ttf", "NotoSans-Bold.ttf", "NotoSans-BoldItalic.ttf"],
            {"": "NotoSans-Regular.ttf", "B": "NotoSans-Bold.ttf", "BI": "NotoSans-BoldItalic.ttf"},
        ),
        (["Solo.otf", "Solo-Bold.ttf"], {"": "Solo.otf"}),
    ],
)
def test_a_familys_styles_are_found_beside_its_regular_file(
    tmp_path: Path, names: list[str], styles: dict[str, str]
) -> None:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    files = font_files(tmp_path / names[0])
    regular = styles[""]
    assert {style: path.name for style, path in files.items()} == {
        style: styles.get(style, regular) for style in ("", "B", "I", "BI")
    }


def test_a_font_collection_draws_in_its_first_font(tmp_path: Path) -> None:
    """Noto CJK and others ship as .ttc: its first font is the family's."""
    collection = TTCollection()
    collection.fonts = [TTFont(DEJAVU), TTFont(DEJAVU.with_name("DejaVuSans-Bold.ttf"))]
    ttc = tmp_path / "Collected.ttc"
    collection.save(ttc)
    assert font_problem(ttc) is None
    pdf = consent_pdf.render(make_record(recipient="Łukasz <l@example.com>"), font=ttc)
    assert "Łukasz <l@example.com>" in text_of(pdf)
    assert "Helvetica" not in base_fonts(pdf)
