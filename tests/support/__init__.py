"""Test helpers: waiting on conditions with deadlines, service processes, signed webhooks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

from shared.security import sign
from shared.settings import Settings

T = TypeVar("T")

# The product page's example configuration: (Sentry project, BlameTrail service, active).
PRODUCT_PAGE_EXAMPLE = [
    ("frontend", "Web App", True),
    ("payments-api", "Payments API", True),
    ("email-worker", "Email Worker", True),
    ("internal-tools", "Internal Tools", False),
]


async def wait_until(probe: Callable[[], Awaitable[T | None]], *, within: float = 30.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns a truthy value; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last value: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLAMETRAIL_")}
    for name, value in settings.model_dump().items():
        env[f"BLAMETRAIL_{name.upper()}"] = str(value)
    env.update(extra)
    return env


def blametrail_command() -> list[str]:
    """The installed ``blametrail`` console command of this interpreter's environment."""
    script = Path(sys.executable).with_name("blametrail")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


class ServiceProcess:
    """One ``blametrail <command>`` as a separate OS process, its output in a log file."""

    def __init__(self, command: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.command = command
        self.log_path = log_dir / f"{command}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*blametrail_command(), command],
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process group: a crash, with no chance to clean up."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode


def signed_headers(secret: str, body: bytes, resource: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Sentry-Hook-Resource": resource,
        "Sentry-Hook-Signature": sign(secret, body),
        "Sentry-Hook-Timestamp": str(int(time.time())),
        "Request-ID": os.urandom(16).hex(),
    }
