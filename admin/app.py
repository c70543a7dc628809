"""The admin service: the mappings REST API (``admin.api``), its OpenAPI document, the Project
Mappings, Deliveries and Incidents web pages (``admin/static``, clients of the API), health and metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from admin.api import PREFIX, api_routes, error_response, internal_error_response, log
from admin.openapi import build_openapi
from shared.db.conninfo import DB_CONNECT_TIMEOUT
from shared.db.session import create_engine, sessionmaker
from shared.settings import Settings, get_settings

STATIC = Path(__file__).with_name("static")


def page(name: str) -> Callable[[Request], Awaitable[Response]]:
    """A web page of ``admin/static``: plain HTML whose script calls the API with the tab's token."""

    async def serve(request: Request) -> Response:
        return FileResponse(STATIC / name)

    return serve


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "not_found", f"no such endpoint: {request.method} {request.url.path}")


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    headers = exc.headers if isinstance(exc, HTTPException) else None  # Allow: the methods that are
    message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(405, "method_not_allowed", message, headers=headers)


async def internal_error(request: Request, exc: Exception) -> Response:
    """Outside the API handlers (which answer their own errors): a JSON 500, logged."""
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error_response()


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    engine = create_engine(settings, connect_timeout=DB_CONNECT_TIMEOUT)
    sessions = sessionmaker(engine)
    document = build_openapi()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    routes: list[BaseRoute] = [
        *api_routes(sessions, settings),
        Route(PREFIX + "/openapi.json", openapi),
        Route("/", page("mappings.html")),
        Route("/integrations/sentry/mappings", page("mappings.html")),
        Route("/integrations/sentry/deliveries", page("deliveries.html")),
        Route("/incidents", page("incidents.html")),
        Route("/incidents/{incident_id}", page("incident.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
    ]
    handlers = {404: not_found, 405: method_not_allowed, Exception: internal_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.settings = settings
    app.state.engine = engine
    return app
