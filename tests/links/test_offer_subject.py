"""The prospect never sees the tag ("[Exposé]") by which the rules knew the mail as an offer.

The letter and the offer page show the subject without it; so must the download page of
the released offer's linked files, its zip and its expired-link page.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from rules.registered_letter import without_tag
from tests.letter_site import LetterSite, text_of


async def download_path(site: LetterSite, token: str) -> str:
    """The /d/ link of the large PDF, as the released offer's page carries it."""
    response = await site.consent(token)
    assert response.status == 303
    _, body = await site.get(f"/l/{token}/offer")
    [link] = set(re.findall(rf"{re.escape(site.url)}(/d/[A-Za-z0-9_-]{{43}})", body.decode()))
    return link


async def test_download_page_of_an_offer_shows_the_subject_without_its_tag(
    site: LetterSite,
) -> None:
    token, _ = await site.send_offer()
    path = await download_path(site, token)

    response, body = await site.get(path)
    assert response.status == 200
    [title] = re.findall(r"<title>(.*?)</title>", body.decode(), re.S)
    [heading] = re.findall(r'<h1 id="title">(.*?)</h1>', body.decode(), re.S)
    assert " ".join(heading.split()) == "Villa am See"
    assert "Villa am See" in title
    assert "[Exposé]" not in text_of(body) and "[Expos&#233;]" not in body.decode()

    response, _ = await site.get(f"{path}/zip")
    assert response.status == 200
    disposition = unquote(response.headers["Content-Disposition"])
    assert "Villa am See.zip" in disposition and "Exposé]" not in disposition


async def test_expired_download_link_mails_the_agent_without_the_tag(site: LetterSite) -> None:
    token, _ = await site.send_offer()
    path = await download_path(site, token)
    site.clock.advance(days=400)

    response, body = await site.get(path)
    assert response.status == 410
    [mailto] = re.findall(r'href="(mailto:[^"]+)"', body.decode())
    assert "Villa%20am%20See" in mailto and "Expos" not in unquote(mailto)


def test_without_tag_takes_only_a_configured_tag_off_the_front() -> None:
    tags = ("[Exposé]", "[Offer]")
    assert without_tag("[Exposé] Villa am See", tags) == "Villa am See"
    assert without_tag("  [exposé]Villa", tags) == "Villa"
    assert without_tag("[OFFER]  Flat", tags) == "Flat"
    assert without_tag("Re: [Exposé] Villa", tags) == "Re: [Exposé] Villa"
    assert without_tag("Villa [Exposé]", tags) == "Villa [Exposé]"
    assert without_tag("", tags) == ""
