"""Sentry bodies for tests, built from the team's corpus of real payloads."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

PAYLOADS = Path(__file__).resolve().parents[3] / "shared" / "sentry" / "payloads"


def payloads_dir() -> Path:
    """The team's Sentry payload corpus (``../shared/sentry/payloads`` beside the repo)."""
    env = os.environ.get("BLAMETRAIL_PAYLOADS_DIR")
    path = Path(env) if env else PAYLOADS
    if not path.is_dir():
        pytest.fail(f"Sentry payload corpus not found at {path}; set BLAMETRAIL_PAYLOADS_DIR")
    return path


def payload(name: str) -> dict[str, Any]:
    """One corpus file, decoded (``name`` without ``.json``)."""
    body: dict[str, Any] = json.loads((payloads_dir() / f"{name}.json").read_bytes())
    return body


def project_id(slug: str) -> str:
    """A realistic Sentry project id (16 digits) of its own for each slug, stable across runs.

    Sentry projects have distinct numeric ids, and the router resolves by id first: test bodies
    that change a project's slug must not keep the corpus's one id for every project.
    """
    return str(4505877300000000 + zlib.crc32(slug.encode()) % 10_000_000)


def event_url(org: str, project: str, event_id: str) -> str:
    """``error``/``event_alert`` ``url``: the only place those payloads carry the project slug."""
    return f"https://sentry.io/api/0/projects/{org}/{project}/events/{event_id}/"


def issue_body(
    issue_id: str,
    *,
    project: str | None = None,
    action: str = "created",
    count: int | None = None,
    sentry_project_id: str | None = None,
) -> bytes:
    """A real ``issue.*`` body for ``issue_id``, with another project slug (and its own project id,
    or ``sentry_project_id``), action or event count when given (a different count gives different
    bytes, so a distinct delivery id)."""
    body = payload("issue.created")
    body["action"] = action
    body["data"]["issue"]["id"] = issue_id
    if project is not None:
        body["data"]["issue"]["project"]["slug"] = project
        body["data"]["issue"]["project"]["id"] = sentry_project_id or project_id(project)
    if count is not None:
        body["data"]["issue"]["count"] = str(count)
    return json.dumps(body, separators=(",", ":")).encode()
