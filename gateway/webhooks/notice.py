"""The admins' notice that the relay disabled an endpoint that kept failing.

Our own message (gateway/mail/own_mail.py builds its MIME, gateway/outbound/local_mail.py
queues it): one text part, in `[policy] language`. The wording is in
``gateway/texts/catalogs/webhook_disabled/``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.mail.own_mail import OwnMail, one_line, text_part
from gateway.store.models import WebhookEndpoint
from gateway.texts.files import load_texts
from rules.language import shipped_language

LINE_LIMIT = 300


def disabled_notice(
    endpoint: WebhookEndpoint,
    *,
    admin: str,
    days: int,
    last_error: str,
    failing_since: datetime,
    language: str,
) -> OwnMail:
    lang = shipped_language(language)
    texts = load_texts("webhook_disabled")[lang]
    since = failing_since.astimezone(UTC)
    url = one_line(endpoint.url, LINE_LIMIT)
    body = texts["body"].format(
        url=url,
        description=one_line(endpoint.description or "-", LINE_LIMIT),
        failing_since=texts["format.utc"].format(
            year=since.year,
            month=since.month,
            day=since.day,
            hour=since.hour,
            minute=since.minute,
        ),
        failing_since_utc=since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        reason=texts["reason"].format(days=days),
        last_error=one_line(last_error or "-", LINE_LIMIT),
        endpoint_id=endpoint.id,
    )
    return OwnMail(
        to=admin,
        subject=one_line(texts["subject"].format(url=url), 400),
        body=text_part(body.strip("\n") + "\n", language=lang),
        about=endpoint.id,
    )
