"""Shared pieces of the API tests: a recording fake runtime and a small HTTP client.

The fake replaces vmm.vm.MicroVm only; the controller, validation and server under
test are the real ones.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from vmm.errors import StartError
from vmm.resources import VmResources


@dataclass
class FakeRuntime:
    """Records every runtime call; start() raises StartError when start_error is set."""

    start_error: str | None = None
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    started_with: VmResources | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    exit_code: int = 0

    def start(self, resources: VmResources) -> None:
        self.calls.append(("start", ()))
        if self.start_error is not None:
            raise StartError(self.start_error)
        self.started_with = resources

    def send_ctrl_alt_del(self) -> None:
        self.calls.append(("send_ctrl_alt_del", ()))
        self.ended.set()

    def update_drive(self, drive_id: str, path_on_host: str | None) -> None:
        self.calls.append(("update_drive", (drive_id, path_on_host)))

    def flush_metrics(self) -> None:
        self.calls.append(("flush_metrics", ()))

    def wait(self) -> int:
        self.ended.wait(timeout=30)
        return self.exit_code

    def shutdown(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.ended.set()


def request(sock_path: str | Path, method: str, path: str, body: Any = None,
            raw_body: bytes | None = None) -> tuple[int, dict | None]:
    """Send one request on a new connection; return (status, parsed JSON or None)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        client = HttpClient(sock)
        return client.request(method, path, body, raw_body)


class HttpClient:
    """An h11 client on one connected socket, for keep-alive tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str, body: Any = None,
                raw_body: bytes | None = None) -> tuple[int, dict | None]:
        if raw_body is None:
            raw_body = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", "localhost"), ("Content-Length", str(len(raw_body)))]
        if raw_body:
            headers.append(("Content-Type", "application/json"))
        data = self.conn.send(h11.Request(method=method, target=path, headers=headers))
        data += self.conn.send(h11.Data(data=raw_body)) if raw_body else b""
        data += self.conn.send(h11.EndOfMessage())
        self.sock.sendall(data)
        return self._read_response()

    def _read_response(self) -> tuple[int, dict | None]:
        status = 0
        payload = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                payload += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected h11 event {event!r}")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status, json.loads(payload) if payload else None


def recv_all(sock: socket.socket) -> bytes:
    """Read until the server closes the connection."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
