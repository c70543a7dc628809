"""scripts/prometheus.sh: the local stack's Prometheus survives a second start and a SIGKILLed earlier
run, keeps its port across stop and start (a new one when another process took it), scrapes the
ports it is given and loads deploy/alerts.yml."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from tests.scripts.test_scripts import accepts, crash, run, script, squatting
from tests.support.prometheus import require_prometheus

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "alerts.yml"


def test_prometheus_script_twice_after_crash_stop_and_busy_port(tmp_path: Path) -> None:
    require_prometheus()
    ports = {"BLAMETRAIL_INGEST_PORT": "18000", "BLAMETRAIL_ROUTER_METRICS_PORT": "19101"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        first = run("prometheus.sh", "start", tmp_path, BLAMETRAIL_PROMETHEUS_PORT=str(taken), **ports)
        port = int(first["PROMETHEUS_PORT"])
        assert port != taken and accepts(port)
        assert first["PROMETHEUS_URL"] == f"http://127.0.0.1:{port}"
    try:
        config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
        assert config["rule_files"] == [str(ALERTS)]
        targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
        assert targets == {"ingest": ["127.0.0.1:18000"], "router": ["127.0.0.1:19101"]}

        # Again, running: the same server, its config rewritten for the services' new ports.
        again = run("prometheus.sh", "start", tmp_path, BLAMETRAIL_INGEST_PORT="18001", BLAMETRAIL_ADMIN_PORT="18002")
        assert again == first
        config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
        assert {job["job_name"] for job in config["scrape_configs"]} == {"ingest", "admin"}

        crash(int((tmp_path / "prometheus" / "prometheus.pid").read_text()))
        assert run("prometheus.sh", "start", tmp_path) == first, "same port after a crash"
        run("prometheus.sh", "stop", tmp_path)
        assert not accepts(port)
        assert run("prometheus.sh", "start", tmp_path) == first, "same port after a stop"

        run("prometheus.sh", "stop", tmp_path)
        with squatting(port):
            done = script("prometheus.sh", "start", tmp_path)
        moved = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        assert int(moved["PROMETHEUS_PORT"]) != port and f"port {port} is taken" in done.stderr, done.stderr
        assert (tmp_path / "prometheus" / "data").is_dir()
    finally:
        run("prometheus.sh", "stop", tmp_path)
    assert not (tmp_path / "prometheus" / "prometheus.pid").exists()
