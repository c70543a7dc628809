"""Organizations, their services and Sentry project mappings: the commands an operator runs.

Each command is one database transaction; a rule it breaks (``shared.errors.DomainError``) is a
one-line error. ``--json`` prints JSON instead of a table; ``org`` commands always print JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from cli import CliError
from shared.db.models import Service
from shared.db.session import create_engine, sessionmaker
from shared.errors import DomainError
from shared.mappings import (
    add_mapping,
    create_service,
    delete_mapping,
    delete_service,
    edit_mapping,
    find_mapping,
    find_service,
    list_mappings,
    list_services,
)
from shared.orgs import (
    create_org,
    disable_legacy_plugin,
    enable_legacy_plugin,
    get_org,
    reencrypt_secrets,
    rotate_secret,
)
from shared.secrets import SecretError, key_ring
from shared.settings import Settings

T = TypeVar("T")
SERVICE_COLUMNS = ["id", "name"]
MAPPING_COLUMNS = [
    "id",
    "sentry_project_slug",
    "service_id",
    "service_name",
    "active",
    "sentry_project_id",
    "renamed_to",
    "last_event_at",
]


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
    async def run() -> T:
        engine = create_engine(settings, pool_size=1)
        try:
            async with sessionmaker(engine)() as session, session.begin():
                return await work(session)
        except DomainError as exc:
            raise CliError(str(exc)) from exc
        except SecretError as exc:  # the transaction is rolled back
            raise CliError(f"{exc}; nothing was changed") from exc
        finally:
            await engine.dispose()

    return asyncio.run(run())


Command = Callable[[argparse.Namespace, Settings], None]
OrgWork = Callable[[AsyncSession, int, argparse.Namespace], Awaitable[Any]]  # (session, org id, args) -> result


def in_org(work: OrgWork, columns: list[str]) -> Command:
    """The command that runs ``work(session, org_id, args)`` for the org of ``--org`` and prints its result."""

    def command(args: argparse.Namespace, settings: Settings) -> None:
        async def run(session: AsyncSession) -> Any:
            return await work(session, (await get_org(session, args.org)).id, args)

        _print(_with_session(settings, run), args.json, columns)

    return command


# --- organizations ----------------------------------------------------------------------------


def org_create(args: argparse.Namespace, settings: Settings) -> None:
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


def org_rotate_secret(args: argparse.Namespace, settings: Settings) -> None:
    secret = _with_session(settings, lambda s: rotate_secret(s, args.slug))
    _print({"org": args.slug, "client_secret": secret}, True)


def org_set_secret(args: argparse.Namespace, settings: Settings) -> None:
    given = sys.stdin.readline().strip()
    if not given:
        raise CliError("give the Sentry integration's Client Secret on standard input")
    _with_session(settings, lambda s: rotate_secret(s, args.slug, given))
    _print({"org": args.slug, "status": "client secret set; the previous one stays valid until the next change"}, True)


def org_reencrypt_secrets(args: argparse.Namespace, settings: Settings) -> None:
    """After a change of BLAMETRAIL_SECRET_KEYS: every stored client secret under the newest key."""
    try:
        keys = key_ring(settings)
    except SecretError as exc:
        raise CliError(f"{exc}; nothing was changed") from exc
    changed = _with_session(settings, lambda s: reencrypt_secrets(s, keys))
    _print({"reencrypted": changed}, True)


def org_legacy_plugin(args: argparse.Namespace, settings: Settings) -> None:
    if args.state == "off":
        _with_session(settings, lambda s: disable_legacy_plugin(s, args.slug))
        _print({"org": args.slug, "legacy_plugin": "off"}, True)
        return
    token = _with_session(settings, lambda s: enable_legacy_plugin(s, args.slug))
    url = f"{settings.public_url.rstrip('/')}/webhooks/sentry-legacy/{args.slug}/{token}"
    _print({"org": args.slug, "legacy_plugin": "on", "webhook_url": url}, True)


# --- services ---------------------------------------------------------------------------------


def _service_row(service: Service) -> dict[str, Any]:
    return {"id": service.id, "name": service.name}


async def service_create(session: AsyncSession, org_id: int, args: argparse.Namespace) -> dict[str, Any]:
    return _service_row(await create_service(session, org_id, args.name))


async def service_list(session: AsyncSession, org_id: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    return [_service_row(s) for s in await list_services(session, org_id)]


async def service_delete(session: AsyncSession, org_id: int, args: argparse.Namespace) -> dict[str, Any]:
    service = await find_service(session, org_id, args.service)
    await delete_service(session, org_id, service.id)
    return {**_service_row(service), "deleted": True}


# --- mappings ---------------------------------------------------------------------------------


async def mapping_add(session: AsyncSession, org_id: int, args: argparse.Namespace) -> dict[str, Any]:
    service = await find_service(session, org_id, args.service)
    view = await add_mapping(
        session, org_id, args.project, service.id, active=not args.inactive, sentry_project_id=args.project_id
    )
    return view.model_dump()


async def mapping_list(session: AsyncSession, org_id: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    return [view.model_dump() for view in await list_mappings(session, org_id)]


async def mapping_change(session: AsyncSession, org_id: int, args: argparse.Namespace) -> dict[str, Any]:
    """edit (``--service``), enable, disable and delete: the mapping is named by id or project slug."""
    mapping = await find_mapping(session, org_id, args.mapping)
    if args.action == "delete":
        await delete_mapping(session, org_id, mapping.id)
        return {**mapping.model_dump(), "deleted": True}
    if args.action == "edit":
        if args.service is None and args.slug is None and args.project_id is None:
            raise CliError("mapping edit: give --service, --slug or --project-id")
        service_id = None if args.service is None else (await find_service(session, org_id, args.service)).id
        mapping = await edit_mapping(
            session,
            org_id,
            mapping.id,
            service_id=service_id,
            sentry_project_slug=args.slug,
            sentry_project_id=args.project_id,
        )
    else:
        mapping = await edit_mapping(session, org_id, mapping.id, active=args.action == "enable")
    return mapping.model_dump()


# --- the argument tree ------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    org = sub.add_parser("org", help="organizations").add_subparsers(dest="action", required=True)
    p = org.add_parser("create", help="create an org with its client secret and API token (shown once)")
    p.add_argument("slug")
    p.add_argument("--name")
    p.set_defaults(func=org_create)
    p = org.add_parser("rotate-secret", help="new client secret; the previous stays valid until the next rotation")
    p.add_argument("slug")
    p.set_defaults(func=org_rotate_secret)
    p = org.add_parser(
        "set-secret", help="use the Client Secret Sentry shows for the integration (read from standard input)"
    )
    p.add_argument("slug")
    p.set_defaults(func=org_set_secret)
    p = org.add_parser(
        "reencrypt-secrets",
        help="after a change of BLAMETRAIL_SECRET_KEYS: re-encrypt every org's client secrets with the newest key",
    )
    p.set_defaults(func=org_reencrypt_secrets)
    p = org.add_parser(
        "legacy-plugin", help="accept Sentry's legacy WebHooks plugin (unsigned) on a secret URL, or stop"
    )
    p.add_argument("slug")
    p.add_argument("state", choices=["on", "off"])
    p.set_defaults(func=org_legacy_plugin)

    service = sub.add_parser("service", help="services").add_subparsers(dest="action", required=True)
    _org_command(service, "create", service_create, SERVICE_COLUMNS, ("name", {}))
    _org_command(service, "list", service_list, SERVICE_COLUMNS)
    _org_command(
        service, "delete", service_delete, [*SERVICE_COLUMNS, "deleted"], ("service", {"help": "service id or name"}),
        help="delete a service no mapping or incident uses",
    )  # fmt: skip

    mapping = sub.add_parser("mapping", help="Sentry project mappings").add_subparsers(dest="action", required=True)
    service_ref = ("--service", {"required": True, "help": "service id or name"})
    project_id = ("--project-id", {"help": "Sentry's numeric project id (optional: learned from the first event)"})
    _org_command(
        mapping, "add", mapping_add, MAPPING_COLUMNS, ("project", {"help": "Sentry project slug"}), service_ref,
        ("--inactive", {"action": "store_true", "help": "create the mapping disabled"}), project_id,
        help="map a Sentry project to a service",
    )  # fmt: skip
    _org_command(mapping, "list", mapping_list, MAPPING_COLUMNS)
    for action, text in (
        ("edit", "point a mapping at another service (existing incidents stay), or follow a renamed project"),
        ("enable", "enable a mapping"),
        ("disable", "disable a mapping (its configuration is kept)"),
        ("delete", "delete a mapping"),
    ):
        columns = [*MAPPING_COLUMNS, "deleted"] if action == "delete" else MAPPING_COLUMNS
        mapping_ref = ("mapping", {"help": "mapping id or Sentry project slug"})
        edit_arguments = (
            ("--service", {"help": "service id or name"}),
            ("--slug", {"help": "the project's new Sentry slug (after a rename in Sentry)"}),
            project_id,
        )
        arguments = (mapping_ref, *edit_arguments) if action == "edit" else (mapping_ref,)
        _org_command(mapping, action, mapping_change, columns, *arguments, help=text)


def _org_command(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    work: OrgWork,
    columns: list[str],
    *arguments: tuple[str, dict[str, Any]],
    help: str | None = None,
) -> None:
    """``NAME --org ORG [arguments] [--json]`` running ``work`` in that org."""
    described: dict[str, Any] = {"help": help} if help else {}  # help=None would still list it in the group
    p = group.add_parser(name, **described)
    p.add_argument("--org", required=True)
    for flag, options in arguments:
        p.add_argument(flag, **options)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=in_org(work, columns))
