"""Apache Kafka (KRaft; jars fetched by Maven from scripts/kafka/pom.xml) on loopback for tests, benchmark, scripts."""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.embedded import await_created, free_port

REPO = Path(__file__).resolve().parents[1]
POM = REPO / "scripts" / "kafka" / "pom.xml"
LOG4J = REPO / "scripts" / "kafka" / "log4j2.properties"
STATE_FILE = "cluster.json"

# C1 only and the serial collector: a broker ready in ~5 s instead of ~13 s on two busy cores, and less CPU
# taken from the code under test. The benchmark passes BENCH_JVM (the full JIT) instead.
TEST_JVM = ("-Xms256m", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xss1m")
BENCH_JVM = ("-Xms512m", "-Xmx1g", "-XX:+UseG1GC")
TOOL_JVM = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")  # short-lived tools: start fast


class ApacheKafkaError(RuntimeError):
    """The broker could not be fetched, formatted, started or reached."""


# --------------------------------------------------------------------------- the jars


def cache_root() -> Path:
    env = os.environ.get("OC_KAFKA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "offline-conversions" / "kafka"


def classpath(pom: Path = POM) -> Path:
    """The folder of jars for this pom, fetched once with Maven; a second call needs no network."""
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
    lib = cache_root() / digest / "lib"
    if (lib / ".complete").exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ApacheKafkaError("Maven (mvn) is needed once to fetch the Apache Kafka jars: apt-get install maven")
    cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="lib-", dir=cache_root()))
    cmd = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
           f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise ApacheKafkaError("mvn could not fetch the Apache Kafka jars:\n" + "\n".join(tail))
    (staging / ".complete").write_text(" ".join(cmd[:4]) + "\n")
    lib.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(lib)
    except OSError:  # another process won the race: its folder is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return lib


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    exe = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not exe:
        raise ApacheKafkaError("Java 17+ is needed to run Apache Kafka (apt-get install openjdk-17-jre-headless)")
    return exe


def java_command(main: str, args: Sequence[str], jvm: Sequence[str] = TOOL_JVM, lib: Path | None = None) -> list[str]:
    """`java … main args` on the Kafka class path with the project's log4j2 configuration."""
    return [java(), *jvm, "-cp", str((lib or classpath()) / "*"), f"-Dlog4j2.configurationFile={LOG4J}",
            main, *args]


def run_java(main: str, args: Sequence[str], *, timeout: float = 120.0,
             jvm: Sequence[str] = TOOL_JVM) -> subprocess.CompletedProcess[str]:
    """A Kafka command-line tool (StorageTool, ConsumerGroupCommand, ...) from the same jars as the broker."""
    return subprocess.run(java_command(main, args, jvm), capture_output=True, text=True, timeout=timeout,
                          check=False)


def kafka_version() -> str:
    text = POM.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start:text.index("</kafka.version>", start)]


# --------------------------------------------------------------------------- a cluster


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka's Uuid.randomUuid makes one: never starting with '-', which the storage
    tool's argument parser would read as an option (1 id in 64 failed to format before this)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


