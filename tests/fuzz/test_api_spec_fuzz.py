"""Fuzz every API operation from spec/api.yaml against a running monitor process.

Two monitors run for the whole module: one never started, one started with a tiny
kernel that halts with interrupts off (it idles without using a host CPU). Each example
sends one request over the real API socket.

Accepted outcomes: any status the spec lists for the operation (a `default` response
stands for 400), with a body that matches the spec's schema for it. Rejected outcomes: a
5xx status, a status the spec does not list, a body that breaks its schema, a rejected
request that changes GET /vm/config or the boot state, a schema-invalid body that is not
rejected with 400, the monitor process ending, or GET / failing afterwards.

Example counts follow the hypothesis profile: `quick` (default) or `deep`
(`pytest tests/fuzz --hypothesis-profile=deep`).
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.api_strategies import Operation, invalid_request, is_valid, operations, \
    valid_request
from tests.integration.microvm import Monitor, UnixHTTPConnection
from tests.kvm.tiny_kernels import write_elf

OPERATIONS = operations()
BODY_OPERATIONS = [operation for operation in OPERATIONS if operation.body_pointer]
# Each operation gets a tenth of the profile's examples: 10 in `quick`, 500 in `deep`.
PER_OPERATION = settings(max_examples=max(5, settings.default.max_examples // 10))
IDLE_KERNEL = b"\xfa\xf4\xeb\xfd"  # cli; 1: hlt; jmp 1b


class RawClient:
    """A keep-alive client that sends raw body bytes and reconnects after errors."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.connection = UnixHTTPConnection(socket_path, timeout=5)

    def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"} if body else {}
        try:
            self.connection.request(method, path, body=body or None, headers=headers)
            response = self.connection.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.connection.close()
            self.connection = UnixHTTPConnection(self.socket_path, timeout=5)
            raise
        if response.getheader("Connection", "").lower() == "close":
            self.connection.close()
        return response.status, (json.loads(data) if data else None)

    def close(self) -> None:
        self.connection.close()


class Target:
    """A monitor process in one boot state, with a client on its socket.

    A thread keeps reading the monitor's console. PUT /logger without log_path sends the
    log to stderr, which is the console here, and a console nobody reads fills up and
    blocks the monitor's writes.
    """

    def __init__(self, monitor: Monitor, state: str) -> None:
        self.monitor = monitor
        self.state = state
        self.client = RawClient(monitor.socket_path)
        self.console_tail = ""
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()

    def _read_console(self) -> None:
        while True:
            try:
                text = self.monitor.process.read_nonblocking(65536, timeout=1)
            except pexpect.TIMEOUT:
                continue
            except (pexpect.EOF, OSError, ValueError):
                return
            self.console_tail = (self.console_tail + text)[-3000:]

    def snapshot(self) -> tuple[Any, str]:
        status, config = self.client.call("GET", "/vm/config")
        assert status == 200, config
        status, info = self.client.call("GET", "/")
        assert status == 200, info
        return config, info["state"]

    def assert_alive(self) -> None:
        assert self.monitor.process.isalive(), self.monitor.read_log()[-3000:]
        status, info = self.client.call("GET", "/")
        assert status == 200, info


def start_monitor(workdir: Path, boot: bool) -> Monitor:
    workdir.mkdir()
    monitor = Monitor(workdir, instance_id="fuzz-vm")
    monitor.wait_for_api()
    if boot:
        kernel = write_elf(workdir / "idle.elf", IDLE_KERNEL)
        api = monitor.api
        assert api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})[0] == 204
        assert api.put("/boot-source", {"kernel_image_path": str(kernel)})[0] == 204
        status, body = api.put("/actions", {"action_type": "InstanceStart"})
        assert status == 204, body
    return monitor


@pytest.fixture(scope="module", params=[
    pytest.param("not started", id="pre_boot"),
    pytest.param("started", id="post_boot", marks=pytest.mark.kvm),
])
def target(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    state = request.param
    monitor = start_monitor(tmp_path_factory.mktemp("fuzz") / state.replace(" ", "-"),
                            boot=state == "started")
    instance = Target(monitor, state)
    try:
        yield instance
        assert monitor.process.isalive(), monitor.read_log()[-3000:]
    finally:
        instance.client.close()
        monitor.terminate()


def check_response(operation: Operation, status: int, payload: Any) -> None:
    """Assert that the status and body are ones the spec lists for `operation`."""
    assert status < 500, payload
    assert status in operation.status_codes, (status, payload)
    pointer = operation.response_pointer(status)
    if status == 204:
        assert payload is None
    elif pointer is not None:
        assert is_valid(pointer, payload), (status, payload)


def send_and_check(target: Target, operation: Operation, path: str, body: bytes) -> int:
    before = target.snapshot()
    status, payload = target.client.call(operation.method, path, body)
    check_response(operation, status, payload)
    if status >= 400:
        assert target.snapshot() == before, (operation, path, body, payload)
    target.assert_alive()
    return status


@pytest.mark.parametrize("operation", OPERATIONS, ids=str)
@PER_OPERATION
@given(data=st.data())
def test_valid_bodies_get_spec_responses(target: Target, operation: Operation,
                                         data: st.DataObject) -> None:
    path, body = data.draw(valid_request(operation), label="request")
    send_and_check(target, operation, path, body)


@pytest.mark.parametrize("operation", BODY_OPERATIONS, ids=str)
@PER_OPERATION
@given(data=st.data())
def test_invalid_bodies_are_rejected(target: Target, operation: Operation,
                                     data: st.DataObject) -> None:
    kind, path, body = data.draw(invalid_request(operation), label="request")
    assert operation.body_pointer is not None
    assert not is_valid(operation.body_pointer, json.loads(body)), kind
    status = send_and_check(target, operation, path, body)
    assert status == 400, (kind, body)


@pytest.mark.parametrize("operation", BODY_OPERATIONS, ids=str)
@PER_OPERATION
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_non_json_bodies_are_rejected(target: Target, operation: Operation,
                                      raw: bytes) -> None:
    try:
        json.loads(raw)
    except ValueError:
        pass
    else:
        return  # a JSON document; the schema tests cover it
    status = send_and_check(target, operation, operation.template.replace("{", "x")
                            .replace("}", ""), raw)
    assert status == 400


@PER_OPERATION
@given(method=st.sampled_from(["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS"]),
       path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz/-_.%0123456789?=&", max_size=40))
def test_unknown_routes_are_400(target: Target, method: str, path: str) -> None:
    path = "/" + path
    known = {(operation.method, operation.template) for operation in OPERATIONS}
    if (method, path.split("?")[0]) in known:
        return
    before = target.snapshot()
    status, payload = target.client.call(method, path)
    assert status < 500, payload
    if status >= 400:
        assert status == 400
        assert isinstance(payload, dict) and isinstance(payload.get("fault_message"), str)
        assert target.snapshot() == before
    target.assert_alive()
