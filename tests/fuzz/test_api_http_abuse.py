"""Raw HTTP abuse of the API socket of a running monitor process.

Accepted outcomes for each malformed exchange: a 400 response with a fault_message, or
the server closing the connection. Rejected outcomes: a 5xx status, the monitor process
ending, or GET / on a fresh connection failing or taking longer than a second afterwards.
Every test is bounded in connections, bytes and time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.integration.microvm import Monitor

PER_TEST = settings(max_examples=max(10, settings.default.max_examples // 2))
MAX_PAYLOAD = 51200
RECV_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    workdir = tmp_path_factory.mktemp("http-abuse")
    instance = Monitor(Path(workdir), instance_id="abuse-vm")
    try:
        instance.wait_for_api()
        yield instance
    finally:
        instance.terminate()


def connect(monitor: Monitor) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(monitor.socket_path)  # blocking: waits while the listen backlog is full
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


def exchange(monitor: Monitor, data: bytes) -> bytes:
    """Send `data`, half-close, and return everything the server sends back."""
    with connect(monitor) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return received


def status_of(response: bytes) -> int | None:
    """Return the status of the first response in `response`, or None if there is none."""
    if not response.startswith(b"HTTP/1.1 "):
        return None
    return int(response[9:12])


def assert_rejected_or_closed(response: bytes) -> None:
    status = status_of(response)
    if status is None:
        assert response == b"", response[:200]
        return
    assert status < 500, response[:500]


def assert_healthy(monitor: Monitor) -> None:
    assert monitor.process.isalive(), monitor.read_log()[-3000:]
    began = time.monotonic()
    response = exchange(monitor, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert status_of(response) == 200, response[:300]
    assert time.monotonic() - began < 1.0


@PER_TEST
@given(line=st.binary(min_size=1, max_size=200))
def test_garbage_request_lines(monitor: Monitor, line: bytes) -> None:
    assert_rejected_or_closed(exchange(monitor, line + b"\r\n\r\n"))
    assert_healthy(monitor)


@PER_TEST
@given(method=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10),
       target=st.sampled_from(["/", "/actions", "/vm", "/drives/a", "*", "/%00", "/../x"]))
def test_unknown_methods_get_400(monitor: Monitor, method: str, target: str) -> None:
    if method in ("GET", "PUT", "PATCH"):
        return
    response = exchange(monitor, f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status_of(response) in (400, None), response[:300]
    assert_healthy(monitor)


@PER_TEST
@given(headers=st.lists(st.tuples(st.binary(min_size=1, max_size=20),
                                  st.binary(max_size=40)), max_size=6))
def test_malformed_headers(monitor: Monitor, headers: list[tuple[bytes, bytes]]) -> None:
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    request = b"PUT /actions HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"
    assert_rejected_or_closed(exchange(monitor, request))
    assert_healthy(monitor)


def test_huge_header_block_is_rejected(monitor: Monitor) -> None:
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    assert_rejected_or_closed(exchange(monitor, request))
    assert_healthy(monitor)


def test_many_headers_are_rejected(monitor: Monitor) -> None:
    headers = b"".join(b"X-%d: y\r\n" % index for index in range(5000))
    assert_rejected_or_closed(exchange(monitor, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers
                                       + b"\r\n"))
    assert_healthy(monitor)


def test_oversized_content_length_is_400(monitor: Monitor) -> None:
    request = (b"PUT /mmds HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n{" % (MAX_PAYLOAD + 1))
    response = exchange(monitor, request)
    assert status_of(response) == 400, response[:300]
    assert b"larger than the limit" in response
    assert_healthy(monitor)


def test_oversized_chunked_body_is_400(monitor: Monitor) -> None:
    chunk = b"a" * 4096
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    request = (b"PUT /mmds HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    response = exchange(monitor, request)
    assert status_of(response) == 400, response[:300]
    assert_healthy(monitor)


def test_body_shorter_than_content_length(monitor: Monitor) -> None:
    request = b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"vcpu"
    assert_rejected_or_closed(exchange(monitor, request))
    assert_healthy(monitor)


def test_invalid_content_length_values(monitor: Monitor) -> None:
    for value in (b"-1", b"abc", b"1e3", b"99999999999999999999999", b"1, 2"):
        request = b"PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
        assert_rejected_or_closed(exchange(monitor, request))
    assert_healthy(monitor)


def test_pipelined_requests_all_answered(monitor: Monitor) -> None:
    one = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    response = exchange(monitor, one * 20)
    assert response.count(b"HTTP/1.1 200 OK") == 20
    assert_healthy(monitor)


def test_partial_requests_left_open_do_not_block_others(monitor: Monitor) -> None:
    stalled = []
    try:
        for index in range(100):
            sock = connect(monitor)
            sock.sendall([b"GET / HT", b"PUT /actions HTTP/1.1\r\nHost: x\r\n",
                          b"PUT /actions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"][index % 3])
            stalled.append(sock)
        assert_healthy(monitor)
    finally:
        for sock in stalled:
            sock.close()
    assert_healthy(monitor)


def test_connections_opened_and_dropped(monitor: Monitor) -> None:
    for _ in range(200):
        connect(monitor).close()
    assert_healthy(monitor)


def test_burst_from_many_clients(monitor: Monitor) -> None:
    """20 clients send 25 keep-alive requests each at once; every one gets 200."""
    failures: list[str] = []

    def client() -> None:
        try:
            with connect(monitor) as sock:
                sock.settimeout(10)
                request = b"GET /machine-config HTTP/1.1\r\nHost: x\r\n\r\n"
                for _ in range(25):
                    sock.sendall(request)
                    response = b""
                    while b"}" not in response:
                        chunk = sock.recv(4096)
                        if not chunk:
                            raise ConnectionError("server closed the connection")
                        response += chunk
                    if status_of(response) != 200:
                        failures.append(response[:100].decode(errors="replace"))
        except OSError as error:
            failures.append(repr(error))

    threads = [threading.Thread(target=client) for _ in range(20)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures, failures[:5]
    assert time.monotonic() - began < 30
    assert_healthy(monitor)


@PER_TEST
@given(body=st.binary(max_size=300))
def test_random_bytes_as_json_body(monitor: Monitor, body: bytes) -> None:
    request = (b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
               % len(body)) + body
    response = exchange(monitor, request)
    status = status_of(response)
    assert status in (204, 400), response[:300]
    if status == 400:
        payload = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert isinstance(payload["fault_message"], str)
    assert_healthy(monitor)


def test_request_without_host_header(monitor: Monitor) -> None:
    """Firecracker's server accepts HTTP/1.1 requests without Host; clients rely on it."""
    response = exchange(monitor, b"GET / HTTP/1.1\r\n\r\n")
    assert status_of(response) == 200, response[:300]
    response = exchange(monitor, b"GET / HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200, response[:300]
