"""Link scanners or people: the facts of one request to a link's page, judged.

Mail security gateways (Microsoft Defender Safe Links, Proofpoint URL Defense, Mimecast, Barracuda,
Google's scanners) fetch every link of a mail before the person does, usually within seconds of
delivery and from their data centres. Counting those fetches would make every "first download" a
scanner's. The rules, in order, each adding its reason:

1. HEAD is always automated: a browser a person uses asks with GET.
2. A user agent that names a scanner, a bot or an HTTP library (or names nothing) is automated.
3. An address in a data-centre or scanner range, within `window_seconds` of delivery, carrying no
   cookie, is automated. The window keeps a person who opens the link later through a VPN that
   exits in a data centre a person.

The shipped networks are a heuristic, not a register: a few published ranges per provider,
summarised (sources: Microsoft's "Office 365 URLs and IP address ranges" for Exchange Online
Protection, Google's published crawler ranges, the gateway vendors' documented egress ranges, the
AWS and Azure range feeds for a few large blocks). They age; `[scanners]` in the configuration
adds networks and user-agent patterns and can switch the shipped networks off.

Pure: no clock, no I/O. The caller passes the seconds since delivery.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# (provider, network): small and summarised on purpose, see the module's docstring.
SHIPPED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("microsoft", "40.92.0.0/15"),
    ("microsoft", "40.107.0.0/16"),
    ("microsoft", "52.100.0.0/14"),
    ("microsoft", "104.47.0.0/17"),
    ("microsoft", "2a01:111:f400::/48"),
    ("google", "66.249.64.0/19"),
    ("google", "66.102.0.0/20"),
    ("google", "74.125.0.0/16"),
    ("google", "209.85.128.0/17"),
    ("proofpoint", "148.163.128.0/19"),
    ("proofpoint", "67.231.144.0/20"),
    ("proofpoint", "185.132.180.0/22"),
    ("mimecast", "205.139.110.0/24"),
    ("mimecast", "207.211.30.0/24"),
    ("mimecast", "216.205.24.0/24"),
    ("mimecast", "91.220.42.0/24"),
    ("barracuda", "64.235.144.0/20"),
    ("barracuda", "209.222.80.0/21"),
    ("aws", "3.0.0.0/9"),
    ("aws", "18.128.0.0/9"),
    ("aws", "54.64.0.0/11"),
    ("azure", "20.33.0.0/16"),
    ("azure", "20.40.0.0/13"),
    ("azure", "40.64.0.0/13"),
)

# The shipped networks' providers as they write their names, for pages that name them.
PROVIDER_NAMES: dict[str, str] = {
    "microsoft": "Microsoft",
    "google": "Google",
    "proofpoint": "Proofpoint",
    "mimecast": "Mimecast",
    "barracuda": "Barracuda",
    "aws": "AWS",
    "azure": "Azure",
}

# Case-insensitive regular expressions of user agents that are never a person's browser.
SHIPPED_USER_AGENTS: tuple[str, ...] = (
    r"bot\b",
    r"crawl",
    r"spider",
    r"scan",
    r"preview",
    r"safelinks|safe ?links",
    r"proofpoint|urldefense",
    r"mimecast",
    r"barracuda",
    r"\bms-office\b|microsoft office|outlook-(?:ios|android)",
    r"google-safety|googleimageproxy|appengine-google",
    r"symantec|trend ?micro|forcepoint|sophos|cisco|fortinet|zscaler",
    r"headlesschrome|phantomjs",
    r"python-requests|python-urllib|aiohttp|httpx|curl/|wget/|go-http-client|java/|okhttp"
    r"|libwww|apache-httpclient|node-fetch|axios",
    r"facebookexternalhit|slack|whatsapp|telegram|discord|skypeuripreview",
)


@dataclass(frozen=True)
class VisitFacts:
    """One request to a link's page or file, as the web saw it."""

    method: str
    user_agent: str
    has_cookie: bool
    ip: str
    seconds_since_delivery: float


