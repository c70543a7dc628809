"""Fault soak: open-loop webhooks through a 3-broker cluster while brokers, router and writer crash.

Run by hand, not in CI (a tiny run of it is ``tests/bench/test_faults_smoke.py``):

    python -m bench.faults.soak --rate 1000 --seconds 300 --broker-kill-at 120 --router-kills 4 --writer-kills 4

Starts a 3-node KRaft cluster (``bench.faults.cluster``: replication 3, ``min.insync.replicas=2``),
PostgreSQL (``BLAMETRAIL_DATABASE_URL`` when set, else ``scripts/postgres.sh`` in the run dir), ingest,
router and writer as processes pointed at all three brokers, and an org with the product page's
mappings. Then sends ``rate`` distinct signed ``issue.created`` webhooks a second, open loop (latency
from the due time), over mapped, inactive and unmapped projects; SIGKILLs one broker at
``--broker-kill-at`` and starts it again ``--broker-down`` seconds later; SIGKILLs router and writer
at even intervals and restarts them at once. Waits until the spool, the router and the writer have
drained, then checks (``bench.faults.check``): every 200 has its audit record (lost 0), every
incident counts each audited occurrence once (duplicated in effect 0), acks over 1 s, non-200s.
Prints a JSON summary; exits 1 when a guarantee failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from bench import openloop
from bench.faults.check import Audit, IncidentRow, Sent, check, failures
from bench.faults.cluster import REPO, Cluster, stop_on_sigterm
from bench.harness import PAYLOADS, group_lag
from shared import events
from shared.db.migrate import upgrade
from shared.db.models import AuditRecord, Incident, IncidentEvent
from shared.db.session import create_engine, sessionmaker
from shared.mappings import add_mapping, create_service
from shared.orgs import create_org
from shared.security import sign
from shared.settings import Settings
from shared.topics import Topics
from tests.support import PRODUCT_PAGE_EXAMPLE, ServiceProcess, free_port, settings_env

UNMAPPED = ("checkout-web", "batch-jobs")  # projects the org never mapped: audited as ignored


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Setup -----------------------------------------------------------------------------------------------


def database_url(run_dir: Path) -> tuple[str, bool]:
    """``BLAMETRAIL_DATABASE_URL`` when set; else a PostgreSQL of ``scripts/postgres.sh`` in ``run_dir``
    (True: started here, to be stopped at the end)."""
    if url := os.environ.get("BLAMETRAIL_DATABASE_URL"):
        return url, False
    env = {**os.environ, "BLAMETRAIL_RUN_DIR": str(run_dir)}
    subprocess.run([str(REPO / "scripts" / "postgres.sh"), "start"], env=env, check=True, stdout=subprocess.DEVNULL)
    for line in (run_dir / "postgres.env").read_text().splitlines():
        if line.startswith("BLAMETRAIL_DATABASE_URL="):
            return line.partition("=")[2], True
    raise SystemExit(f"no BLAMETRAIL_DATABASE_URL in {run_dir / 'postgres.env'}")


async def make_org(settings: Settings) -> tuple[str, int, str, dict[str, int | None]]:
    """A new org with the product page's services and mappings: (slug, id, client secret, project →
    the service its active mapping routes to)."""
    engine = create_engine(settings)
    slug = f"soak-{uuid.uuid4().hex[:8]}"
    projects: dict[str, int | None] = dict.fromkeys(UNMAPPED)
    try:
        async with sessionmaker(engine)() as session, session.begin():
            org = await create_org(session, slug, "Fault soak")
            for project, name, active in PRODUCT_PAGE_EXAMPLE:
                service = await create_service(session, org.org_id, name)
                await add_mapping(session, org.org_id, project, service.id, active=active)
                projects[project] = service.id if active else None
    finally:
        await engine.dispose()
    return slug, org.org_id, org.client_secret, projects


@dataclass
class Body:
    delivery_id: str
    project: str
    issue_id: str
    request: bytes


def bodies(settings: Settings, org: str, secret: str, projects: list[str], count: int, issues: int) -> list[Body]:
    """``count`` distinct signed ``issue.created`` webhooks (a sequence number each) over ``issues``
    issue ids per project, projects drawn at random (seeded: runs are comparable)."""
    template = json.loads((PAYLOADS / "issue.created.json").read_bytes())
    issue = template["data"]["issue"]
    rng = random.Random(1)
    path = f"/webhooks/sentry/{org}"
    out = []
    for n in range(count):
        project = rng.choice(projects)
        issue["id"] = str(8_000_000 + rng.randrange(issues))
        # Sentry projects have ids of their own: the router resolves by id first.
        issue["project"] = {"id": str(4_505_877_300_000_000 + zlib.crc32(project.encode())), "slug": project}
        template["soak_sequence"] = n
        body = json.dumps(template, separators=(",", ":")).encode()
        request = openloop.request_bytes("127.0.0.1", settings.ingest_port, path, sign(secret, body), body)
        out.append(Body(events.delivery_id(org, "issue", body), project, issue["id"], request))
    return out


# Services --------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    settings: Settings
    log_dir: Path
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return settings_env(self.settings)

    def start(self, name: str) -> None:
        self.processes[name] = ServiceProcess(name, self.env, self.log_dir)

    def crash(self, name: str) -> None:
        """SIGKILL ``name`` and start it again at once (a supervisor's restart)."""
        self.processes[name].kill()
        self.start(name)

    def dead(self) -> list[str]:
        return [name for name, p in self.processes.items() if not p.alive()]

    def stop(self) -> dict[str, int]:
        return {name: p.stop() for name, p in self.processes.items()}

    async def ready(self, within: float) -> None:
        s = self.settings
        urls = [
            f"http://127.0.0.1:{s.ingest_port}/readyz",
            f"http://127.0.0.1:{s.router_metrics_port}/metrics",
            f"http://127.0.0.1:{s.writer_metrics_port}/metrics",
        ]
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                if dead := self.dead():
                    raise RuntimeError(f"{dead} exited at start (logs in {self.log_dir})")
                try:
                    if all([(await client.get(url)).status_code == 200 for url in urls]):
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the services were not ready within {within:g} s (logs in {self.log_dir})")
                await asyncio.sleep(0.2)


# Load and faults ---------------------------------------------------------------------------------------


async def exchange(pool: openloop._Pool, request: bytes) -> int:
    """One request on a kept-alive connection; when the server had closed that connection while it
    was idle (nothing came back), once more on a new one, as an HTTP client does."""
    try:
        return await openloop._exchange(pool, request)
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
        if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
            raise
        pool.idle.append(await asyncio.open_connection(pool.host, pool.port))
        return await openloop._exchange(pool, request)


async def warm_up(port: int, first: list[Body], within: float = 60.0) -> list[Sent]:
    """A few webhooks, one at a time, each until it is answered 200: a cold ingest loads the org's
    credentials and connects to every partition leader on its first requests, and may shed them as
    overloaded. The measured load starts on a warm process; these count as sent like the others."""
    pool = openloop._Pool("127.0.0.1", port)
    deadline = time.monotonic() + within
    out = []
    try:
        for body in first:
            status, due = 0, time.monotonic()
            while status != 200 and time.monotonic() < deadline:
                due = time.monotonic()
                try:
                    async with asyncio.timeout(openloop.ANSWER_TIMEOUT):
                        status = await exchange(pool, body.request)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                    status = 0
                if status != 200:
                    await asyncio.sleep(0.5)
            out.append(Sent(body.delivery_id, body.project, body.issue_id, status, time.monotonic() - due))
    finally:
        pool.close()
    return out


async def send(port: int, load: list[Body], rate: float) -> tuple[list[Sent], float]:
    """Open loop: request ``i`` is due at ``start + i / rate``; latency from the due time. Returns the
    answers in sending order and the seconds the sending took."""
    pool = openloop._Pool("127.0.0.1", port)
    answers: list[tuple[int, float]] = [(0, 0.0)] * len(load)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        try:
            async with asyncio.timeout(openloop.ANSWER_TIMEOUT):
                status = await exchange(pool, load[i].request)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            status = 0
        answers[i] = (status, time.monotonic() - due)

    start = time.monotonic() + 0.05
    i = 0
    while i < len(load):
        now = time.monotonic()
        while i < len(load) and start + i / rate <= now:
            task = asyncio.create_task(one(i, start + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if i < len(load):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
    took = time.monotonic() - start
    if tasks:
        await asyncio.wait(set(tasks))
    pool.close()
    sent = [Sent(b.delivery_id, b.project, b.issue_id, s, lat) for b, (s, lat) in zip(load, answers, strict=True)]
    return sent, took


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the load started
    what: str  # "router", "writer", "broker-kill", "broker-start"


def schedule(args: argparse.Namespace) -> list[Fault]:
    faults = [Fault(args.seconds * (k + 0.35) / args.router_kills, "router") for k in range(args.router_kills)]
    faults += [Fault(args.seconds * (k + 0.65) / args.writer_kills, "writer") for k in range(args.writer_kills)]
    if args.broker_kill_at is not None:
        faults += [
            Fault(args.broker_kill_at, "broker-kill"),
            Fault(args.broker_kill_at + args.broker_down, "broker-start"),
        ]
    return sorted(faults, key=lambda f: f.at)


async def inject(faults: list[Fault], pipeline: Pipeline, cluster: Cluster, broker: int) -> list[dict[str, Any]]:
    """Carry out ``faults`` on their schedule (a timetable, not a wait for a condition); each on its
    own, so a broker slow to start again delays no crash."""
    start = time.monotonic()

    async def fire(fault: Fault) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + fault.at - time.monotonic()))
        at = round(time.monotonic() - start, 1)
        if fault.what == "broker-kill":
            cluster.kill(broker)
            done: dict[str, Any] = {"what": f"SIGKILL broker {broker}", "at_s": at}
        elif fault.what == "broker-start":
            cluster.launch(broker)
            log(f"broker {broker} starting again at {at} s")
            await cluster.wait_ready([broker])
            done = {
                "what": f"broker {broker} started",
                "at_s": at,
                "serving_after_s": round(time.monotonic() - start - at, 1),
            }
        else:
            pipeline.crash(fault.what)
            done = {"what": f"SIGKILL {fault.what} (restarted)", "at_s": at}
        log(f"{done['what']} at {at} s")
        return done

    return sorted(await asyncio.gather(*(fire(f) for f in faults)), key=lambda d: float(d["at_s"]))


# Drain -------------------------------------------------------------------------------------------------


async def spool_depth(port: int) -> float | None:
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return None
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "blametrail_ingest_spool_depth"
        for s in f.samples
    )


