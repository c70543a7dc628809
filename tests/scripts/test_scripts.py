"""The local-stack scripts survive a second start, a crashed earlier run and busy ports; they keep
their port and data across stop and start; up.sh keeps the demo org's secrets private."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from shared.kafka import create_topics, make_producer
from shared.settings import Settings
from shared.topics import Topics
from tests.support import wait_until
from tests.support.kafka import TopicReader

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def script(
    name: str, action: str | None, run_dir: Path, env: dict[str, str] | None = None, *, own_stack: bool = False
) -> subprocess.CompletedProcess[str]:
    """``name action`` in ``run_dir``; ``own_stack``: without this shell's ``BLAMETRAIL_*`` settings."""
    base = {k: v for k, v in os.environ.items() if not (own_stack and k.startswith("BLAMETRAIL_"))}
    done = subprocess.run(
        ["bash", str(SCRIPTS / name), *([action] if action else [])],
        env={**base, "BLAMETRAIL_RUN_DIR": str(run_dir), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{name} {action} failed:\n{done.stdout}\n{done.stderr}"
    return done


def run(name: str, action: str, run_dir: Path, **env: str) -> dict[str, str]:
    """``name action`` in ``run_dir``; the ``KEY=value`` lines it prints."""
    done = script(name, action, run_dir, env)
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


@contextmanager
def squatting(port: int) -> Iterator[None]:
    """Another process listens on ``port`` meanwhile."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        yield


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


def test_postgres_keeps_its_port_and_data_across_stop_and_start(tmp_path: Path) -> None:
    first = run("postgres.sh", "start", tmp_path)
    port = int(first["PGPORT"])

    def rows(env: dict[str, str]) -> list[str]:
        with psycopg.connect(env["BLAMETRAIL_DATABASE_URL"].replace("+psycopg", ""), autocommit=True) as conn:
            return [v for (v,) in conn.execute("SELECT v FROM kept ORDER BY v").fetchall()]

    try:
        with psycopg.connect(first["BLAMETRAIL_DATABASE_URL"].replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('written before the stop')")
        run("postgres.sh", "stop", tmp_path)
        again = run("postgres.sh", "start", tmp_path)
        assert again == first, "same port, same database"
        assert rows(again) == ["written before the stop"]

        run("postgres.sh", "stop", tmp_path)
        with squatting(port):
            done = script("postgres.sh", "start", tmp_path)
        moved = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        assert int(moved["PGPORT"]) != port and f"port {port} is taken" in done.stderr, done.stderr
        assert rows(moved) == ["written before the stop"]
    finally:
        run("postgres.sh", "stop", tmp_path)


async def test_kafka_keeps_its_port_and_data_across_stop_and_start(tmp_path: Path) -> None:
    async def kafka(action: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(script, "kafka.sh", action, tmp_path, {"BLAMETRAIL_KAFKA_HEAP": "384m"})

    def values(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    async def records(bootstrap: str, topic: str) -> list[bytes]:
        async with TopicReader(bootstrap, [topic]) as reader:

            async def some() -> list[bytes]:
                return [r.value for r in reader.records]

            return await wait_until(some, within=30, what=f"the records of {topic}")

    first = values(await kafka("start"))
    port = int(first["KAFKA_PORT"])
    try:
        settings = Settings(kafka_bootstrap=first["BLAMETRAIL_KAFKA_BOOTSTRAP"], topic_prefix="kept.")
        await create_topics(settings, 1)
        topic = Topics.from_settings(settings).raw
        producer = make_producer(settings, client_id="test-scripts")
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"written before the stop", key=b"k")
        finally:
            await producer.stop()

        await kafka("stop")
        again = values(await kafka("start"))
        assert again == first, "same ports"
        assert await records(again["BLAMETRAIL_KAFKA_BOOTSTRAP"], topic) == [b"written before the stop"]

        await kafka("stop")
        with squatting(port):
            done = await kafka("start")
        moved = values(done)
        assert int(moved["KAFKA_PORT"]) != port and f"port {port} is taken" in done.stderr, done.stderr
        assert moved["KAFKA_CONTROLLER_PORT"] == first["KAFKA_CONTROLLER_PORT"]
        assert await records(moved["BLAMETRAIL_KAFKA_BOOTSTRAP"], topic) == [b"written before the stop"]
    finally:
        await kafka("stop")


def test_up_keeps_the_demo_org_secrets_private(tmp_path: Path) -> None:
    """demo-org.json (client secret, API token) is 0600 when created, when rewritten after it was
    lost, and when an older run left it readable by others."""
    demo = tmp_path / "demo-org.json"

    def private() -> bool:
        return stat.S_IMODE(demo.stat().st_mode) == 0o600

    try:
        script("up.sh", None, tmp_path, own_stack=True)
        assert private() and json.loads(demo.read_text())["client_secret"]
        demo.chmod(0o644)
        script("up.sh", None, tmp_path, own_stack=True)
        assert private()
        demo.unlink()  # the org survives, its secret is rotated into a new file
        script("up.sh", None, tmp_path, own_stack=True)
        assert private() and json.loads(demo.read_text())["client_secret"]
    finally:
        script("down.sh", None, tmp_path, own_stack=True)
