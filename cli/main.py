"""``blametrail``: run a service, prepare Kafka and Postgres, manage organizations and mappings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import CliError, orgs, replay, services
from shared.settings import get_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blametrail", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    services.add_commands(sub)
    orgs.add_commands(sub)
    replay.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args, get_settings())
    except CliError as exc:
        print(f"blametrail: error: {exc}", file=sys.stderr)
        return 1
    return 0
