"""Pure policy: no fixtures, no database, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.actions import KeepOriginal, LinkAttachments, RegisteredLetter, UnpackWinmail
from rules.facts import MessageFacts, PartFacts
from rules.matching import ConfiguredRule, Match, PolicyConfig
from rules.plan import CHAIN, check_chain, plan, plan_for_recipient
from rules.policy import Layer, MiB, Policy, resolve

KEEP = ("text/calendar", "text/vcard", "text/x-vcard")


def facts(
    parts: tuple[PartFacts, ...] = (),
    recipients: tuple[str, ...] = ("p@example.com",),
    group: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    signed: bool = False,
    subject: str = "Exposé",
    sender: str = "anna@broker.example",
    winmail: bool = False,
) -> MessageFacts:
    return MessageFacts(
        sender=sender,
        group=group,
        recipients=recipients,
        subject=subject,
        headers=headers,
        parts=parts,
        signed=signed,
        winmail=winmail,
    )


def attachment(
    id_: str, size: int, ctype: str = "application/pdf", name: str = "a.pdf"
) -> PartFacts:
    return PartFacts(id_, ctype, name, size, True)


BODY = PartFacts("1", "text/plain", None, 500, False)


def test_small_mail_is_kept() -> None:
    decision = plan(facts((BODY, attachment("2", MiB)))).per_recipient["p@example.com"]
    assert decision.action == KeepOriginal()
    assert decision.rule == "default"


def test_one_large_attachment_is_linked_in_the_default_language() -> None:
    parts = (
        BODY,
        attachment("2", 8 * MiB),
        attachment("3", 1024),
        attachment("4", MiB, KEEP[0]),
    )
    action = plan(facts(parts)).per_recipient["p@example.com"].action
    assert action == LinkAttachments(("2",), 90, "de")


def test_total_over_the_limit_links_every_non_exempt_attachment() -> None:
    parts = (
        *tuple(attachment(str(i), 2 * MiB - 1) for i in range(2, 8)),
        attachment("9", 1024, "text/vcard", "anna.vcf"),
    )
    action = plan(facts((BODY, *parts))).per_recipient["p@example.com"].action
    assert isinstance(action, LinkAttachments)
    assert action.part_ids == ("2", "3", "4", "5", "6", "7")


def test_internal_and_signed_mail_keep_the_original_with_a_reason() -> None:
    config = PolicyConfig(Policy(internal_domains=frozenset({"broker.example"})))
    big = (BODY, attachment("2", 20 * MiB))
    internal = plan(facts(big, recipients=("Ben@Broker.Example", "p@example.com")), config)
    assert internal.per_recipient["Ben@Broker.Example"].action == KeepOriginal("internal recipient")
    assert isinstance(internal.per_recipient["p@example.com"].action, LinkAttachments)
    signed = plan(facts(big, signed=True), config).per_recipient["p@example.com"]
    assert isinstance(signed.action, KeepOriginal) and "signature" in signed.action.reason


def test_a_winmail_dat_goes_outside_as_its_files_and_to_colleagues_as_it_came() -> None:
    config = PolicyConfig(Policy(internal_domains=frozenset({"broker.example"})))
    small = facts(
        (BODY, attachment("2", MiB)), ("ben@broker.example", "p@example.com"), winmail=True
    )
    decided = plan(small, config).per_recipient
    assert decided["p@example.com"].action == UnpackWinmail()
    assert decided["p@example.com"].rule == "winmail"
    assert decided["ben@broker.example"].action == KeepOriginal("internal recipient")
    big = facts((BODY, attachment("2", 8 * MiB)), winmail=True)
    assert plan(big, config).per_recipient["p@example.com"].action == LinkAttachments(
        ("2",), 90, "de"
    )
    off = PolicyConfig(Policy(unpack_winmail=False))
    assert plan(small, off).per_recipient["p@example.com"].action == KeepOriginal()
    assert plan(facts((BODY,)), config).per_recipient["p@example.com"].action == KeepOriginal()


@pytest.mark.parametrize(
    ("headers", "group", "language"),
    [
        ((("x-sealrelay-language", "es"), ("content-language", "en")), None, "es"),
        ((("content-language", "en-GB"),), None, "en"),
        ((("content-language", "fr"),), "intl", "en"),
        ((), "intl", "en"),
        ((), None, "de"),
    ],
)
def test_language_order(
    headers: tuple[tuple[str, str], ...], group: str | None, language: str
) -> None:
    config = PolicyConfig(groups={"intl": {"language": "en"}})
    action = plan(facts((BODY, attachment("2", 5 * MiB)), headers=headers, group=group), config)
    result = action.per_recipient["p@example.com"].action
    assert isinstance(result, LinkAttachments) and result.language == language


def test_group_then_rules_override_defaults_and_say_where_from() -> None:
    config = PolicyConfig(
        Policy(),
        groups={"sales": {"link_attachments_over": 5 * MiB, "download_link_days": 30}},
        rules=(
            ConfiguredRule("videos", Match(filenames=("*.MP4",)), {"link_attachments_over": 0}),
            ConfiguredRule("never", Match(senders=("@elsewhere.example",)), {"language": "es"}),
        ),
    )
    doc = facts((BODY, attachment("2", 4 * MiB)), group="sales")
    assert plan(doc, config).per_recipient["p@example.com"].action == KeepOriginal()
    video = facts((BODY, attachment("2", 1000, "video/mp4", "Tour.mp4")), group="sales")
    resolved = config.policy_for(video, "p@example.com")
    assert resolved.policy.link_attachments_over == 0
    assert resolved.source("link_attachments_over") == "rule videos"
    assert resolved.source("download_link_days") == "group sales"
    assert resolved.source("language") == "default"
    assert plan(video, config).per_recipient["p@example.com"].action == LinkAttachments(
        ("2",), 30, "de"
    )


def test_match_criteria_all_must_hold() -> None:
    match = Match(groups=("sales",), recipient_domains=("example.com",), subject_prefixes=("[Ex",))
    doc = facts(group="sales", subject="[exposé] Villa")
    assert match.matches(doc, "p@EXAMPLE.com")
    assert not match.matches(doc, "p@example.org")
    assert not match.matches(facts(group="other", subject="[exposé]"), "p@example.com")


def test_bad_configuration_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="unique"):
        PolicyConfig(rules=(ConfiguredRule("a", Match()), ConfiguredRule("a", Match())))
    with pytest.raises(ValueError, match="unknown settings colour"):
        PolicyConfig(groups={"g": {"colour": "red"}})
    with pytest.raises(ValueError, match="unknown settings"):
        Layer("rule x", {"nonsense": 1})
    with pytest.raises(ValueError, match="duplicate"):
        check_chain((*CHAIN, CHAIN[0]))


def test_resolve_without_layers_is_the_defaults() -> None:
    resolved = resolve(Policy(), [])
    assert resolved.policy == Policy()
    assert resolved.source("language") == "default"


sizes = st.integers(min_value=0, max_value=30 * MiB)
types = st.sampled_from(["application/pdf", "image/jpeg", "video/mp4", *KEEP])
part_lists = st.lists(st.tuples(sizes, types), max_size=12)
policies = st.builds(
    Policy,
    link_attachments_over=sizes,
    link_total_over=sizes,
    keep_attached=st.just(frozenset(KEEP)),
)


@given(part_lists, policies)
def test_every_attachment_is_kept_or_linked_and_exempt_types_stay(
    specs: list[tuple[int, str]], policy: Policy
) -> None:
    parts = tuple(attachment(str(i + 2), size, ctype) for i, (size, ctype) in enumerate(specs))
    decision = plan_for_recipient(facts((BODY, *parts)), "p@example.com", PolicyConfig(policy))
    linked = (
        set(decision.action.part_ids) if isinstance(decision.action, LinkAttachments) else set()
    )
    ids = {p.id for p in parts}
    assert linked <= ids
    kept = ids - linked
    assert linked | kept == ids
    for part in parts:
        if part.content_type in KEEP:
            assert part.id in kept
        elif part.size > policy.link_attachments_over:
            assert part.id in linked
    if sum(p.size for p in parts) > policy.link_total_over:
        assert all(p.id in linked for p in parts if p.content_type not in KEEP)


@given(part_lists, st.integers(min_value=0, max_value=30 * MiB))
def test_group_settings_win_over_defaults(specs: list[tuple[int, str]], limit: int) -> None:
    parts = tuple(attachment(str(i + 2), size, ctype) for i, (size, ctype) in enumerate(specs))
    config = PolicyConfig(
        Policy(link_attachments_over=0, link_total_over=0),
        groups={"g": {"link_attachments_over": limit, "link_total_over": 10**12}},
    )
    decision = plan_for_recipient(facts((BODY, *parts), group="g"), "p@example.com", config)
    expected = tuple(p.id for p in parts if p.content_type not in KEEP and p.size > limit)
    if expected:
        assert decision.action == LinkAttachments(expected, 90, "de")
    else:
        assert decision.action == KeepOriginal()


@pytest.mark.parametrize(
    ("subject", "headers", "tag"),
    [
        ("[Exposé] Villa am See", (), "[Exposé]"),
        ("  [EXPOSÉ] Villa", (), "[Exposé]"),
        ("[s-exposé] Stadthaus", (), "[S-Exposé]"),
        ("[Offer] Flat", (), "[Offer]"),
        ("Villa", (("x-sealrelay-action", "Registered-Letter"),), None),
    ],
)
def test_offers_become_registered_letters(
    subject: str, headers: tuple[tuple[str, str], ...], tag: str | None
) -> None:
    config = PolicyConfig(Policy(internal_domains=frozenset({"broker.example"})))
    doc = facts(
        (BODY, attachment("2", 3 * MiB)),
        recipients=("p@example.com", "ben@broker.example"),
        subject=subject,
        headers=headers,
    )
    decisions = plan(doc, config).per_recipient
    assert decisions["ben@broker.example"].action == KeepOriginal("internal recipient")
    letter = decisions["p@example.com"]
    assert letter.rule == "registered-letter"
    assert letter.action == RegisteredLetter("de", 14, "default", tag, ("2",), 90)


def test_plain_mail_and_other_actions_are_no_letter() -> None:
    doc = facts((BODY,), subject="Re: [Exposé] question", headers=(("x-sealrelay-action", "x"),))
    assert plan(doc).per_recipient["p@example.com"].action == KeepOriginal()


def test_a_rule_can_make_any_matching_mail_a_letter_and_signed_mail_keeps_parts() -> None:
    config = PolicyConfig(
        rules=(
            ConfiguredRule(
                "expose-pdf", Match(filenames=("expose*",)), {"registered_letter": True}
            ),
        )
    )
    doc = facts((BODY, attachment("2", 3 * MiB, name="Exposé.pdf")), subject="Villa")
    assert not isinstance(plan(doc, config).per_recipient["p@example.com"].action, RegisteredLetter)
    doc = facts((BODY, attachment("2", 3 * MiB, name="Expose-Villa.pdf")), subject="Villa")
    action = plan(doc, config).per_recipient["p@example.com"].action
    assert isinstance(action, RegisteredLetter) and action.link_parts == ("2",)
    signed = facts((BODY, attachment("2", 3 * MiB)), subject="[Offer] x", signed=True)
    action = plan(signed).per_recipient["p@example.com"].action
    assert isinstance(action, RegisteredLetter) and action.link_parts == ()


def test_the_example_rule_videos_always_linked_links_the_videos_only() -> None:
    """The shipped example rule says what it does: a video is linked whatever its size, and
    the small PDF beside it stays attached."""
    from pathlib import Path

    from gateway.config import load_settings

    example = Path(__file__).parents[2] / "examples" / "sealrelay.toml"
    config = load_settings(example, environ={}).policy_config()
    parts = (
        BODY,
        attachment("2", 3 * 1024 * 1024 // 2, "video/mp4", "Rundgang.MP4"),
        attachment("3", 200_000, "application/pdf", "Grundriss.pdf"),
        attachment("4", 90_000, "video/quicktime", "clip.mov"),
        attachment("5", 50_000, "image/jpeg", "Ansicht.jpg"),
    )
    decision = plan(facts(parts), config).per_recipient["p@example.com"]
    assert decision.action == LinkAttachments(("2", "4"), 90, "de")
    assert config.policy_for(facts(parts), "p@example.com").source("always_link") == (
        "rule videos-always-linked"
    )


def test_always_link_matches_types_and_file_names_but_keep_attached_wins() -> None:
    policy = Policy(always_link=frozenset({"video/*", "*.pano"}))
    parts = (
        BODY,
        attachment("2", 10, "application/octet-stream", "tour.PANO"),
        PartFacts("3", "video/webm", None, 10, True),
        attachment("4", 10, "text/calendar", "video.pano"),
        attachment("5", 10),
    )
    action = plan(facts(parts), PolicyConfig(defaults=policy)).per_recipient["p@example.com"]
    assert action.action == LinkAttachments(("2", "3"), 90, "de")
