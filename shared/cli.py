"""``blametrail``: run a service, prepare Kafka and Postgres, manage organizations and mappings."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from shared.settings import Settings, get_settings

if TYPE_CHECKING:
    from shared.mappings import MappingView

T = TypeVar("T")


class CliError(Exception):
    pass


def _print(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    if as_json or columns is None:
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    cells = [{c: "" if r.get(c) is None else str(r[c]) for c in columns} for r in rows]
    widths = {c: max([len(c)] + [len(r[c]) for r in cells]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in cells:
        print("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())


def _with_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    from shared.db.session import create_engine, sessionmaker
    from shared.errors import DomainError

    async def run() -> T:
        engine = create_engine(settings, pool_size=1)
        try:
            async with sessionmaker(engine)() as session, session.begin():
                return await work(session)
        except DomainError as exc:
            raise CliError(str(exc)) from exc
        finally:
            await engine.dispose()

    return asyncio.run(run())


# --- services -------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        "ingest.app:create_app",
        factory=True,
        host=args.host or settings.ingest_host,
        port=args.port or settings.ingest_port,
        workers=args.workers or settings.ingest_workers,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=10,
        access_log=False,
        log_level=args.log_level.lower(),
    )


def cmd_admin(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        "admin.app:create_app",
        factory=True,
        host=args.host or settings.admin_host,
        port=args.port or settings.admin_port,
        log_level=args.log_level.lower(),
    )


def cmd_router(args: argparse.Namespace, settings: Settings) -> None:
    from router.consumer import Router
    from shared.logs import setup_logging
    from shared.runtime import run_until_signalled, serve_metrics

    setup_logging(args.log_level)
    serve_metrics(settings.router_metrics_port)
    run_until_signalled(lambda stop: Router(settings).run(stop))


def cmd_writer(args: argparse.Namespace, settings: Settings) -> None:
    from incident_writer.consumer import IncidentWriter
    from shared.logs import setup_logging
    from shared.runtime import run_until_signalled, serve_metrics

    setup_logging(args.log_level)
    serve_metrics(settings.writer_metrics_port)
    run_until_signalled(lambda stop: IncidentWriter(settings).run(stop))


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> None:
    from shared.db.migrate import upgrade

    upgrade(settings)
    print("database is at the latest schema")


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> None:
    from shared.kafka import create_topics
    from shared.topics import Topics

    created = asyncio.run(create_topics(settings, args.partitions))
    for name in Topics.from_settings(settings).all():
        print(f"{name}: {'created' if name in created else 'exists'}")


# --- organizations, services, mappings ------------------------------------------------------


def cmd_org_create(args: argparse.Namespace, settings: Settings) -> None:
    from shared.orgs import create_org

    new = _with_session(settings, lambda s: create_org(s, args.slug, args.name))
    _print(
        {
            "org": new.org,
            "api_token": new.api_token,
            "webhook_url": settings.webhook_url(new.org),
            "client_secret": new.client_secret,
        },
        True,
    )


def cmd_org_rotate(args: argparse.Namespace, settings: Settings) -> None:
    from shared.orgs import rotate_secret

    secret = _with_session(settings, lambda s: rotate_secret(s, args.slug))
    _print({"org": args.slug, "client_secret": secret}, True)


def cmd_org_set_secret(args: argparse.Namespace, settings: Settings) -> None:
    from shared.orgs import rotate_secret

    given = sys.stdin.readline().strip()
    if not given:
        raise CliError("give the Sentry integration's Client Secret on standard input")
    _with_session(settings, lambda s: rotate_secret(s, args.slug, given))
    _print({"org": args.slug, "status": "client secret set; the previous one stays valid until the next change"}, True)


def cmd_org_legacy(args: argparse.Namespace, settings: Settings) -> None:
    from shared.orgs import disable_legacy_plugin, enable_legacy_plugin

    if args.state == "off":
        _with_session(settings, lambda s: disable_legacy_plugin(s, args.slug))
        _print({"org": args.slug, "legacy_plugin": "off"}, True)
        return
    token = _with_session(settings, lambda s: enable_legacy_plugin(s, args.slug))
    url = f"{settings.public_url.rstrip('/')}/webhooks/sentry-legacy/{args.slug}/{token}"
    _print({"org": args.slug, "legacy_plugin": "on", "webhook_url": url}, True)


def cmd_service_create(args: argparse.Namespace, settings: Settings) -> None:
    from shared.mappings import create_service
    from shared.orgs import get_org

    async def work(session: AsyncSession) -> dict[str, Any]:
        org = await get_org(session, args.org)
        service = await create_service(session, org.id, args.name)
        return {"id": service.id, "name": service.name}

    _print(_with_session(settings, work), args.json, ["id", "name"])


def cmd_service_list(args: argparse.Namespace, settings: Settings) -> None:
    from shared.mappings import list_services
    from shared.orgs import get_org

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        org = await get_org(session, args.org)
        return [{"id": s.id, "name": s.name} for s in await list_services(session, org.id)]

    _print(_with_session(settings, work), args.json, ["id", "name"])


def cmd_service_delete(args: argparse.Namespace, settings: Settings) -> None:
    from shared.mappings import delete_service, find_service
    from shared.orgs import get_org

    async def work(session: AsyncSession) -> dict[str, Any]:
        org = await get_org(session, args.org)
        service = await find_service(session, org.id, args.service)
        await delete_service(session, org.id, service.id)
        return {"id": service.id, "name": service.name, "deleted": True}

    _print(_with_session(settings, work), args.json, ["id", "name", "deleted"])


MAPPING_COLUMNS = ["id", "sentry_project_slug", "service_id", "service_name", "active", "last_event_at"]


def _mapping_row(view: MappingView) -> dict[str, Any]:
    return asdict(view)


def cmd_mapping_add(args: argparse.Namespace, settings: Settings) -> None:
    from shared.mappings import add_mapping, find_service
    from shared.orgs import get_org

    async def work(session: AsyncSession) -> dict[str, Any]:
        org = await get_org(session, args.org)
        service = await find_service(session, org.id, args.service)
        return _mapping_row(await add_mapping(session, org.id, args.project, service.id, active=not args.inactive))

    _print(_with_session(settings, work), args.json, MAPPING_COLUMNS)


def cmd_mapping_list(args: argparse.Namespace, settings: Settings) -> None:
    from shared.mappings import list_mappings
    from shared.orgs import get_org

    async def work(session: AsyncSession) -> list[dict[str, Any]]:
        org = await get_org(session, args.org)
        return [_mapping_row(v) for v in await list_mappings(session, org.id)]

    _print(_with_session(settings, work), args.json, MAPPING_COLUMNS)


def cmd_mapping_change(args: argparse.Namespace, settings: Settings) -> None:
    """edit (``--service``), enable, disable and delete: the mapping is named by id or project slug."""
    from shared.mappings import delete_mapping, edit_mapping, find_mapping, find_service
    from shared.orgs import get_org

    async def work(session: AsyncSession) -> dict[str, Any]:
        org = await get_org(session, args.org)
        mapping = await find_mapping(session, org.id, args.mapping)
        if args.action == "delete":
            await delete_mapping(session, org.id, mapping.id)
            return {**_mapping_row(mapping), "deleted": True}
        if args.action == "edit":
            service = await find_service(session, org.id, args.service)
            return _mapping_row(await edit_mapping(session, org.id, mapping.id, service_id=service.id))
        return _mapping_row(await edit_mapping(session, org.id, mapping.id, active=args.action == "enable"))

    columns = MAPPING_COLUMNS + (["deleted"] if args.action == "delete" else [])
    _print(_with_session(settings, work), args.json, columns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blametrail", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func in (("ingest", cmd_ingest), ("admin", cmd_admin)):
        p = sub.add_parser(name, help=f"run the {name} HTTP service")
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        if name == "ingest":
            p.add_argument("--workers", type=int)
        p.set_defaults(func=func)
    sub.add_parser("router", help="run the router consumer").set_defaults(func=cmd_router)
    sub.add_parser("writer", help="run the incident writer consumer").set_defaults(func=cmd_writer)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    topics = sub.add_parser("topics", help="Kafka topics").add_subparsers(dest="action", required=True)
    p = topics.add_parser("create", help="create the four topics if missing")
    p.add_argument("--partitions", type=int)
    p.set_defaults(func=cmd_topics_create)

    org = sub.add_parser("org", help="organizations").add_subparsers(dest="action", required=True)
    p = org.add_parser("create", help="create an org with its client secret and API token (shown once)")
    p.add_argument("slug")
    p.add_argument("--name")
    p.set_defaults(func=cmd_org_create)
    p = org.add_parser("rotate-secret", help="new client secret; the previous stays valid until the next rotation")
    p.add_argument("slug")
    p.set_defaults(func=cmd_org_rotate)
    p = org.add_parser(
        "set-secret", help="use the Client Secret Sentry shows for the integration (read from standard input)"
    )
    p.add_argument("slug")
    p.set_defaults(func=cmd_org_set_secret)
    p = org.add_parser(
        "legacy-plugin", help="accept Sentry's legacy WebHooks plugin (unsigned) on a secret URL, or stop"
    )
    p.add_argument("slug")
    p.add_argument("state", choices=["on", "off"])
    p.set_defaults(func=cmd_org_legacy)

    service = sub.add_parser("service", help="services").add_subparsers(dest="action", required=True)
    p = service.add_parser("create")
    p.add_argument("--org", required=True)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_service_create)
    p = service.add_parser("list")
    p.add_argument("--org", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_service_list)

    p = service.add_parser("delete", help="delete a service no mapping or incident uses")
    p.add_argument("--org", required=True)
    p.add_argument("service", help="service id or name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_service_delete)

    mapping = sub.add_parser("mapping", help="Sentry project mappings").add_subparsers(dest="action", required=True)
    p = mapping.add_parser("add", help="map a Sentry project to a service")
    p.add_argument("--org", required=True)
    p.add_argument("project", help="Sentry project slug")
    p.add_argument("--service", required=True, help="service id or name")
    p.add_argument("--inactive", action="store_true", help="create the mapping disabled")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mapping_add)
    p = mapping.add_parser("list")
    p.add_argument("--org", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mapping_list)
    for action, text in (
        ("edit", "point a mapping at another service (existing incidents stay)"),
        ("enable", "enable a mapping"),
        ("disable", "disable a mapping (its configuration is kept)"),
        ("delete", "delete a mapping"),
    ):
        p = mapping.add_parser(action, help=text)
        p.add_argument("--org", required=True)
        p.add_argument("mapping", help="mapping id or Sentry project slug")
        if action == "edit":
            p.add_argument("--service", required=True, help="service id or name")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_mapping_change)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args, get_settings())
    except CliError as exc:
        print(f"blametrail: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
