"""Cases the API fuzz suite found, kept as explicit tests against an in-process server."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_api_support import FakeRuntime, recv_all
from vmm.api.server import ApiServer, _add_default_host
from vmm.controller import Controller
from vmm.resources import VmResources


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "api.sock")
    controller = Controller(VmResources(), FakeRuntime(), instance_id="test-vm")
    server = ApiServer(path, controller.handle, 4096)
    server.start()
    yield path
    server.close()


def send_raw(sock_path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(sock_path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_http11_request_without_host_is_served(sock_path: str) -> None:
    response = send_raw(sock_path, b"GET / HTTP/1.1\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert b'"id": "test-vm"' in response


def test_put_without_host_is_served(sock_path: str) -> None:
    body = b'{"vcpu_count": 2, "mem_size_mib": 64}'
    request = (b"PUT /machine-config HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    assert send_raw(sock_path, request).startswith(b"HTTP/1.1 204 ")


def test_request_line_split_across_sends_without_host(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(sock_path)
        for part in (b"GET /ver", b"sion HTTP/1.1\r", b"\n\r\n"):
            sock.sendall(part)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock).startswith(b"HTTP/1.1 200 ")


def test_default_host_keeps_existing_host() -> None:
    data = b"GET / HTTP/1.1\r\nhOsT: a\r\n\r\n"
    assert _add_default_host(data) == data


def test_default_host_leaves_http10_alone() -> None:
    data = b"GET / HTTP/1.0\r\n\r\n"
    assert _add_default_host(data) == data


def test_default_host_added_before_other_headers() -> None:
    data = b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    assert _add_default_host(data) == (
        b"PUT /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
    )
