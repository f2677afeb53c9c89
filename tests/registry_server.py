"""An in-process Confluent Schema Registry (the few endpoints producers and the decoder use) for tests.

It can serve TLS (any ssl.SSLContext, e.g. one demanding a client certificate), demand basic auth
or a bearer token, answer every request with an error status, or hang: accept, read the request,
and never answer until released.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


def _canonical(schema_str: str) -> str:
    """Same schema, same id: compare parsed JSON, not whitespace."""
    try:
        return json.dumps(json.loads(schema_str), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return schema_str


@dataclass
class _State:
    schemas: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (schema text, schemaType)
    ids: dict[tuple[str, str], int] = field(default_factory=dict)  # (canonical text, schemaType) -> id
    subjects: dict[str, list[int]] = field(default_factory=dict)  # subject -> ids, one per version
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), for assertions
    fail_status: int | None = None  # answer every request with this status, to simulate an outage
    credentials: tuple[str, str] | None = None
    token: str | None = None  # a bearer token every request must carry
    answering: threading.Event = field(default_factory=threading.Event)  # cleared: hang every request
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    """Each connection in its own thread, TLS included: the handshake happens there, not in the accept loop."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused handshake or a client gone mid-request is what some tests are about


class RegistryServer:
    """`with RegistryServer() as reg:` serves on reg.url until the block ends.

    Runs in its own threads, so it answers while a test's event loop is busy or blocked.
    """

    def __init__(self, *, username: str | None = None, password: str | None = None, token: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.state = _State(credentials=(username, password or "") if username is not None else None, token=token)
        self.state.answering.set()
        self.tls = tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host!s}:{port}"

    def hang(self, hanging: bool = True) -> None:
        """Read every following request and never answer it (until `hang(False)` or stop)."""
        if hanging:
            self.state.answering.clear()
        else:
            self.state.answering.set()

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.state.lock:
            return list(self.state.requests)

    def fail_with(self, status: int | None) -> None:
        """Answer every following request with `status` (None restores normal service)."""
        self.state.fail_status = status

    def register(self, subject: str, schema_str: str, schema_type: str = "AVRO") -> int:
        """Register directly, without HTTP: same schema text (modulo whitespace) gives the same id."""
        st = self.state
        with st.lock:
            key = (_canonical(schema_str), schema_type)
            schema_id = st.ids.get(key)
            if schema_id is None:
                schema_id = len(st.schemas) + 1
                st.ids[key] = schema_id
                st.schemas[schema_id] = (schema_str, schema_type)
            versions = st.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def start(self) -> RegistryServer:
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._server.tls = self.tls
        # Polled every 50 ms: stop() waits for the next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="registry-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.answering.set()  # release hung requests
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running_registry(**kwargs: Any) -> Iterator[RegistryServer]:
    """Context manager form, handy as a `yield` fixture body."""
    with RegistryServer(**kwargs) as reg:
        yield reg


def _handler(registry: RegistryServer) -> type[BaseHTTPRequestHandler]:
    st = registry.state

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def setup(self) -> None:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.settimeout(10)
                self.request.do_handshake()  # a refused client certificate ends the connection here
            super().setup()

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", _CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: int, message: str) -> None:
            self._send(status, {"error_code": code, "message": message})

        def _authorised(self) -> bool:
            if st.credentials is None and st.token is None:
                return True
            if st.credentials is not None:
                user, password = st.credentials
                expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            else:
                expected = f"Bearer {st.token}"
            if self.headers.get("Authorization") == expected:
                return True
            self._error(401, 40101, "Unauthorized")
            return False

        def _begin(self) -> str | None:
            path = self.path.split("?", 1)[0]
            with st.lock:
                st.requests.append((self.command, path))
            st.answering.wait()  # hanging: the request was read, the answer never comes
            if st.fail_status is not None:
                self._error(st.fail_status, st.fail_status * 100, "simulated failure")
                return None
            return path if self._authorised() else None

        def do_GET(self) -> None:
            path = self._begin()
            if path is None:
                return
            if path == "/subjects":
                with st.lock:
                    self._send(200, sorted(st.subjects))
                return
            m = re.fullmatch(r"/schemas/ids/(\d+)", path)
            if m:
                with st.lock:
                    found = st.schemas.get(int(m.group(1)))
                if found is None:
                    self._error(404, 40403, "Schema not found")
                    return
                text, schema_type = found
                body: dict[str, Any] = {"schema": text}
                if schema_type != "AVRO":  # Confluent omits schemaType for Avro
                    body["schemaType"] = schema_type
                self._send(200, body)
                return
            m = re.fullmatch(r"/subjects/([^/]+)/versions/(latest|\d+)", path)
            if m:
                self._version(unquote(m.group(1)), m.group(2))
                return
            self._error(404, 404, "Not found")

        def _version(self, subject: str, version: str) -> None:
            with st.lock:
                ids = st.subjects.get(subject, [])
                index = len(ids) if version == "latest" else int(version)
                if not ids or not 1 <= index <= len(ids):
                    self._error(404, 40402, "Version not found")
                    return
                schema_id = ids[index - 1]
                text, schema_type = st.schemas[schema_id]
            self._send(
                200, {"subject": subject, "version": index, "id": schema_id, "schema": text, "schemaType": schema_type}
            )

        def do_POST(self) -> None:
            path = self._begin()
            if path is None:
                return
            m = re.fullmatch(r"/subjects/([^/]+)/versions", path)
            if not m:
                self._error(404, 404, "Not found")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                schema_str = body["schema"]
                if not isinstance(schema_str, str):
                    raise TypeError("schema must be a string")
            except (ValueError, KeyError, TypeError):
                self._error(422, 42201, "Invalid schema")
                return
            schema_type = body.get("schemaType") or "AVRO"
            schema_id = registry.register(unquote(m.group(1)), schema_str, schema_type)
            self._send(200, {"id": schema_id})

    return Handler
