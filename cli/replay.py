"""``blametrail replay``: republish a window of a topic with today's mappings, and ``replay reset-offsets``.

Logic in the ``replay`` package; here the arguments, the output (a summary table, or one JSON
object with ``--json``), Ctrl-C and the exit codes: 1 for bad input (one line on standard error),
2 for usage errors (argparse), 130 for a replay stopped by Ctrl-C (after its summary).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from datetime import timedelta
from typing import Any

from cli import CliError
from shared.events import Reason, rfc3339, utc_now
from shared.logs import setup_logging
from shared.settings import Settings

USAGE_EPILOG = """times: RFC 3339 (2026-11-01T12:00:00Z; UTC when no zone is given) or an age: 90m, 24h, 7d.
examples:
  blametrail replay --topic raw --from 24h --org acme --dry-run
  blametrail replay --topic ignored --from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z --reason unmapped
  blametrail replay --topic dlq --from 7d --rate 100
  blametrail replay reset-offsets --group writer --to-datetime 2026-11-01T00:00:00Z [--execute]"""


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _options(args: argparse.Namespace) -> Any:
    from replay.run import TOPIC_KINDS, Options
    from replay.selection import Filters
    from replay.window import parse_time

    if args.topic not in TOPIC_KINDS:
        raise CliError(f"unknown topic {args.topic!r}: choose {', '.join(TOPIC_KINDS)}")
    if args.reason is not None:
        if args.topic != "ignored":
            raise CliError("--reason applies to --topic ignored only")
        if args.reason not in set(Reason):
            raise CliError(f"unknown reason {args.reason!r}: choose {', '.join(Reason)}")
    now = utc_now()
    second = now.replace(microsecond=0)  # ages count from a whole second; the default end covers now
    start = parse_time(args.start, second)
    end = parse_time(args.end, second) if args.end else second + timedelta(seconds=1 if now.microsecond else 0)
    if start > end:
        raise CliError(f"--from ({rfc3339(start)}) is after --to ({rfc3339(end)})")
    filters = Filters(org=args.org, project=args.project, reason=args.reason)
    return Options(args.topic, start, end, filters, args.limit, args.rate, args.dry_run)


def _replay(parser: argparse.ArgumentParser) -> Any:
    def command(args: argparse.Namespace, settings: Settings) -> None:
        if args.topic is None or args.start is None:
            parser.error("--topic and --from are required (or: replay reset-offsets ...)")
        from aiokafka.errors import KafkaError

        from replay import ReplayError
        from replay.run import run_replay

        setup_logging(args.log_level, service="replay", fmt=settings.log_format)
        try:
            options = _options(args)
            summary = asyncio.run(_until_interrupted(lambda stop: run_replay(settings, options, stop)))
        except ReplayError as exc:
            raise CliError(str(exc)) from exc
        except KafkaError as exc:
            raise CliError(f"Kafka: {exc!r}") from exc
        data = summary.as_json()
        print(json.dumps(data, indent=2) if args.json else _summary_text(data))
        if summary.interrupted:
            raise SystemExit(130)

    return command


async def _until_interrupted(main: Any) -> Any:
    """``main(stop)``, where ``stop`` is set by Ctrl-C (SIGINT) or SIGTERM; a second one is not caught
    (stopping cleanly waits for the broker's acknowledgements, which a dead broker never gives)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def first() -> None:
        stop.set()
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, first)
    return await main(stop)


def _summary_text(data: dict[str, Any]) -> str:
    mode = "dry run, nothing republished" if data["dry_run"] else "republished"
    stopped = " (interrupted by Ctrl-C)" if data["interrupted"] else ""
    lines = [
        f"replay {data['replay_id']}: {data['source_topic']} {data['from']} → {data['to']} ({mode}){stopped}",
        f"scanned {data['scanned']}, selected {data['selected']}, republished {data['republished']}"
        + (f", skipped {data['skipped']} (dead letters of no topic of ours)" if data["skipped"] else "")
        + f" in {data['elapsed_seconds']:.1f}s",
    ]
    if data["diff"] is not None:
        lines += ["", "routing diff (then: audit record; now: today's mappings; a routed delivery never moves):"]
        lines += _table(
            ["PROJECT", "WOULD ROUTE (was ignored/failed)", "STAYS", "WILL NOT MOVE", "NOT RECORDED"],
            [
                [
                    f"{row['org']}/{row['project'] or '(none)'}",
                    ", ".join(f"{n} → {name}" for name, n in row["would_route"].items()) or "0",
                    str(row["stays"]),
                    str(row["will_not_move"]),
                    str(row["not_recorded"]),
                ]
                for row in data["diff"]
            ],
        )
    elif data["selected"]:
        lines += ["", *_table(["PROJECT", "SELECTED"], [[k, str(n)] for k, n in data["by_project"].items()])]
        if data["by_reason"]:
            lines += ["", *_table(["REASON", "SELECTED"], [[k, str(n)] for k, n in data["by_reason"].items()])]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]


def reset_offsets(args: argparse.Namespace, settings: Settings) -> None:
    from replay import ReplayError
    from replay.offsets import reset_offsets
    from replay.window import parse_time

    setup_logging(args.log_level, service="replay", fmt=settings.log_format)
    try:
        at = parse_time(args.to_datetime, utc_now().replace(microsecond=0))
        plan = asyncio.run(reset_offsets(settings, args.group, at, execute=args.execute))
    except ReplayError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(plan.as_json(), indent=2))
        return
    rows = [[m.topic, str(m.partition), "-" if m.current is None else str(m.current), str(m.new)] for m in plan.moves]
    print(f"group {plan.group} → {rfc3339(at)}")
    print("\n".join(_table(["TOPIC", "PARTITION", "CURRENT", "NEW"], rows)))
    if plan.executed:
        print(f"committed the new offsets for group {plan.group}")
    else:
        print("plan only, nothing changed: run again with --execute to commit these offsets")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="republish a window of a topic with today's mappings (dry run: the routing diff)",
        description="Republish a window of raw, routed, ignored or dlq with a replay id, throttled; "
        "safe while the pipeline runs (its own consumer, no group).",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--topic", metavar="raw|routed|ignored|dlq", help="the topic to read")
    p.add_argument("--from", dest="start", metavar="T", help="the window's start (record timestamps)")
    p.add_argument("--to", dest="end", metavar="T", help="the window's end (default: now)")
    p.add_argument("--org", help="only records of this org (the org header)")
    p.add_argument("--project", help="only records naming this Sentry project slug")
    p.add_argument("--reason", help="only ignored events of this reason (--topic ignored)")
    p.add_argument("--limit", type=_positive(int), help="stop after this many records selected")
    p.add_argument("--rate", type=_positive(float), default=500.0, help="records republished a second (500)")
    p.add_argument("--dry-run", action="store_true", help="change nothing; raw: report the routing diff")
    p.add_argument("--json", action="store_true", help="one JSON object on standard output")
    p.set_defaults(func=_replay(p))
    actions = p.add_subparsers(dest="action", metavar="{reset-offsets}")
    r = actions.add_parser(
        "reset-offsets",
        help="move the router's or writer's group to a time (kafka-consumer-groups --to-datetime)",
        description="Print the plan per partition; with --execute commit it. Refused while the group has members.",
    )
    r.add_argument("--group", required=True, choices=["router", "writer"])
    r.add_argument("--to-datetime", required=True, metavar="T", help="RFC 3339, or an age (24h)")
    r.add_argument("--execute", action="store_true", help="commit the new offsets (default: the plan only)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=reset_offsets)
