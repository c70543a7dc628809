"""A 3-node Apache Kafka cluster (KRaft) on loopback, for fault soaks: brokers that can be SIGKILLed.

``scripts/kafka.sh`` runs one combined node for development and tests; a fault soak needs replicas
that survive the loss of one broker. Here every node is a combined controller + broker sharing one
static controller quorum (three voters), on free loopback ports, with its data under ``run_dir``.
The jars and the log4j setup are ``scripts/kafka.sh fetch``'s (Maven Central, cached). Topics get
replication factor 3 and ``min.insync.replicas=2`` (broker default): an ``acks=all`` write survives
one broker down, never two. Heaps are small: the machine has 2 cores and is shared.

    python -m bench.faults.cluster /tmp/bt-faults/cluster   # start, create the topics, wait for Ctrl-C
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from shared.kafka import create_topics
from shared.settings import Settings
from shared.topics import Topics

REPO = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO / "scripts" / "kafka.sh"
REPLICATION = 3
MIN_INSYNC = 2
STARTED = b"Kafka Server started"
# C1 only and the serial collector: a JVM that starts fast and leaves the cores to the pipeline.
JVM_FLAGS = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xshare:auto", "-Djava.awt.headless=true"]


def kafka_home() -> Path:
    """Where ``scripts/kafka.sh fetch`` keeps the jars (its cache dir and version rules, read from it)."""
    version = os.environ.get("BLAMETRAIL_KAFKA_VERSION")
    if not version:
        found = re.search(r'KAFKA_VERSION="\$\{BLAMETRAIL_KAFKA_VERSION:-([^}]+)\}"', KAFKA_SCRIPT.read_text())
        if not found:
            raise SystemExit(f"cannot read the Kafka version from {KAFKA_SCRIPT}")
        version = found.group(1)
    cache = os.environ.get("BLAMETRAIL_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blametrail"
    )
    return Path(cache) / f"kafka-{version}"


def fetch() -> Path:
    """The Kafka jars, fetched once with Maven by ``scripts/kafka.sh fetch``."""
    home = kafka_home()
    if not (home / ".complete").exists():
        subprocess.run([str(KAFKA_SCRIPT), "fetch"], check=True, timeout=900)
    return home


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on (held together while picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    home: Path  # config, logs and data of this node
    process: subprocess.Popen[bytes] | None = None
    log_mark: int = 0  # server.log's size when this node was last started: readiness is looked for after it

    @property
    def server_log(self) -> Path:
        return self.home / "server.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    run_dir: Path
    size: int = 3
    heap: str = "256m"
    partitions: int = 6
    nodes: list[Node] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def node(self, node_id: int) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    # Configuration -------------------------------------------------------------------------------

    def _config(self, node: Node, voters: str) -> str:
        max_bytes = Settings().kafka_max_message_bytes
        lines = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.home / "data",
            "num.partitions": self.partitions,
            "default.replication.factor": REPLICATION,
            "min.insync.replicas": MIN_INSYNC,
            "unclean.leader.election.enable": "false",
            "offsets.topic.replication.factor": REPLICATION,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": REPLICATION,
            "transaction.state.log.min.isr": MIN_INSYNC,
            "share.coordinator.state.topic.replication.factor": REPLICATION,
            "share.coordinator.state.topic.min.isr": MIN_INSYNC,
            "group.initial.rebalance.delay.ms": 0,
            "message.max.bytes": max_bytes,
            "replica.fetch.max.bytes": max_bytes,
            "auto.create.topics.enable": "false",
            # Few threads: three brokers share two cores with the pipeline and the load.
            "num.network.threads": 2,
            "num.io.threads": 2,
            "num.replica.fetchers": 1,
            "background.threads": 2,
            "log.cleaner.enable": "false",
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def _java(self, *args: str) -> list[str]:
        home = fetch()
        return ["java", *JVM_FLAGS, "-Xmx128m", "-cp", str(home / "libs" / "*"), *args]

    def format(self) -> None:
        """Pick ports, write each node's config and format its storage: a new, empty cluster."""
        ports = free_ports(2 * self.size)
        self.nodes = [
            Node(i + 1, ports[2 * i], ports[2 * i + 1], self.run_dir / f"node-{i + 1}") for i in range(self.size)
        ]
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        formats = []
        for node in self.nodes:
            shutil.rmtree(node.home / "data", ignore_errors=True)  # a new cluster, whatever was there
            node.home.mkdir(parents=True, exist_ok=True)
            (node.home / "server.properties").write_text(self._config(node, voters))
            command = self._java("kafka.tools.StorageTool", "format", "-t", cluster_id)
            command += ["-c", str(node.home / "server.properties")]
            formats.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for node, proc in zip(self.nodes, formats, strict=True):
            _, err = proc.communicate(timeout=180)
            if proc.returncode != 0:
                raise RuntimeError(f"formatting node {node.node_id} failed: {err.decode(errors='replace')}")

    # Processes -----------------------------------------------------------------------------------

    def launch(self, node_id: int) -> None:
        """Start one node's JVM (its data kept); :meth:`wait_ready` waits until it serves."""
        node = self.node(node_id)
        if node.alive():
            raise RuntimeError(f"node {node_id} is running")
        node.log_mark = node.server_log.stat().st_size if node.server_log.exists() else 0
        home = fetch()
        command = ["java", *JVM_FLAGS, f"-Xms{self.heap}", f"-Xmx{self.heap}"]
        command += [f"-Dkafka.logs.dir={node.home}", f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}"]
        command += ["-cp", str(home / "libs" / "*"), "kafka.Kafka", str(node.home / "server.properties")]
        with (node.home / "stdout.log").open("ab") as out:
            node.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def started(self, node_id: int) -> bool:
        node = self.node(node_id)
        if not node.alive():
            tail = (node.home / "stdout.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Kafka node {node_id} exited ({node.process and node.process.returncode}): {tail}")
        if not node.server_log.exists():
            return False
        with node.server_log.open("rb") as log:
            log.seek(node.log_mark)
            return STARTED in log.read() and port_open(node.port)

    async def wait_ready(self, node_ids: list[int] | None = None, within: float = 180.0) -> None:
        """Until every given node (default: all) logged its start and serves, and the cluster sees them."""
        ids = node_ids or [n.node_id for n in self.nodes]
        deadline = time.monotonic() + within
        while not all(self.started(i) for i in ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka nodes {ids} did not start within {within:g} s (logs in {self.run_dir})")
            await asyncio.sleep(0.2)
        while sorted(await self.brokers()) != sorted(n.node_id for n in self.nodes if n.alive()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not register brokers {ids} within {within:g} s")
            await asyncio.sleep(0.5)

    async def start(self) -> None:
        """Format, start every node, wait until all three are registered."""
        self.format()
        for node in self.nodes:
            self.launch(node.node_id)
        await self.wait_ready()

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: a crash, no controlled shutdown, no flush."""
        node = self.node(node_id)
        if node.process is not None and node.alive():
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait(30)

    async def restart(self, node_id: int, within: float = 180.0) -> None:
        self.launch(node_id)
        await self.wait_ready([node_id], within)

    def stop(self) -> None:
        """SIGTERM every node (controlled shutdown), SIGKILL what is still running after 30 s."""
        for node in self.nodes:
            if node.process is not None and node.alive():
                node.process.terminate()
        deadline = time.monotonic() + 30
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(10)

    # Cluster state --------------------------------------------------------------------------------

    def _admin(self) -> AIOKafkaAdminClient:
        return AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, client_id="blametrail-faults", request_timeout_ms=5000
        )

    async def brokers(self) -> list[int]:
        """Ids of the brokers the cluster's metadata lists (empty while it cannot say)."""
        admin = self._admin()
        try:
            await admin.start()
            described = await admin.describe_cluster()
            return [int(b["node_id"]) for b in described["brokers"]]
        except (KafkaError, OSError):
            return []
        finally:
            await admin.close()

    async def replicas(self, topics: list[str], within: float = 30.0) -> dict[str, tuple[int, int]]:
        """``topic/partition`` → (replicas, in-sync replicas), once every topic is described (a broker
        that has not caught up with a new topic answers it with an error)."""
        deadline = time.monotonic() + within
        while True:
            admin = self._admin()
            await admin.start()
            try:
                described = await admin.describe_topics(topics)
            finally:
                await admin.close()
            complete = {t["topic"] for t in described if not t["error_code"] and t["partitions"]}
            if complete == set(topics) or time.monotonic() > deadline:
                return {
                    f"{t['topic']}/{p['partition']}": (len(p["replicas"]), len(p["isr"]))
                    for t in described
                    for p in t["partitions"]
                }
            await asyncio.sleep(0.5)

    async def min_insync(self, topics: list[str], within: float = 30.0) -> dict[str, str]:
        """Each topic's effective ``min.insync.replicas`` (a broker whose metadata has not caught up
        with a new topic answers it with an error and no value: asked again until all have one)."""
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        wanted = [ConfigResource(ConfigResourceType.TOPIC, t, {"min.insync.replicas": None}) for t in topics]
        deadline = time.monotonic() + within
        while True:
            admin = self._admin()
            await admin.start()
            try:
                responses = await admin.describe_configs(wanted)
            finally:
                await admin.close()
            # DescribeConfigsResponse resources: (error_code, error_message, type, name, [(key, value, …)])
            found = {r[3]: str(r[4][0][1]) for response in responses for r in response.resources if not r[0] and r[4]}
            if set(found) == set(topics) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)

    async def create_topics(self, settings: Settings) -> dict[str, object]:
        """The project's topics (``shared.kafka.create_topics``) with replication 3, and proof of it."""
        settings = settings.model_copy(
            update={"kafka_bootstrap": self.bootstrap, "topic_replication_factor": REPLICATION}
        )
        await create_topics(settings)
        names = list(Topics.from_settings(settings).all())
        replicas = await self.replicas(names)
        insync = await self.min_insync(names)
        wrong = len(replicas) != len(names) * settings.topic_partitions or set(insync) != set(names)
        if wrong or any(r != REPLICATION for r, _ in replicas.values()) or set(insync.values()) != {str(MIN_INSYNC)}:
            raise RuntimeError(f"topics are not replicated as asked: {replicas} {insync}")
        return {"topics": names, "partitions": len(replicas), "replication": REPLICATION, "min_insync": MIN_INSYNC}

    async def under_replicated(self, topics: list[str]) -> int:
        """Partitions of ``topics`` whose in-sync replicas are fewer than their replicas."""
        return sum(1 for r, isr in (await self.replicas(topics)).values() if isr < r)


def stop_on_sigterm() -> None:
    """SIGTERM as Ctrl-C: ``asyncio.run`` cancels the work, whose ``finally`` stops the JVMs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


async def _serve(run_dir: Path) -> None:
    cluster = Cluster(run_dir)
    try:
        await cluster.start()
        print(await cluster.create_topics(Settings()), flush=True)
        print(f"BLAMETRAIL_KAFKA_BOOTSTRAP={cluster.bootstrap}  (Ctrl-C stops the cluster)", flush=True)
        await asyncio.Event().wait()
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="where the nodes' configs, logs and data go")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    try:
        asyncio.run(_serve(args.run_dir))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
