"""The admin service: the mappings REST API and the Project Mappings page (filled by the mappings issue).

For now it serves health and metrics so the stack has every service of the card running.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from shared.settings import Settings, get_settings


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None) -> Starlette:
    app = Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics_endpoint)])
    app.state.settings = settings or get_settings()
    return app