@dataclass(frozen=True)
class Reason:
    """One reason a visit looks automated. Its text (`str`) is what the journal keeps, in
    English for the API and webhooks; `read` takes the text back, so that a page can say
    the reason in its reader's language, for events journaled before this class too."""

    kind: Literal["head", "no_user_agent", "user_agent", "network"]
    detail: str = ""  # the user-agent pattern matched, or the network's provider
    seconds: int = 0  # since delivery, for "network"

    def __str__(self) -> str:
        if self.kind == "head":
            return "HEAD request"
        if self.kind == "no_user_agent":
            return "no user agent"
        if self.kind == "user_agent":
            return f"scanner user agent ({self.detail})"
        return f"{self.detail} address, no cookie, {self.seconds} s after delivery"

    @classmethod
    def read(cls, text: str) -> Reason | None:
        """The reason whose text this is; None for any other text."""
        if text == "HEAD request":
            return cls("head")
        if text == "no user agent":
            return cls("no_user_agent")
        if found := _USER_AGENT_REASON.fullmatch(text):
            return cls("user_agent", found["pattern"])
        if found := _NETWORK_REASON.fullmatch(text):
            return cls("network", found["provider"], int(found["seconds"]))
        return None


_USER_AGENT_REASON = re.compile(r"scanner user agent \((?P<pattern>.*)\)", re.DOTALL)
_NETWORK_REASON = re.compile(
    r"(?P<provider>\S+) address, no cookie, (?P<seconds>\d+) s after delivery"
)


@dataclass(frozen=True)
class Verdict:
    automated: bool
    reasons: tuple[str, ...] = ()  # each a Reason's text


@dataclass(frozen=True)
class ScannerRules:
    """What counts as a scanner; the defaults ship, `[scanners]` adds to them."""

    window_seconds: float = 120.0
    user_agents: tuple[str, ...] = SHIPPED_USER_AGENTS
    networks: tuple[tuple[str, str], ...] = SHIPPED_NETWORKS

    @classmethod
    def configured(
        cls,
        *,
        window_seconds: float,
        extra_user_agents: Iterable[str] = (),
        extra_networks: Iterable[str] = (),
        shipped_networks: bool = True,
    ) -> ScannerRules:
        networks = SHIPPED_NETWORKS if shipped_networks else ()
        return cls(
            window_seconds=window_seconds,
            user_agents=(*SHIPPED_USER_AGENTS, *extra_user_agents),
            networks=(*networks, *(("configured", n) for n in extra_networks)),
        )

    @cached_property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(p, re.IGNORECASE) for p in self.user_agents)

    @cached_property
    def parsed_networks(self) -> tuple[tuple[str, Network], ...]:
        return tuple((name, ipaddress.ip_network(net, strict=False)) for name, net in self.networks)

    def network_of(self, ip: str) -> str | None:
        """The provider whose range holds `ip`; None for any other or no address."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for name, network in self.parsed_networks:
            if address.version == network.version and address in network:
                return name
        return None


def classify(facts: VisitFacts, rules: ScannerRules) -> Verdict:
    """Automated or a person, with every reason that applied (empty for a person)."""
    reasons: list[Reason] = []
    if facts.method.upper() == "HEAD":
        reasons.append(Reason("head"))
    agent = facts.user_agent.strip()
    if not agent:
        reasons.append(Reason("no_user_agent"))
    else:
        matched = next((p for p in rules.patterns if p.search(agent)), None)
        if matched is not None:
            reasons.append(Reason("user_agent", matched.pattern))
    network = rules.network_of(facts.ip)
    if (
        network is not None
        and not facts.has_cookie
        and 0 <= facts.seconds_since_delivery <= rules.window_seconds
    ):
        reasons.append(Reason("network", network, int(facts.seconds_since_delivery)))
    return Verdict(bool(reasons), tuple(str(reason) for reason in reasons))
