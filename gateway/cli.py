"""The `proxygate` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proxygate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the gateway")
    parser.parse_args(argv)
    print(
        "proxygate: the gateway arrives in a later release; this one ships the leasing core.",
        file=sys.stderr,
    )
    return 1
