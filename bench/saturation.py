"""Saturation: ingest's acknowledged webhooks per second against its ceiling, a bare Starlette endpoint.

wrk (closed loop, ``--connections`` connections) sends pre-signed, distinct webhooks
(``bench/wrk_bodies.lua``) first to ``bench.bare_app`` (same uvicorn settings, reads the body,
answers 200), then to ingest, each for ``--seconds`` after a short unmeasured warm-up. An
acknowledgement is a 2xx (``accepted`` or ``spooled``; the split and any ``overloaded`` come from
ingest's own counters). Router and writer can be paused (SIGSTOP) meanwhile so both runs see the same
machine; they catch up afterwards. Also: ingest's CPU milliseconds per request at saturation.

    python -m bench.saturation --stack /tmp/bt-bench --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import CpuMeter, Target, ensure_wrk, loopback_only, write_bodies

LUA = Path(__file__).with_name("wrk_bodies.lua")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, within: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"the server on port {port} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listens on port {port} after {within} s")


def wrk(url: str, path: str, bodies: Path, seconds: float, connections: int, threads: int) -> dict[str, Any]:
    """One wrk run; its Lua ``done`` prints the figures as JSON."""
    env = {**os.environ, "BENCH_BODIES": str(bodies), "BENCH_PATH": path, "BENCH_THREADS": str(threads)}
    command = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    command += ["-s", str(LUA), url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            raw: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        sys.exit(f"wrk printed no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    duration = raw["duration_us"] / 1e6
    errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"]
    ok = raw["requests"] - raw["non2xx"]
    return {
        "requests": raw["requests"],
        "ok": ok,
        "non2xx": raw["non2xx"],
        "socket_errors": errors,
        "seconds": round(duration, 2),
        "ok_per_s": round(ok / duration, 1) if duration else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
    }


def outcomes(base_url: str) -> dict[str, float]:
    """ingest's ``blametrail_ingest_requests_total`` summed by outcome."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "blametrail_ingest_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    out[outcome] = out.get(outcome, 0.0) + sample.value
    return out


@contextlib.contextmanager
def paused(pids: Mapping[str, int]) -> Iterator[None]:
    """SIGSTOP ``pids`` for the duration (SIGCONT after, whatever happens)."""
    stopped = []
    try:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def bare_server() -> Iterator[str]:
    """``bench.bare_app`` as a process on a free port; its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_app", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
    )
    try:
        wait_port(port, 30, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def run(
    target: Target,
    seconds: float,
    *,
    connections: int = 64,
    threads: int = 1,
    bodies: int = 30_000,
    pause: Mapping[str, int] | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    base = loopback_only(target.url)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        file = write_bodies(Path(tmp) / "bodies.tsv", target.secret, bodies, project=target.project, start=1_000_000)
        warmup = min(3.0, seconds / 5)
        with paused(pause or {}):
            with bare_server() as bare_url:
                if warmup >= 1:
                    wrk(bare_url, target.webhook_path, file, warmup, connections, threads)
                bare = wrk(bare_url, target.webhook_path, file, seconds, connections, threads)
            if warmup >= 1:
                wrk(base, target.webhook_path, file, warmup, connections, threads)
            before = outcomes(base)
            meter = CpuMeter({"ingest": target.pids["ingest"]} if "ingest" in target.pids else {})
            ingest = wrk(base, target.webhook_path, file, seconds, connections, threads)
            used = meter.stop()
            after = outcomes(base)
    ingest["outcomes"] = {k: int(after[k] - before.get(k, 0.0)) for k in after if after[k] > before.get(k, 0.0)}
    if "ingest" in used and ingest["requests"]:
        ingest["ingest_cpu_ms_per_request"] = round(used["ingest"] * 1000 / ingest["requests"], 3)
    ratio = round(ingest["ok_per_s"] / bare["ok_per_s"], 3) if bare["ok_per_s"] else 0.0
    return {
        "connections": connections,
        "threads": threads,
        "distinct_bodies": bodies,
        "bare": bare,
        "ingest": ingest,
        "ratio": ratio,
        "paused": sorted(pause or {}),
    }


def main() -> None:
    from bench.stack import add_target_arguments, target_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pause", action="store_true", help="leave router and writer running")
    args = parser.parse_args()
    target = target_from_args(args)
    pause = {} if args.no_pause else {k: v for k, v in target.pids.items() if k in ("router", "writer")}
    result = run(target, args.seconds, connections=args.connections, threads=args.threads, pause=pause)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
