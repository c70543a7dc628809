"""The alerting rules: valid for Prometheus (promtool), unit-tested rule by rule, and naming only
metrics that the services define."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401 - registers every BlameTrail metric

ROOT = Path(__file__).resolve().parents[2]


def defined_samples() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            names.add(sample.name)
        # Labelled families expose samples only once a child exists: derive the sample names.
        if metric.type == "counter":
            names.add(metric.name + "_total")
        elif metric.type == "histogram":
            names |= {metric.name + "_bucket", metric.name + "_sum", metric.name + "_count"}
        else:
            names.add(metric.name)
    return names


@pytest.mark.parametrize("name", ("alerts", "alerts-optional"))
def test_alert_rules_use_defined_metrics(name: str) -> None:
    rules: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / f"{name}.yml").read_text())
    defined = defined_samples()
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            used |= set(re.findall(r"\b(blametrail_[a-z_]+)", rule["expr"]))
    assert used, "no metric referenced"
    assert used <= defined, f"undefined metrics in alerts: {sorted(used - defined)}"


def test_prometheus_loads_the_rules() -> None:
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml" in compose


def promtool() -> str:
    """Debian's promtool (package prometheus; scripts/test.sh installs it)."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: install Debian's prometheus package (scripts/test.sh does)")
    return found


RULE_FILES = ("alerts", "alerts-optional")


@pytest.mark.parametrize("name", RULE_FILES)
def test_promtool_checks_the_rules(name: str) -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", f"deploy/{name}.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", RULE_FILES)
def test_every_rule_passes_its_promtool_unit_test(name: str) -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", f"deploy/{name}.test.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rules: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / f"{name}.yml").read_text())
    tests: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / f"{name}.test.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", ())
        if case.get("exp_alerts")  # a test that expects the alert to fire
    }
    assert alerts == tested, f"rules without a firing test: {sorted(alerts - tested)}"
