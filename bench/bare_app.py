"""The ceiling of ingest's HTTP layer: a bare Starlette endpoint that reads the body and answers 200.

Served like ingest (``bench.bare_app:serve``: uvicorn, one worker, ingest's options —
``cli.services.INGEST_UVICORN``), on the same paths, so ``bench.saturation`` can point wrk at both.

    python -m bench.bare_app --port 18080
"""

from __future__ import annotations

import argparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def webhook(request: Request) -> Response:
    await request.body()
    return JSONResponse({"status": "accepted"})


def create_app() -> Starlette:
    return Starlette(routes=[Route("/webhooks/sentry/{org}", webhook, methods=["POST"])])


def serve(host: str, port: int) -> None:
    import uvicorn

    from cli.services import INGEST_UVICORN

    uvicorn.run(
        "bench.bare_app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=1,
        log_level="warning",
        **INGEST_UVICORN,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080)
    args = parser.parse_args()
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
