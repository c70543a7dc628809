"""The ``blametrail`` command line against the real database: tables, --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import uuid
from typing import Any

import pytest

from shared.settings import Settings
from tests.support import blametrail_command, settings_env

pytestmark = pytest.mark.integration


def run(settings: Settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*blametrail_command(), *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def ok(settings: Settings, *args: str) -> Any:
    done = run(settings, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args or args[0] == "org" else done.stdout


def fails(settings: Settings, *args: str) -> str:
    done = run(settings, *args)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blametrail: error: "), done.stderr
    return lines[0]


def test_mapping_lifecycle_through_the_cli(migrated: Settings) -> None:
    org = f"cli-{uuid.uuid4().hex[:8]}"
    created = ok(migrated, "org", "create", org)
    assert created["org"] == org and created["api_token"].startswith("btk_")
    ok(migrated, "service", "create", "--org", org, "Web App")
    ok(migrated, "service", "create", "--org", org, "Payments API")

    added = ok(migrated, "mapping", "add", "--org", org, "frontend", "--service", "Web App", "--json")
    assert (added["sentry_project_slug"], added["service_name"], added["active"]) == ("frontend", "Web App", True)

    table = ok(migrated, "mapping", "list", "--org", org)
    header, row = table.splitlines()
    assert header.split() == [
        "ID", "SENTRY_PROJECT_SLUG", "SERVICE_ID", "SERVICE_NAME", "ACTIVE", "SENTRY_PROJECT_ID", "RENAMED_TO",
        "LAST_EVENT_AT",
    ]  # fmt: skip
    assert "frontend" in row and "Web App" in row and "True" in row

    edited = ok(migrated, "mapping", "edit", "--org", org, "frontend", "--service", "Payments API", "--json")
    assert edited["service_name"] == "Payments API" and edited["id"] == added["id"]
    assert ok(migrated, "mapping", "disable", "--org", org, "frontend", "--json")["active"] is False
    assert ok(migrated, "mapping", "enable", "--org", org, str(added["id"]), "--json")["active"] is True

    # A project renamed in Sentry: the mapping follows it, by slug and Sentry project id.
    renamed = ok(
        migrated, "mapping", "edit", "--org", org, "frontend", "--slug", "web", "--project-id", "4505877312345088",
        "--json",
    )  # fmt: skip
    assert (renamed["sentry_project_slug"], renamed["sentry_project_id"]) == ("web", "4505877312345088")
    assert renamed["renamed_to"] is None and renamed["id"] == added["id"]
    assert "--service, --slug or --project-id" in fails(migrated, "mapping", "edit", "--org", org, "web")
    assert "not Sentry's numeric project id" in fails(
        migrated, "mapping", "edit", "--org", org, "web", "--project-id", "abc"
    )
    ok(migrated, "mapping", "edit", "--org", org, "web", "--slug", "frontend", "--json")

    in_use = fails(migrated, "service", "delete", "--org", org, "Payments API")
    assert "frontend" in in_use
    assert ok(migrated, "mapping", "delete", "--org", org, "frontend", "--json")["deleted"] is True
    assert ok(migrated, "mapping", "list", "--org", org, "--json") == []
    ok(migrated, "service", "delete", "--org", org, "Payments API")
    assert [s["name"] for s in ok(migrated, "service", "list", "--org", org, "--json")] == ["Web App"]


def test_cli_errors_are_one_line_and_non_zero(migrated: Settings) -> None:
    org = f"cli-{uuid.uuid4().hex[:8]}"
    ok(migrated, "org", "create", org)
    ok(migrated, "service", "create", "--org", org, "Web App")
    assert "already exists" in fails(migrated, "org", "create", org)
    assert "does not exist" in fails(migrated, "service", "list", "--org", "no-such-org-here")
    assert "not a Sentry project slug" in fails(
        migrated, "mapping", "add", "--org", org, "Bad Slug", "--service", "Web App"
    )
    assert "does not exist" in fails(migrated, "mapping", "add", "--org", org, "frontend", "--service", "Nope")
    ok(migrated, "mapping", "add", "--org", org, "frontend", "--service", "Web App")
    assert "already mapped" in fails(migrated, "mapping", "add", "--org", org, "frontend", "--service", "Web App")
    assert "no mapping" in fails(migrated, "mapping", "disable", "--org", org, "ghost")


def test_set_secret_reads_standard_input(migrated: Settings) -> None:
    org = f"cli-{uuid.uuid4().hex[:8]}"
    ok(migrated, "org", "create", org)
    done = run(migrated, "org", "set-secret", org, stdin="sentry-client-secret-0123456789abcdef\n")
    assert done.returncode == 0, done.stderr
    assert "sentry-client-secret" not in done.stdout  # never echoed
    empty = run(migrated, "org", "set-secret", org, stdin="")
    assert empty.returncode == 1 and "standard input" in empty.stderr
