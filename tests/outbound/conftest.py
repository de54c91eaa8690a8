"""Fixtures shared by the upstream tests; each module brings its own `sink`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import UpstreamSettings
from gateway.outbound.upstream import SmtpUpstream
from tests.support import Sink


@pytest.fixture
async def upstreams(sink: Sink) -> AsyncIterator[Callable[..., SmtpUpstream]]:
    """Makes smart-host upstreams to the sink; closes them after the test."""
    made: list[SmtpUpstream] = []

    def make(**settings: Any) -> SmtpUpstream:
        values = {"url": f"smtp://127.0.0.1:{sink.port}", "timeout": 5, **settings}
        upstream = SmtpUpstream(UpstreamSettings(**values), "relay.broker.example")
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.close()