@dataclass(frozen=True)
class Scram:
    """A SASL_SSL listener with SCRAM-SHA-512 users created at format time, TLS from a PEM key and chain."""

    users: Mapping[str, str]  # name -> password
    key_pem: Path  # PKCS#8 private key, unencrypted
    cert_pem: Path  # the broker's certificate chain


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    sasl_port: int | None
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class ApacheKafka:
    """A KRaft cluster of combined broker+controller nodes on loopback ports, its logs on disk in `directory`.

    A directory that already holds a formatted cluster (its cluster.json) is started as it is: the same
    ports, the same data. Otherwise the cluster is formatted afresh in it (or in a new temporary folder).
    """

    nodes: int = 1
    directory: Path | None = None
    scram: Scram | None = None
    jvm: Sequence[str] = TEST_JVM
    overrides: Mapping[str, str] = field(default_factory=dict)
    members: list[Node] = field(default_factory=list, init=False)
    cluster_id: str = field(default="", init=False)
    _own_dir: bool = field(default=False, init=False)

    # ------------------------------------------------------------------ addresses

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.members)

    @property
    def sasl_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.sasl_port}" for n in self.members if n.sasl_port)

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 90.0) -> ApacheKafka:
        lib = classpath()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
            self._own_dir = True
        self.directory.mkdir(parents=True, exist_ok=True)
        state = self.directory / STATE_FILE
        if state.exists():
            self._load(state)
        else:
            self._plan()
            self._format(lib)
            state.write_text(json.dumps(self._state(), indent=2))
        for n in self.members:
            self._spawn(n, lib)
        self.wait_ready(timeout)
        return self

    def _plan(self) -> None:
        self.cluster_id = new_cluster_id()
        assert self.directory is not None
        for i in range(1, self.nodes + 1):
            self.members.append(Node(i, free_port(), free_port(), free_port() if self.scram else None,
                                     self.directory / f"node-{i}"))

    def _state(self) -> dict[str, Any]:
        return {"cluster_id": self.cluster_id, "kafka": kafka_version(),
                "nodes": [{"node_id": n.node_id, "port": n.port, "controller_port": n.controller_port,
                           "sasl_port": n.sasl_port} for n in self.members]}

    def _load(self, state: Path) -> None:
        data = json.loads(state.read_text())
        self.cluster_id = data["cluster_id"]
        assert self.directory is not None
        self.members = [Node(m["node_id"], m["port"], m["controller_port"], m["sasl_port"],
                             self.directory / f"node-{m['node_id']}") for m in data["nodes"]]
        self.nodes = len(self.members)

    def properties(self, n: Node) -> dict[str, str]:
        voters = ",".join(f"{m.node_id}@127.0.0.1:{m.controller_port}" for m in self.members)
        replicas = str(min(3, len(self.members)))
        isr = str(min(2, len(self.members)))
        listeners = [f"PLAINTEXT://127.0.0.1:{n.port}", f"CONTROLLER://127.0.0.1:{n.controller_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{n.port}"]
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(n.node_id),
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(n.directory / "data"),
            "num.partitions": "3",
            "default.replication.factor": replicas,
            "offsets.topic.replication.factor": replicas,
            # 50 partitions of __consumer_offsets made the first group join of a run take seconds.
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
            # Kafka refuses a classic member's session.timeout.ms below 6 s by default; the SIGKILL scenarios
            # use 3 s so that a dead member's partitions move quickly.
            "group.min.session.timeout.ms": "1000",
            # KIP-848 groups heartbeat at the broker's pace (5 s by default, and no faster than its minimum):
            # the tests' classic groups use a 500 ms heartbeat, so the consumer protocol gets the same.
            "group.consumer.min.heartbeat.interval.ms": "500",
            "group.consumer.heartbeat.interval.ms": "500",
            "group.consumer.min.session.timeout.ms": "6000",
            "group.consumer.session.timeout.ms": "10000",
            # Topics are created explicitly, as in production; an absent DLQ must stay absent.
            "auto.create.topics.enable": "false",
        }
        if self.scram is not None and n.sasl_port is not None:
            listeners.append(f"SASL_SSL://127.0.0.1:{n.sasl_port}")
            advertised.append(f"SASL_SSL://127.0.0.1:{n.sasl_port}")
            protocols += ",SASL_SSL:SASL_SSL"
            props.update({
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
                "listener.name.sasl_ssl.ssl.keystore.certificate.chain": self.scram.cert_pem.read_text().strip()
                    .replace("\n", "\\n"),
                "listener.name.sasl_ssl.ssl.keystore.key": self.scram.key_pem.read_text().strip()
                    .replace("\n", "\\n"),
            })
        props["listeners"] = ",".join(listeners)
        props["advertised.listeners"] = ",".join(advertised)
        props["listener.security.protocol.map"] = protocols
        props.update(self.overrides)
        return props

    def _write_properties(self, n: Node) -> Path:
        n.directory.mkdir(parents=True, exist_ok=True)
        path = n.directory / "server.properties"
        lines = [f"{k}={v}" for k, v in self.properties(n).items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _format(self, lib: Path) -> None:
        procs = []
        for n in self.members:
            args = ["format", f"--cluster-id={self.cluster_id}", "-c", str(self._write_properties(n))]
            if self.scram is not None:
                for name, password in self.scram.users.items():
                    args += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
            cmd = java_command("kafka.tools.StorageTool", args, TOOL_JVM, lib)
            procs.append((n, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for n, p in procs:
            out, _ = p.communicate(timeout=120)
            if p.returncode != 0:
                raise ApacheKafkaError(f"formatting node {n.node_id} failed: {out.decode(errors='replace')[-2000:]}")

    def _spawn(self, n: Node, lib: Path | None = None) -> None:
        props = self._write_properties(n)
        lib = lib or classpath()
        n.starts += 1
        log = (n.directory / "server.log").open("ab")
        cmd = java_command("kafka.Kafka", [str(props)], self.jvm, lib)
        n.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = 90.0, nodes: Iterable[Node] | None = None) -> None:
        """Until every running node is an unfenced broker in the cluster's metadata."""
        want = {n.node_id for n in (nodes if nodes is not None else self.members) if n.running}
        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0,
                             "logger": _QUIET})  # type: ignore[dict-item]
        last = "no answer"
        while time.monotonic() < deadline:
            for n in self.members:
                if n.proc is not None and n.proc.poll() is not None and n.node_id in want:
                    raise ApacheKafkaError(f"node {n.node_id} exited with {n.proc.returncode}:\n{self.log_tail(n)}")
            try:
                md = admin.list_topics(timeout=1)
                seen = set(md.brokers)
                if want <= seen:
                    return
                last = f"brokers {sorted(seen)} of {sorted(want)}"
            except Exception as exc:  # not listening yet
                last = str(exc)
            time.sleep(0.1)  # a poll interval, bounded by the deadline
        raise ApacheKafkaError(f"Apache Kafka not ready within {timeout:.0f}s ({last})")

    def log_tail(self, n: Node, lines: int = 40) -> str:
        path = n.directory / "server.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def node(self, node_id: int) -> Node:
        return next(n for n in self.members if n.node_id == node_id)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: no controlled shutdown, its log as the crash left it."""
        n = self.node(node_id)
        if n.proc is not None and n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait(30)

    def restart(self, node_id: int, timeout: float = 90.0) -> None:
        n = self.node(node_id)
        if n.running:
            self.stop_node(node_id)
        self._spawn(n)
        self.wait_ready(timeout, [n])

    def stop_node(self, node_id: int, timeout: float = 30.0) -> None:
        n = self.node(node_id)
        if n.proc is None or n.proc.poll() is not None:
            return
        n.proc.send_signal(signal.SIGTERM)
        try:
            n.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait(30)

    def stop(self) -> None:
        # In parallel: the last voters of a quorum otherwise wait for each other during a controlled shutdown.
        threads = [threading.Thread(target=self.stop_node, args=(n.node_id, 20.0)) for n in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def destroy(self) -> None:
        self.stop()
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ topics and metadata

    def create_topics(self, names: Iterable[str], partitions: int = 3, replication: int | None = None,
                      config: Mapping[str, str] | None = None,
                      assignment: Sequence[Sequence[int]] | None = None) -> None:
        """Topics with `replication` replicas (default: min(3, nodes)), or with replicas placed by `assignment`
        (one list of node ids per partition, the first the preferred leader)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        rf = replication or min(3, len(self.members))
        conf = dict(config or {})
        if assignment is not None:
            new = [NewTopic(n, num_partitions=len(assignment), replica_assignment=[list(a) for a in assignment],
                            config=conf) for n in names]
            partitions = len(assignment)
        else:
            new = [NewTopic(n, partitions, rf, config=conf) for n in names]
        futures = admin.create_topics(new, operation_timeout=30)
        await_created(futures, 60, ApacheKafkaError)
        self._wait_leaders(list(futures), partitions)

    def _wait_leaders(self, topics: list[str], partitions: int, timeout: float = 30.0) -> None:
        # A created topic answers produce requests only once each partition has a leader.
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            md = admin.list_topics(timeout=5)
            if all(t in md.topics and len(md.topics[t].partitions) == partitions
                   and all(p.leader >= 0 for p in md.topics[t].partitions.values()) for t in topics):
                return
            time.sleep(0.05)  # a poll interval, bounded by the deadline
        raise ApacheKafkaError(f"topics {topics} have no leaders after {timeout:.0f}s")

    def leaders(self, topic: str) -> dict[int, int]:
        """partition -> leader node id."""
        md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(topic, timeout=10)
        return {p.id: p.leader for p in md.topics[topic].partitions.values()}

    def in_sync(self, topic: str) -> dict[int, list[int]]:
        md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(topic, timeout=10)
        return {p.id: list(p.isrs) for p in md.topics[topic].partitions.values()}

    def __enter__(self) -> ApacheKafka:
        try:
            return self.start()
        except BaseException:
            self.destroy()
            raise

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.destroy()


