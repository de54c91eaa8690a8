"""What the benches' command lines share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection

__all__ = ["comma_separated"]


def comma_separated(allowed: Collection[str]) -> Callable[[str], list[str]]:
    """An argparse `type`: names from `allowed`, separated by commas. Any other name is
    refused by the parser as a usage error (exit status 2), naming it."""

    def parse(value: str) -> list[str]:
        chosen = value.split(",")
        if wrong := set(chosen) - set(allowed):
            raise argparse.ArgumentTypeError(f"unknown {', '.join(sorted(wrong))}")
        return chosen

    return parse
