"""docker-compose.yml and the deploy/ configs agree with the code (no Kafka, Postgres or Docker engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "deploy" / "prometheus.yml"
GRAFANA_DATASOURCE_FILE = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
KAFKA_SCRIPT = REPO / "scripts" / "kafka.sh"

ENV_PREFIX = "BLAMETRAIL_"
# Long-running services built from the Dockerfile, with the port their /metrics is served on.
APP_SERVICES: dict[str, int] = {"ingest": 8000, "admin": 8001, "router": 9101, "writer": 9102}
HTTP_SERVICES = ("ingest", "admin")
ONE_SHOT = "migrate"
INFRA_SERVICES = ("kafka", "postgres", "prometheus", "grafana")
PUBLISHED_PORTS: dict[str, int] = {"ingest": 8000, "admin": 8001, "prometheus": 9090, "grafana": 3000}


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.relative_to(REPO)} is not a YAML mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services mapping"
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two compose forms (mapping or KEY=VALUE list) it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = [str(item).partition("=") for item in env]
        return {key: value for key, _, value in pairs}
    assert isinstance(env, dict)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _published_ports(service: dict[str, Any]) -> set[int]:
    published: set[int] = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            published.add(int(port["published"]))
        else:
            # "HOST:CONTAINER", "IP:HOST:CONTAINER" or "CONTAINER" (optionally with /tcp)
            parts = str(port).split("/")[0].split(":")
            published.add(int(parts[-2] if len(parts) > 1 else parts[-1]))
    return published


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``{dependency: condition}``; the short list form means ``service_started``."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(map(str, deps), "service_started")
    assert isinstance(deps, dict)
    return {str(name): str((spec or {}).get("condition", "service_started")) for name, spec in deps.items()}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command") or ""
    return " ".join(map(str, command)) if isinstance(command, list) else str(command)


def _blametrail_env(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {
        name: {key: value for key, value in _environment(svc).items() if key.startswith(ENV_PREFIX)}
        for name, svc in services.items()
    }


def _kafka_version_default() -> str:
    match = re.search(r"\$\{BLAMETRAIL_KAFKA_VERSION:-([^}]+)\}", KAFKA_SCRIPT.read_text(encoding="utf-8"))
    assert match, "scripts/kafka.sh has no ${BLAMETRAIL_KAFKA_VERSION:-X} default"
    return match.group(1)


def _scrape_targets() -> set[str]:
    config = _load_yaml(PROMETHEUS_FILE)
    targets: set[str] = set()
    for job in config.get("scrape_configs") or []:
        assert job.get("metrics_path", "/metrics") == "/metrics", f"job {job.get('job_name')} scrapes another path"
        for static in job.get("static_configs") or []:
            targets.update(map(str, static.get("targets") or []))
    return targets


# --- structure ---------------------------------------------------------------------------------


def test_compose_parses_with_the_expected_services(services: dict[str, dict[str, Any]]) -> None:
    expected = {*APP_SERVICES, ONE_SHOT, *INFRA_SERVICES}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"


def test_app_services_are_built_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    assert (REPO / "Dockerfile").is_file()
    for name in (*APP_SERVICES, ONE_SHOT):
        build = services[name].get("build")
        assert build is not None, f"{name} is not built from the Dockerfile"
        if isinstance(build, dict):
            assert build.get("context", ".") == "."
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        else:
            assert build == "."


def test_service_commands(services: dict[str, dict[str, Any]]) -> None:
    assert _command(services[ONE_SHOT]) == "sh -c blametrail migrate && blametrail topics create"
    assert str(services[ONE_SHOT].get("restart")) == "no"
    for name in APP_SERVICES:
        command = _command(services[name]).split()
        assert command[:2] == ["blametrail", name], f"{name} runs {command}"
    for name in HTTP_SERVICES:
        # Inside a container a service bound to 127.0.0.1 cannot be reached through the published port.
        assert "--host 0.0.0.0" in _command(services[name]), f"{name} must listen on 0.0.0.0"


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    for name, port in PUBLISHED_PORTS.items():
        assert port in _published_ports(services[name]), f"{name} does not publish {port}"


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("kafka", "postgres", *HTTP_SERVICES):
        healthcheck = services[name].get("healthcheck")
        assert isinstance(healthcheck, dict) and healthcheck.get("test"), f"{name} has no healthcheck"
    assert "kafka-broker-api-versions.sh" in str(services["kafka"]["healthcheck"]["test"])
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    for name in HTTP_SERVICES:
        test = str(services[name]["healthcheck"]["test"])
        assert "/healthz" in test and f":{APP_SERVICES[name]}/" in test, f"{name} healthcheck: {test}"


def test_startup_order(services: dict[str, dict[str, Any]]) -> None:
    assert _depends_on(services[ONE_SHOT]) == {"kafka": "service_healthy", "postgres": "service_healthy"}
    for name in APP_SERVICES:
        deps = _depends_on(services[name])
        assert deps.get(ONE_SHOT) == "service_completed_successfully", f"{name} does not wait for {ONE_SHOT}"


# --- settings ----------------------------------------------------------------------------------


def test_every_blametrail_variable_is_a_settings_field(services: dict[str, dict[str, Any]]) -> None:
    unknown = {
        f"{service}: {key}"
        for service, env in _blametrail_env(services).items()
        for key in env
        if key.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    }
    assert not unknown, f"not fields of shared.settings.Settings: {sorted(unknown)}"


def test_app_services_set_their_connections(services: dict[str, dict[str, Any]]) -> None:
    for name in (*APP_SERVICES, ONE_SHOT):
        env = _blametrail_env(services)[name]
        for key in ("BLAMETRAIL_KAFKA_BOOTSTRAP", "BLAMETRAIL_DATABASE_URL", "BLAMETRAIL_PUBLIC_URL"):
            assert key in env, f"{name} does not set {key}"


def _settings_of(services: dict[str, dict[str, Any]], name: str) -> Settings:
    """The Settings a service gets from its compose environment alone (validated, the process env is not read)."""
    env = _blametrail_env(services)[name]
    return Settings.model_validate({key.removeprefix(ENV_PREFIX).lower(): value for key, value in env.items()})


def test_blametrail_values_validate(services: dict[str, dict[str, Any]]) -> None:
    for name in services:
        _settings_of(services, name)  # raises pydantic.ValidationError on a value of the wrong type or range


def test_connections_point_at_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    kafka_env = _environment(services["kafka"])
    advertised = {urlsplit(listener).netloc for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    postgres_env = _environment(services["postgres"])
    for name in (*APP_SERVICES, ONE_SHOT):
        settings = _settings_of(services, name)
        for server in settings.kafka_bootstrap.split(","):
            assert server in advertised, f"{name}: {server} is not an advertised Kafka listener {advertised}"
        url = urlsplit(settings.database_url)
        assert url.hostname == "postgres" and (url.port or 5432) == 5432, f"{name}: {settings.database_url}"
        assert url.username == postgres_env["POSTGRES_USER"]
        assert url.password == postgres_env["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == postgres_env["POSTGRES_DB"]
        assert settings.kafka_max_message_bytes <= int(kafka_env["KAFKA_MESSAGE_MAX_BYTES"])
        assert settings.topic_replication_factor == 1, "a single-node cluster cannot hold more replicas"
    assert _settings_of(services, "ingest").ingest_port == APP_SERVICES["ingest"]
    assert _settings_of(services, "admin").admin_port == APP_SERVICES["admin"]
    assert _settings_of(services, "router").router_metrics_port == APP_SERVICES["router"]
    assert _settings_of(services, "writer").writer_metrics_port == APP_SERVICES["writer"]


# --- Kafka -------------------------------------------------------------------------------------


def test_kafka_image_matches_the_local_script() -> None:
    services = _load_yaml(COMPOSE_FILE)["services"]
    image = str(services["kafka"]["image"])
    repository, _, tag = image.partition(":")
    assert repository == "apache/kafka"
    assert tag == _kafka_version_default(), "docker-compose.yml and scripts/kafka.sh run different Kafka versions"


def test_kafka_is_a_single_kraft_node(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from `blametrail topics create`"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= Settings.model_fields["kafka_max_message_bytes"].default


# --- observability -----------------------------------------------------------------------------


def test_prometheus_scrapes_every_app_service(services: dict[str, dict[str, Any]]) -> None:
    targets = _scrape_targets()
    for name, port in APP_SERVICES.items():
        assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port} ({sorted(targets)})"
    volumes = " ".join(map(str, services["prometheus"].get("volumes") or []))
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in volumes


def test_grafana_has_the_prometheus_datasource(services: dict[str, dict[str, Any]]) -> None:
    datasources = _load_yaml(GRAFANA_DATASOURCE_FILE).get("datasources") or []
    prometheus = [ds for ds in datasources if ds.get("type") == "prometheus"]
    assert prometheus, "no Prometheus datasource is provisioned"
    prometheus_port = next(iter(_published_ports(services["prometheus"])))
    assert prometheus[0]["url"] == f"http://prometheus:{prometheus_port}"
    volumes = " ".join(map(str, services["grafana"].get("volumes") or []))
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in volumes


# --- the real parser ---------------------------------------------------------------------------


def _compose_config(compose_file: Path) -> subprocess.CompletedProcess[str]:
    """``docker-compose config -q`` on ``compose_file``: Debian's docker-compose, installed by scripts/test.sh.

    Missing, it skips on a developer's machine and fails in CI (``CI`` set), where the check must run."""
    binary = shutil.which("docker-compose")
    if binary is None:
        missing = (
            "the docker-compose binary is not installed (Debian package docker-compose; scripts/test.sh installs it)"
        )
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return subprocess.run(
        [binary, "-f", str(compose_file), "config", "-q"],
        cwd=compose_file.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_docker_compose_config_is_valid() -> None:
    result = _compose_config(COMPOSE_FILE)
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize(
    ("valid", "broken", "complaint"),
    [
        ("condition: service_healthy", "condition: service_happy", "service_happy"),
        ("    ports:\n", "    portz:\n", "portz"),
    ],
)
def test_docker_compose_config_rejects_a_broken_copy(tmp_path: Path, valid: str, broken: str, complaint: str) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert valid in text
    copy = tmp_path / COMPOSE_FILE.name
    copy.write_text(text.replace(valid, broken), encoding="utf-8")
    result = _compose_config(copy)
    assert result.returncode != 0 and complaint in result.stdout + result.stderr, result
