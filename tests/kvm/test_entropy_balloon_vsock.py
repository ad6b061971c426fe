"""The monitor builds entropy, balloon and vsock devices and serves their API after boot.

The guest is a tiny kernel that halts at once, so no virtio driver runs: the
tests check what the host sees (the vsock Unix socket, the balloon API, the
command line) and that a host CONNECT without a guest driver is closed.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.microvm import Monitor
from tests.kvm.tiny_kernels import write_elf

pytestmark = pytest.mark.kvm

# hlt; jmp back to the hlt: the vCPU halts for good with interrupts off.
HALT_FOREVER = b"\xf4\xeb\xfd"
MEM_SIZE_MIB = 32


def _start(monitor: Monitor, kernel: Path, uds_path: Path) -> None:
    api = monitor.api
    for path, body in (
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_SIZE_MIB}),
        ("/boot-source", {"kernel_image_path": str(kernel)}),
        ("/entropy", {"rate_limiter": {"bandwidth": {"size": 4096, "refill_time": 100}}}),
        ("/balloon", {"amount_mib": 4, "deflate_on_oom": True, "stats_polling_interval_s": 1}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(uds_path)}),
        ("/actions", {"action_type": "InstanceStart"}),
    ):
        status, response = api.put(path, body)
        assert status == 204, (path, response)


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Monitor]:
    kernel = write_elf(tmp_path / "halt.elf", HALT_FOREVER)
    vm = Monitor(tmp_path)
    vm.wait_for_api()
    _start(vm, kernel, tmp_path / "v.sock")
    yield vm
    vm.terminate()


def test_devices_listed_on_command_line(monitor: Monitor) -> None:
    deadline = time.monotonic() + 10
    entries: list[str] = []
    while time.monotonic() < deadline and len(entries) < 3:
        entries = re.findall(r"virtio_mmio\.device=4K@(0x[0-9a-f]+):(\d+)", monitor.read_log())
        time.sleep(0.05)
    assert len(entries) == 3, monitor.read_log()[-2000:]


def test_vsock_connect_without_driver_is_closed(monitor: Monitor, tmp_path: Path) -> None:
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5.0)
    host.connect(str(tmp_path / "v.sock"))
    host.sendall(b"CONNECT 52\n")
    assert host.recv(16) == b""
    host.close()


def test_balloon_api_after_boot(monitor: Monitor) -> None:
    api = monitor.api
    status, body = api.request("PATCH", "/balloon", {"amount_mib": 8})
    assert status == 204, body
    status, stats = api.get("/balloon/statistics")
    assert status == 200, stats
    assert isinstance(stats, dict)
    assert stats["target_mib"] == 8
    assert stats["target_pages"] == 8 * 256
    assert stats["actual_pages"] == 0
    status, body = api.request("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 3})
    assert status == 204, body