async def backlog(pipeline: Pipeline) -> tuple[float | None, int | None, int | None]:
    """Spool depth, then the router's lag on the raw topic, then the writer's on its topics (in that
    order: each stage commits only after its outputs were acknowledged). None: not known yet."""
    s, topics = pipeline.settings, Topics.from_settings(pipeline.settings)
    spool = await spool_depth(s.ingest_port)
    router = await group_lag(s.kafka_bootstrap, s.router_group, [topics.raw])
    writer = await group_lag(s.kafka_bootstrap, s.writer_group, [topics.routed, topics.ignored])
    return spool, router, writer


async def wait_drained(pipeline: Pipeline, within: float) -> tuple[bool, float]:
    started = last_log = time.monotonic()
    while time.monotonic() - started < within:
        if dead := pipeline.dead():
            log(f"{dead} died while draining (logs in {pipeline.log_dir})")
            return False, time.monotonic() - started
        left = await backlog(pipeline)
        if left == (0, 0, 0):
            return True, time.monotonic() - started
        if time.monotonic() - last_log > 10:
            log(f"draining: spool {left[0]}, router lag {left[1]}, writer lag {left[2]}")
            last_log = time.monotonic()
        await asyncio.sleep(1.0)
    return False, time.monotonic() - started


# Verdict -----------------------------------------------------------------------------------------------


