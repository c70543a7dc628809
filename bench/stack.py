"""Where the measurements point: a local stack of ``scripts/up.sh``, or a URL, org and secret.

``--stack DIR`` reads a run directory of ``scripts/up.sh`` (``BLAMETRAIL_RUN_DIR``): ingest's port
and the writer's metrics port from ``stack.env``, the demo org's secret from ``demo-org.json``, the
pids of ingest, router and writer (``*.pid``), Kafka (``kafka/kafka.pid``) and Postgres
(``$PGDATA/postmaster.pid``, its backends counted as its children).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from bench.harness import REPO, Target, loopback_only
from shared.db.conninfo import as_libpq
from shared.settings import Settings

SERVICES = ("ingest", "router", "writer")


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def stack_target(run_dir: Path) -> Target:
    env = read_env(run_dir / "stack.env")
    org = json.loads((run_dir / "demo-org.json").read_text())
    pids: dict[str, int] = {}
    for name in (*SERVICES, "admin"):
        if (pid := _pid(run_dir / f"{name}.pid")) is not None and name != "admin":
            pids[name] = pid
    if (pid := _pid(run_dir / "kafka" / "kafka.pid")) is not None:
        pids["kafka"] = pid
    if "PGDATA" in env and (pid := _pid(Path(env["PGDATA"]) / "postmaster.pid")) is not None:
        pids["postgres"] = pid
    missing = [name for name in SERVICES if name not in pids]
    if missing:
        hint = f"scripts/up.sh with BLAMETRAIL_RUN_DIR={run_dir}"
        raise SystemExit(f"{run_dir}: {', '.join(missing)} not running ({hint})")
    return Target(
        url=f"http://127.0.0.1:{env['BLAMETRAIL_INGEST_PORT']}",
        org="demo",
        secret=org["client_secret"],
        pids=pids,
        writer_metrics=f"http://127.0.0.1:{env['BLAMETRAIL_WRITER_METRICS_PORT']}/metrics",
        database_url=as_libpq(read_env(run_dir / "postgres.env")["BLAMETRAIL_DATABASE_URL"]),
        # up.sh's services run with the default topic prefix and groups
        kafka=Settings.model_construct(kafka_bootstrap=read_env(run_dir / "kafka.env")["BLAMETRAIL_KAFKA_BOOTSTRAP"]),
    )


def stack_up(run_dir: Path) -> None:
    """``scripts/up.sh`` with ``BLAMETRAIL_RUN_DIR=run_dir`` (keeps its data across runs)."""
    env = {**os.environ, "BLAMETRAIL_RUN_DIR": str(run_dir)}
    env.pop("BLAMETRAIL_INGEST_PORT", None)
    subprocess.run([str(REPO / "scripts" / "up.sh")], env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)


def stack_down(run_dir: Path) -> None:
    env = {**os.environ, "BLAMETRAIL_RUN_DIR": str(run_dir)}
    subprocess.run([str(REPO / "scripts" / "down.sh")], env=env, check=False, timeout=300)


def stack_reset(run_dir: Path) -> None:
    """Stop the stack in ``run_dir`` and delete its data (database, Kafka log, spool), so the next
    ``stack_up`` measures an empty database: every run adds its webhooks' audit records, and a grown
    database makes later runs slower. Refuses a directory that is not a run directory of up.sh."""
    if not (run_dir / "stack.env").is_file():
        if run_dir.exists():
            raise SystemExit(f"{run_dir}: not a run directory of scripts/up.sh (no stack.env); not deleting it")
        return
    stack_down(run_dir)
    shutil.rmtree(run_dir)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack", type=Path, help="run directory of scripts/up.sh (e.g. /tmp/bt-bench)")
    parser.add_argument("--url", help="ingest base URL (instead of --stack)")
    parser.add_argument("--org", help="org slug (with --url)")
    parser.add_argument("--secret", help="the org's client secret (with --url)")
    parser.add_argument("--project", default="payments-api", help="project slug in the bodies (a mapped one)")
    parser.add_argument("--pid", action="append", default=[], metavar="NAME=PID", help="a process to account CPU to")
    parser.add_argument("--writer-metrics", help="the writer's /metrics URL: CPU windows wait for it to drain")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measured run (default 60)")


def target_from_args(args: argparse.Namespace) -> Target:
    if args.stack:
        target = stack_target(args.stack)
    elif args.url and args.org and args.secret:
        target = Target(url=loopback_only(args.url), org=args.org, secret=args.secret)
        target.writer_metrics = args.writer_metrics
    else:
        raise SystemExit("give --stack DIR, or --url, --org and --secret")
    target.project = args.project
    for item in args.pid:
        name, _, pid = item.partition("=")
        target.pids[name] = int(pid)
    return target
