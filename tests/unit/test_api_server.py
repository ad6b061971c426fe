"""The API server on a real Unix socket, with the real controller and a fake runtime.

Accepted: every request gets a status and, for errors, a fault_message naming the field
or value. Rejected: a request that kills the server, blocks other clients, or leaves the
socket without responses; each bad-input test therefore checks that GET / still works.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmm
from tests.unit.test_api_support import FakeRuntime, HttpClient, recv_all, request
from vmm.api.server import ApiServer, ApiServerError
from vmm.controller import NOT_SUPPORTED_POST_BOOT, NOT_SUPPORTED_PRE_BOOT, Controller
from vmm.resources import VmResources

MAX_PAYLOAD = 4096


class Served:
    """A running server with its runtime and socket path."""

    def __init__(self, tmp_path: Path) -> None:
        self.sock = str(tmp_path / "api.sock")
        self.runtime = FakeRuntime()
        self.controller = Controller(VmResources(), self.runtime, instance_id="test-vm")
        self.server = ApiServer(self.sock, self.controller.handle, MAX_PAYLOAD)
        self.server.start()
        self.kernel = tmp_path / "vmlinux"
        self.kernel.write_bytes(b"\x7fELF")
        self.disk = tmp_path / "rootfs.ext4"
        self.disk.write_bytes(bytes(4096))

    def call(self, method: str, path: str, body: object = None,
             raw_body: bytes | None = None) -> tuple[int, dict | None]:
        return request(self.sock, method, path, body, raw_body)

    def assert_alive(self) -> None:
        status, info = self.call("GET", "/")
        assert status == 200
        assert info is not None and info["id"] == "test-vm"

    def boot(self) -> None:
        assert self.call("PUT", "/boot-source", {"kernel_image_path": str(self.kernel)}) == (
            204, None)
        assert self.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    instance = Served(tmp_path)
    yield instance
    instance.server.close()


def assert_fault(response: tuple[int, dict | None], *fragments: str) -> None:
    status, body = response
    assert status == 400, body
    assert body is not None
    for fragment in fragments:
        assert fragment in body["fault_message"]


# Endpoints ------------------------------------------------------------------------------


def test_get_root_reports_instance(served: Served) -> None:
    status, info = served.call("GET", "/")
    assert status == 200
    assert info == {"app_name": "vmm", "id": "test-vm", "state": "Not started",
                    "vmm_version": vmm.__version__}


def test_get_version(served: Served) -> None:
    status, body = served.call("GET", "/version")
    assert status == 200
    assert body == {"firecracker_version": "1.12.1"}


def test_machine_config_get_put_patch(served: Served) -> None:
    status, config = served.call("GET", "/machine-config")
    assert status == 200
    assert config == {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                      "track_dirty_pages": False, "huge_pages": "None"}
    body = {"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"}
    assert served.call("PUT", "/machine-config", body) == (204, None)
    assert served.call("PATCH", "/machine-config", {"mem_size_mib": 512}) == (204, None)
    status, config = served.call("GET", "/machine-config")
    assert config is not None
    assert config["vcpu_count"] == 2
    assert config["mem_size_mib"] == 512
    assert config["cpu_template"] == "T2"


def test_put_machine_config_resets_omitted_fields(served: Served) -> None:
    served.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64, "smt": True})
    served.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    _status, config = served.call("GET", "/machine-config")
    assert config is not None and config["smt"] is False


def test_boot_source_and_drives_appear_in_vm_config(served: Served) -> None:
    assert served.call("PUT", "/boot-source", {
        "kernel_image_path": str(served.kernel), "boot_args": "console=ttyS0"}) == (204, None)
    data = {"drive_id": "data", "path_on_host": str(served.disk), "is_root_device": False}
    root = {"drive_id": "rootfs", "path_on_host": str(served.disk), "is_root_device": True,
            "is_read_only": True}
    assert served.call("PUT", "/drives/data", data) == (204, None)
    assert served.call("PUT", "/drives/rootfs", root) == (204, None)
    status, config = served.call("GET", "/vm/config")
    assert status == 200
    assert config is not None
    assert config["boot-source"] == {"kernel_image_path": str(served.kernel),
                                     "boot_args": "console=ttyS0"}
    assert [drive["drive_id"] for drive in config["drives"]] == ["rootfs", "data"]
    assert config["drives"][0]["is_read_only"] is True
    assert config["network-interfaces"] == []
    assert config["vsock"] is None


def test_instance_start_and_ctrl_alt_del(served: Served) -> None:
    served.boot()
    assert served.runtime.started_with is served.controller.resources
    _status, info = served.call("GET", "/")
    assert info is not None and info["state"] == "Running"
    assert served.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    assert ("send_ctrl_alt_del", ()) in served.runtime.calls


def test_patch_drive_after_boot_calls_runtime(served: Served, tmp_path: Path) -> None:
    served.call("PUT", "/drives/scratch", {"drive_id": "scratch",
                                           "path_on_host": str(served.disk),
                                           "is_root_device": False})
    served.boot()
    new_disk = tmp_path / "new.img"
    new_disk.write_bytes(bytes(512))
    response = served.call("PATCH", "/drives/scratch",
                           {"drive_id": "scratch", "path_on_host": str(new_disk)})
    assert response == (204, None)
    assert ("update_drive", ("scratch", str(new_disk))) in served.runtime.calls
    _status, config = served.call("GET", "/vm/config")
    assert config is not None and config["drives"][0]["path_on_host"] == str(new_disk)


# Bad input ------------------------------------------------------------------------------


def test_unknown_field_names_field(served: Served) -> None:
    assert_fault(served.call("PUT", "/machine-config", {"vcpus": 2, "mem_size_mib": 128}),
                 'unknown field "vcpus"')
    served.assert_alive()


def test_wrong_type_names_field(served: Served) -> None:
    assert_fault(served.call("PUT", "/machine-config",
                             {"vcpu_count": "2", "mem_size_mib": 128}),
                 "vcpu_count", '"2" is not of type "integer"')
    served.assert_alive()


def test_out_of_range_names_limit(served: Served) -> None:
    assert_fault(served.call("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 1}),
                 "machine-config: vcpu_count: 0 is less than the minimum of 1")
    assert_fault(served.call("PATCH", "/machine-config", {"vcpu_count": 33}),
                 "vcpu_count: 33 is greater than the maximum of 32")
    served.assert_alive()


def test_odd_vcpus_with_smt_rejected(served: Served) -> None:
    assert_fault(served.call("PUT", "/machine-config",
                             {"vcpu_count": 3, "mem_size_mib": 128, "smt": True}),
                 "vcpu_count: 3", "smt")
    served.assert_alive()


def test_missing_kernel_names_path(served: Served, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-vmlinux")
    assert_fault(served.call("PUT", "/boot-source", {"kernel_image_path": missing}),
                 "kernel_image_path", missing)
    served.assert_alive()


def test_drive_id_mismatch_rejected(served: Served) -> None:
    body = {"drive_id": "other", "path_on_host": str(served.disk), "is_root_device": False}
    assert_fault(served.call("PUT", "/drives/rootfs", body), "'rootfs'", "'other'")
    _status, config = served.call("GET", "/vm/config")
    assert config is not None and config["drives"] == []


def test_invalid_drive_id_rejected(served: Served) -> None:
    body = {"drive_id": "a-b", "path_on_host": str(served.disk), "is_root_device": False}
    assert_fault(served.call("PUT", "/drives/a-b", body), "drive_id", "'a-b'")
    assert_fault(served.call("PUT", "/drives/", body), "Empty ID")
    served.assert_alive()


def test_second_root_drive_rejected(served: Served) -> None:
    for drive_id in ("first", "second"):
        response = served.call("PUT", f"/drives/{drive_id}", {
            "drive_id": drive_id, "path_on_host": str(served.disk), "is_root_device": True})
    assert_fault(response, "second", "root block device already exists", "'first'")
    served.assert_alive()


def test_put_after_boot_rejected(served: Served) -> None:
    served.boot()
    assert_fault(served.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                 NOT_SUPPORTED_POST_BOOT)
    assert_fault(served.call("PUT", "/actions", {"action_type": "InstanceStart"}),
                 NOT_SUPPORTED_POST_BOOT)
    served.assert_alive()


def test_post_boot_call_before_boot_rejected(served: Served) -> None:
    assert_fault(served.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
                 NOT_SUPPORTED_PRE_BOOT)
    assert_fault(served.call("PATCH", "/drives/x", {"drive_id": "x"}), NOT_SUPPORTED_PRE_BOOT)
    assert served.runtime.calls == []


def test_unknown_path_rejected(served: Served) -> None:
    assert_fault(served.call("GET", "/no-such-thing"),
                 "Invalid request method and/or path: GET /no-such-thing.")
    assert_fault(served.call("DELETE", "/machine-config"), "DELETE /machine-config")
    served.assert_alive()


def test_invalid_json_rejected(served: Served) -> None:
    assert_fault(served.call("PUT", "/machine-config", raw_body=b'{"vcpu_count": '),
                 "machine-config", "not valid JSON")
    assert_fault(served.call("PUT", "/machine-config", raw_body=b"\xff\xfe"), "UTF-8")
    assert_fault(served.call("PUT", "/machine-config",
                             raw_body=b'{"vcpu_count": NaN, "mem_size_mib": 1}'), "NaN")
    served.assert_alive()


def test_malformed_http_gets_400_and_close(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(served.sock)
        sock.sendall(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"malformed HTTP request" in reply
    served.assert_alive()


def test_garbage_request_line_closes_cleanly(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(served.sock)
        sock.sendall(b"\x00\x01 not http at all\r\n\r\n")
        reply = recv_all(sock)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400 ")
    served.assert_alive()


def test_oversized_body_rejected(served: Served) -> None:
    body = json.dumps({"big": "x" * (MAX_PAYLOAD * 2)}).encode()
    status, fault = served.call("PUT", "/mmds", raw_body=body)
    assert status == 400
    assert fault is not None
    assert str(len(body)) in fault["fault_message"]
    assert str(MAX_PAYLOAD) in fault["fault_message"]
    served.assert_alive()


def test_oversized_chunked_body_rejected(served: Served) -> None:
    chunk = b"x" * (MAX_PAYLOAD + 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(served.sock)
        sock.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert str(MAX_PAYLOAD).encode() in reply
    served.assert_alive()


# Connections ----------------------------------------------------------------------------


def test_keep_alive_serves_several_requests(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(served.sock)
        client = HttpClient(sock)
        assert client.request("GET", "/")[0] == 200
        assert client.request("PATCH", "/machine-config", {"vcpu_count": 2}) == (204, None)
        status, config = client.request("GET", "/machine-config")
        assert status == 200
        assert config is not None
        assert config["vcpu_count"] == 2


def test_json_response_headers(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(served.sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = recv_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["state"] == "Not started"


def test_no_content_response_has_no_body(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(served.sock)
        sock.sendall(b"PATCH /machine-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: 16\r\n\r\n{\"vcpu_count\":2}")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert reply.endswith(b"\r\n\r\n")


def test_slow_client_does_not_block_others(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(served.sock)
        slow.sendall(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        started = time.monotonic()
        served.assert_alive()
        assert time.monotonic() - started < 5


def test_many_concurrent_clients(served: Served) -> None:
    results: list[int] = []

    def client() -> None:
        results.append(served.call("GET", "/machine-config")[0])

    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == [200] * 20


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl command")
def test_curl_unix_socket(served: Served) -> None:
    put = subprocess.run(
        ["curl", "-sS", "--unix-socket", served.sock, "-X", "PUT",
         "http://localhost/machine-config", "-H", "Content-Type: application/json",
         "-d", '{"vcpu_count": 2, "mem_size_mib": 256}', "-w", "%{http_code}"],
        capture_output=True, text=True, timeout=30, check=True)
    assert put.stdout == "204"
    get = subprocess.run(
        ["curl", "-sS", "--unix-socket", served.sock, "http://localhost/machine-config"],
        capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(get.stdout)["mem_size_mib"] == 256


# Socket file ----------------------------------------------------------------------------


def test_stale_socket_file_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert os.path.exists(path)
    server = ApiServer(path, Controller(VmResources(), FakeRuntime()).handle)
    server.start()
    try:
        assert request(path, "GET", "/")[0] == 200
    finally:
        server.close()
    assert not os.path.exists(path)


def test_live_socket_refused(served: Served) -> None:
    second = ApiServer(served.sock, served.controller.handle)
    with pytest.raises(ApiServerError, match="in use by a running server"):
        second.bind()
    served.assert_alive()


def test_regular_file_path_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(ApiServerError, match="not a socket"):
        ApiServer(str(path), Controller(VmResources(), FakeRuntime()).handle).bind()
    assert path.read_text() == "keep me"
