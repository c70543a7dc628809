"""The local-stack scripts survive a second start, a crashed earlier run and busy ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run(script: str, action: str, run_dir: Path, **env: str) -> dict[str, str]:
    done = subprocess.run(
        ["bash", str(SCRIPTS / script), action],
        env={**os.environ, "BLAMETRAIL_RUN_DIR": str(run_dir), **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{script} {action} failed:\n{done.stdout}\n{done.stderr}"
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def crash(pid: int) -> None:
    """SIGKILL ``pid`` and wait (with a deadline) until it is gone or a zombie."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} survived SIGKILL for 30 s")


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_postgres_script_twice_after_crash_and_with_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        first = run("postgres.sh", "start", tmp_path, BLAMETRAIL_PG_PORT=str(taken))
        port = int(first["PGPORT"])
        assert port != taken and accepts(port)
    try:
        assert run("postgres.sh", "start", tmp_path) == first  # already running: same server
        pid = int((Path(first["PGDATA"]) / "postmaster.pid").read_text().split()[0])
        crash(pid)  # leaves a stale postmaster.pid behind
        again = run("postgres.sh", "start", tmp_path)
        assert accepts(int(again["PGPORT"]))
    finally:
        run("postgres.sh", "stop", tmp_path)


def test_kafka_script_twice_after_crash_and_with_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        first = run("kafka.sh", "start", tmp_path, BLAMETRAIL_KAFKA_PORT=str(taken), BLAMETRAIL_KAFKA_HEAP="384m")
        port = int(first["KAFKA_PORT"])
        assert port != taken and accepts(port)
    try:
        assert run("kafka.sh", "start", tmp_path) == first
        pid = int((tmp_path / "kafka" / "kafka.pid").read_text())
        crash(pid)
        again = run("kafka.sh", "start", tmp_path, BLAMETRAIL_KAFKA_HEAP="384m")
        assert accepts(int(again["KAFKA_PORT"]))
    finally:
        run("kafka.sh", "stop", tmp_path)
    assert not (tmp_path / "kafka" / "kafka.pid").exists()
