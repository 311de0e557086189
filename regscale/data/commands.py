"""CLI verbs of regscale.data: `register` adds their sub-parsers; handlers import lazily."""

from __future__ import annotations

import argparse


def register(verbs: argparse._SubParsersAction) -> None:
    """Add this area's verbs to the `regscale` parser."""