async def read_back(settings: Settings, org: str, org_id: int) -> tuple[list[Audit], list[IncidentRow]]:
    engine = create_engine(settings)
    try:
        async with sessionmaker(engine)() as session:
            audit = [
                Audit(d, p, o)
                for d, p, o in await session.execute(
                    select(AuditRecord.delivery_id, AuditRecord.project_slug, AuditRecord.outcome).where(
                        AuditRecord.org_slug == org
                    )
                )
            ]
            timeline = (
                select(IncidentEvent.incident_id, func.count().label("n"))
                .where(IncidentEvent.change.in_(["opened", "updated", "reopened"]))
                .group_by(IncidentEvent.incident_id)
                .subquery()
            )
            rows = await session.execute(
                select(Incident.service_id, Incident.incident_key, Incident.event_count, timeline.c.n)
                .outerjoin(timeline, timeline.c.incident_id == Incident.id)
                .where(Incident.org_id == org_id)
            )
            incidents = [IncidentRow(s, k, c, n or 0) for s, k, c, n in rows]
    finally:
        await engine.dispose()
    return audit, incidents


# Main --------------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, run_dir: Path, url: str) -> dict[str, Any]:
    cluster = Cluster(run_dir / "cluster", heap=args.heap)
    pipeline: Pipeline | None = None
    started = time.monotonic()
    try:
        log(f"starting 3 Kafka nodes in {cluster.run_dir}")
        await cluster.start()
        prefix = f"soak-{uuid.uuid4().hex[:6]}."
        port = free_port()
        settings = Settings(
            kafka_bootstrap=cluster.bootstrap,
            database_url=url,
            topic_prefix=prefix,
            topic_replication_factor=3,
            router_group=prefix + "router",
            writer_group=prefix + "writer",
            ingest_port=port,
            public_url=f"http://127.0.0.1:{port}",
            router_metrics_port=free_port(),
            writer_metrics_port=free_port(),
            spool_dir=str(run_dir / "spool"),
            secret_keys=os.environ.get("BLAMETRAIL_SECRET_KEYS", ""),
        )
        topics = await cluster.create_topics(settings)
        await asyncio.to_thread(upgrade, settings)
        org, org_id, secret, projects = await make_org(settings)
        log(f"cluster {cluster.bootstrap} ready; org {org}; building {int(args.rate * args.seconds)} webhooks")
        count = args.warm_up + int(args.rate * args.seconds)
        load = bodies(settings, org, secret, sorted(projects), count, args.issues)
        log_dir = run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        pipeline = Pipeline(settings, log_dir)
        for name in ("ingest", "router", "writer"):
            pipeline.start(name)
        await pipeline.ready(within=120)
        warmed = await warm_up(port, load[: args.warm_up])
        setup = time.monotonic() - started
        log(f"services ready after {setup:.0f} s: {args.rate:g}/s for {args.seconds:g} s")

        faults = schedule(args)
        injected = asyncio.create_task(inject(faults, pipeline, cluster, args.broker))
        sent, took = await send(port, load[args.warm_up :], args.rate)
        kills = await injected
        log(f"sent {len(sent)} in {took:.1f} s; waiting for the pipeline to drain")
        ok, drain = await wait_drained(pipeline, args.drain_within)
        under = await cluster.under_replicated(list(Topics.from_settings(settings).all()))
        audit, incidents = await read_back(settings, org, org_id)
        summary = check([*warmed, *sent], projects, audit, incidents)
        summary.update(
            rate=args.rate,
            seconds=args.seconds,
            sustained_per_s=round(len(sent) / took, 1) if took else 0,
            faults=kills,
            drained=ok,
            drain_s=round(drain, 1),
            setup_s=round(setup, 1),
            under_replicated_at_end=under,
            cluster=topics,
            run_dir=str(run_dir),
        )
        summary["failures"] = failures(summary)
        return summary
    finally:
        if pipeline is not None:
            codes = pipeline.stop()
            log(f"services stopped: {codes}")
        cluster.stop()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0, help="webhooks a second (default 1000)")
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the load (default 300)")
    parser.add_argument("--broker-kill-at", type=float, help="SIGKILL a broker this many seconds in (default 40%%)")
    parser.add_argument("--broker-down", type=float, help="seconds before it starts again (default 20%% of the run)")
    parser.add_argument("--broker", type=int, default=2, help="which node to kill (1-3, default 2)")
    parser.add_argument("--no-broker-kill", action="store_true", help="leave the brokers alone")
    parser.add_argument("--router-kills", type=int, default=4)
    parser.add_argument("--writer-kills", type=int, default=4)
    parser.add_argument("--issues", type=int, default=200, help="distinct Sentry issues per project (default 200)")
    parser.add_argument("--warm-up", type=int, default=20, help="webhooks sent one by one first (default 20)")
    parser.add_argument("--drain-within", type=float, default=600.0, help="seconds to wait for the drain")
    parser.add_argument("--heap", default="256m", help="each broker's JVM heap (default 256m)")
    parser.add_argument("--run-dir", type=Path, help="configs, logs and data (default: a new temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run dir (kept anyway when a check fails)")
    args = parser.parse_args(argv)
    if args.no_broker_kill:
        args.broker_kill_at = None
    else:
        args.broker_kill_at = args.seconds * 0.4 if args.broker_kill_at is None else args.broker_kill_at
        args.broker_down = min(30.0, args.seconds * 0.2) if args.broker_down is None else args.broker_down
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stop_on_sigterm()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="bt-faults-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    url, own_postgres = database_url(run_dir)
    try:
        summary = asyncio.run(soak(args, run_dir, url))
    finally:
        if own_postgres:
            env = {**os.environ, "BLAMETRAIL_RUN_DIR": str(run_dir)}
            subprocess.run([str(REPO / "scripts" / "postgres.sh"), "stop"], env=env, check=False)
    print(json.dumps(summary, indent=2))
    if summary["failures"]:
        log(f"FAILED: {', '.join(summary['failures'])} (run dir kept: {run_dir})")
        return 1
    if not (args.keep or args.run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
