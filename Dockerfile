# One image for every BlameTrail service; docker-compose.yml picks the service with the command:
#   blametrail ingest|router|writer|admin|migrate|topics create|org create SLUG
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs (there is no .dockerignore: never COPY the whole checkout,
# it would bring .venv, .run and caches into the build context layer).
COPY pyproject.toml ./
COPY shared ./shared
COPY ingest ./ingest
COPY router ./router
COPY incident_writer ./incident_writer
COPY admin ./admin
COPY cli ./cli
COPY replay ./replay
RUN pip install . \
    && rm -rf /src/build /src/*.egg-info \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin blametrail \
    && mkdir -p /var/tmp/blametrail-spool && chown blametrail:blametrail /var/tmp/blametrail-spool

WORKDIR /app
USER blametrail:blametrail

# ingest, admin, router metrics, writer metrics
EXPOSE 8000 8001 9101 9102