class _Quiet:
    """A logger for the readiness probe's AdminClient: refused connections while the JVM starts are expected."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass


_QUIET = _Quiet()


# --------------------------------------------------------------------------- scripts/apache-kafka


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="apache-kafka",
        description="Start Apache Kafka (KRaft) on loopback in the foreground; prints bootstrap.servers=… when ready.")
    parser.add_argument("--nodes", type=int, default=1, help="combined broker+controller nodes (default 1)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="data folder; a folder from an earlier run is started with its data and ports "
                             "(default: a fresh temporary folder, removed on exit)")
    parser.add_argument("--fetch-only", action="store_true", help="fetch the jars into the cache and exit")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    try:
        if args.fetch_only:
            print(f"kafka {kafka_version()} jars in {classpath()}", flush=True)
            return 0
        cluster = ApacheKafka(nodes=args.nodes, directory=args.dir)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        with cluster:
            print(f"bootstrap.servers={cluster.bootstrap}", flush=True)
            print(f"# Apache Kafka {kafka_version()}, {cluster.nodes} node(s), data in {cluster.directory}",
                  file=sys.stderr, flush=True)
            while not stop.is_set():
                for n in cluster.members:
                    if not n.running:
                        print(f"node {n.node_id} exited:\n{cluster.log_tail(n)}", file=sys.stderr, flush=True)
                        return 1
                stop.wait(0.5)
        return 0
    except ApacheKafkaError as exc:
        print(f"apache-kafka: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
