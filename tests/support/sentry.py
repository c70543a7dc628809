"""Sentry bodies for tests, built from the team's corpus of real payloads."""

from __future__ import annotations

import json
import os
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


def issue_body(
    issue_id: str, *, project: str | None = None, action: str = "created", count: int | None = None
) -> bytes:
    """A real ``issue.created`` body for ``issue_id``, with another project slug, action or event
    count when given (a different count gives different bytes, so a distinct delivery id)."""
    body = payload("issue.created")
    body["action"] = action
    body["data"]["issue"]["id"] = issue_id
    if project is not None:
        body["data"]["issue"]["project"]["slug"] = project
    if count is not None:
        body["data"]["issue"]["count"] = str(count)
    return json.dumps(body, separators=(",", ":")).encode()
